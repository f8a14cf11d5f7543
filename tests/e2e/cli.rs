//! The `omni` binary end to end: publishing from the command line and from
//! a JSON-lines file, reading state back with `snapshot` and `watch`,
//! drawing topologies, and showing the configuration without its secrets.

use std::process::{Output, Stdio};
use std::time::Duration;

use omni::kafka::partition_for;
use omni::modules::Registry;
use omni::topology::Topology;
use serde_json::json;

use crate::common::*;

fn run(command: &mut std::process::Command) -> Output {
    command.output().expect("running omni")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `omni <args>` and checks it succeeded.
fn omni_ok(args: &[&str]) -> Output {
    let output = run(omni_cli().args(args));
    assert!(
        output.status.success(),
        "omni {args:?} failed with {}:\n{}{}",
        output.status,
        stdout(&output),
        stderr(&output)
    );
    output
}

/// `omni publish` of one event to the topology's input topic.
fn publish(topology_file: &std::path::Path, topology: &Topology, path: &str, event: &[&str]) -> (i32, i64) {
    let file = topology_file.to_str().unwrap();
    let mut args = vec!["publish", "--topic", topology.input_topic(), "--topology", file, path];
    args.extend_from_slice(event);
    let output = omni_ok(&args);
    let text = stdout(&output);
    // published <event id> to <topic> partition <p> offset <o>
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"published"), "{text}");
    assert_eq!(words.get(3), Some(&topology.input_topic()), "{text}");
    let partition = words[5].parse().unwrap();
    let offset = words[7].parse().unwrap();
    (partition, offset)
}

/// `omni snapshot <path> --json`: the exit code and the parsed JSON, if any.
fn snapshot(topology: &Topology, path: &str) -> (i32, Option<serde_json::Value>, String) {
    let output = run(omni_cli().args(["snapshot", path, "--json", "--key-prefix", &topology.redis.key_prefix]));
    let code = output.status.code().expect("exit code");
    let json = (code == 0).then(|| serde_json::from_str(stdout(&output).trim()).expect("snapshot prints JSON"));
    (code, json, stderr(&output))
}

async fn wait_for_snapshot_version(topology: &Topology, path: &str, version: u64) -> serde_json::Value {
    wait_for(Duration::from_secs(90), &format!("omni snapshot {path} at version {version}"), || {
        let (_, json, _) = snapshot(topology, path);
        async move { json.filter(|j| j["version"] == json!(version)) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_from_flags_and_a_file_then_snapshot_and_watch_show_the_folded_state() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("cli", 3, &dir.path().join("state"));
    let file = dir.path().join("topology.toml");
    write_topology(&topology, &file);

    let r1 = "app/cli/room/r1";
    let steps: [&[&str]; 4] = [
        &["recording-start", "--recording-id", "rec1", "--by", "u7"],
        &["tag-set", "topic", "physics"],
        &["tag-set", "lang", "en"],
        &["tag-remove", "lang"],
    ];
    let mut last_offset = -1;
    for step in steps {
        let (partition, offset) = publish(&file, &topology, r1, step);
        assert_eq!(partition, partition_for(r1.as_bytes(), topology.partitions), "one room, one partition");
        assert!(offset > last_offset, "the room's events stay in order");
        last_offset = offset;
    }
    // The topic was created with the topology's partition count.
    let served = omni::kafka::wait_for_topic(&topology.kafka, topology.input_topic(), Duration::from_secs(10)).await;
    assert_eq!(served.unwrap(), Some(3));

    let events = dir.path().join("events.jsonl");
    std::fs::write(
        &events,
        [
            r#"{"path":"app/cli/room/r2","type":"tag_set","key":"level","value":"advanced"}"#,
            r#"{"path":"app/cli/room/r2","type":"recording_started","recording_id":"rec9","started_by":"u1","occurred_at_ms":1795773600000}"#,
            "",
            r#"{"path":"app/cli/room/r2","type":"recording_stopped","reason":"done","occurred_at_ms":1795773660000}"#,
            r#"{"path":"app/cli/room/r3","type":"tag_set","key":"k","value":"v"}"#,
            r#"{"path":"app/cli/room/r3","type":"room_closed"}"#,
            r#"{"path":"app/cli/room/r1","type":"tag_set","key":"mood","value":"calm","event_id":"from-file"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let output = omni_ok(&[
        "publish",
        "--file",
        events.to_str().unwrap(),
        "--topic",
        topology.input_topic(),
        "--topology",
        file.to_str().unwrap(),
    ]);
    assert_eq!(stdout(&output).trim(), format!("published 6 events to {}", topology.input_topic()));

    // A bad line fails the whole file, naming the line, and publishes nothing.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"path\":\"app/cli/room/r9\",\"type\":\"tag_set\",\"key\":\"a\",\"value\":\"b\"}\n{\"path\":\"app/cli/room/r9\",\"type\":\"tag_exploded\"}\n",
    )
    .unwrap();
    let output = run(omni_cli().args([
        "publish",
        "--file",
        bad.to_str().unwrap(),
        "--topic",
        topology.input_topic(),
        "--topology",
        file.to_str().unwrap(),
    ]));
    assert!(!output.status.success(), "a file with an unknown event type is refused");
    assert!(stderr(&output).contains("line 2") && stderr(&output).contains("tag_exploded"), "{}", stderr(&output));

    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;

    let room1 = wait_for_snapshot_version(&topology, r1, 5).await;
    assert_eq!(room1["path"], r1);
    assert_eq!(room1["tags"], json!({"topic": "physics", "mood": "calm"}));
    assert_eq!(room1["recording"]["active"], true);
    assert_eq!(room1["recording"]["recording_id"], "rec1");
    assert_eq!(room1["recording"]["started_by"], "u7");
    assert!(room1["recording"]["started_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{room1}");
    assert!(room1["updated_at"].as_str().is_some_and(|t| !t.is_empty()), "{room1}");

    let room2 = wait_for_snapshot_version(&topology, "app/cli/room/r2", 3).await;
    assert_eq!(
        room2,
        json!({
            "path": "app/cli/room/r2",
            "version": 3,
            "recording": {
                "active": false,
                "recording_id": "rec9",
                "started_by": "u1",
                "started_at": "2026-11-27T10:00:00Z",
                "stopped_at": "2026-11-27T10:01:00Z",
                "reason": "done",
            },
            "tags": {"level": "advanced"},
            "updated_at": "2026-11-27T10:01:00Z",
        })
    );

    // A closed room and a room never seen are unknown: exit code 2 (usage errors exit 64).
    let (code, _, err) = snapshot(&topology, "app/cli/room/r3");
    assert_eq!(code, 2, "closed room: {err}");
    assert!(err.contains("not known"), "{err}");
    let (code, _, err) = snapshot(&topology, "app/cli/room/never");
    assert_eq!(code, 2, "unknown room: {err}");
    // The bad file published nothing.
    let (code, _, _) = snapshot(&topology, "app/cli/room/r9");
    assert_eq!(code, 2, "nothing from a refused file reached the job");
    // Not a room path at all: an error, not "unknown".
    let output = run(omni_cli().args(["snapshot", "app/cli", "--json", "--key-prefix", &topology.redis.key_prefix]));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));

    // watch: the snapshots of matching rooms, then each live change.
    let mut watch = omni_cli()
        .args(["watch", "app/cli/room/*", "--topology", file.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning omni watch");
    let lines = Lines::new(watch.stdout.take().unwrap());
    let line = |what: &str| -> serde_json::Value {
        let text = lines.next(Duration::from_secs(60)).unwrap_or_else(|| panic!("omni watch printed no {what}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {text}"))
    };
    let first = line("first snapshot");
    let second = line("second snapshot");
    let mut snapshots = [first, second];
    snapshots.sort_by_key(|s| s["path"].as_str().unwrap().to_owned());
    assert_eq!(snapshots[0]["type"], "snapshot");
    assert_eq!(snapshots[0]["path"], r1);
    assert_eq!(snapshots[0]["version"], 5);
    assert_eq!(snapshots[0]["tags"], room1["tags"]);
    let mut expected_second = room2.clone();
    expected_second["type"] = json!("snapshot");
    assert_eq!(snapshots[1], expected_second);

    publish(&file, &topology, "app/cli/room/r2", &["tag-set", "level", "expert"]);
    publish(&file, &topology, "app/cli/room/r3", &["tag-set", "again", "open"]);
    // r2 goes on from its snapshot. The closed r3 had no snapshot, so its
    // history comes first (from the look-back or its change stream), then the
    // reopening continues its version.
    let mut changes: std::collections::BTreeMap<String, Vec<serde_json::Value>> = Default::default();
    let reached = |changes: &std::collections::BTreeMap<String, Vec<serde_json::Value>>, room: &str, v: u64| {
        changes.get(room).is_some_and(|c| c.iter().any(|c| c["version"] == v))
    };
    while !(reached(&changes, "app/cli/room/r2", 4) && reached(&changes, "app/cli/room/r3", 3)) {
        let change = line("a change");
        assert_eq!(change["type"], "change", "{change}");
        changes.entry(change["path"].as_str().unwrap().to_owned()).or_default().push(change);
    }
    // Nothing else: older broadcast records were covered by the snapshots.
    if let Some(extra) = lines.next(Duration::from_secs(2)) {
        panic!("omni watch printed more than the changes since its snapshots: {extra}");
    }
    let summary = |room: &str| -> Vec<(u64, String, serde_json::Value)> {
        changes[room]
            .iter()
            .map(|c| (c["version"].as_u64().unwrap(), c["module"].as_str().unwrap().to_owned(), c["state"].clone()))
            .collect()
    };
    assert_eq!(changes.len(), 2, "changes only for r2 and r3: {changes:?}");
    assert_eq!(summary("app/cli/room/r2"), vec![(4, "tags".to_owned(), json!({"level": "expert"}))]);
    assert_eq!(
        summary("app/cli/room/r3"),
        vec![
            (1, "tags".to_owned(), json!({"k": "v"})),
            (2, "room".to_owned(), json!({})),
            (3, "tags".to_owned(), json!({"again": "open"})),
        ]
    );
    watch.kill().unwrap();
    watch.wait().unwrap();

    // `omni watch … | head -1`: once its reader is gone, watch ends quietly.
    let mut watch = omni_cli()
        .args(["watch", "app/cli/room/*", "--topology", file.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning omni watch");
    {
        use std::io::BufRead as _;
        let mut reader = std::io::BufReader::new(watch.stdout.take().unwrap());
        let mut first = String::new();
        reader.read_line(&mut first).unwrap();
        assert!(first.contains("\"snapshot\""), "{first}");
    }
    publish(&file, &topology, "app/cli/room/r2", &["tag-set", "level", "master"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = watch.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "omni watch kept running after its reader left");
        publish(&file, &topology, "app/cli/room/r2", &["tag-set", "n", "1"]);
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut errors = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().unwrap(), &mut errors).unwrap();
    assert!(status.success(), "omni watch exited with {status}: {errors}");
    assert!(!errors.contains("panicked"), "{errors}");

    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_describe_draws_text_and_mermaid() {
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("describe", 2, &dir.path().join("state"));
    topology.modules = vec!["tags".into(), "recording".into()];
    let file = dir.path().join("topology.toml");
    write_topology(&topology, &file);
    let file = file.to_str().unwrap();

    let text = stdout(&omni_ok(&["topology", "describe", file]));
    assert!(text.starts_with(&format!("topology {}\n", topology.application_id)), "{text}");
    for name in [
        topology.input_topic().to_owned(),
        topology.broadcast_topic.clone(),
        topology.dead_letter_topic.clone(),
        topology.changelog_topic(),
        format!("{}:room:{{<path>}}", topology.redis.key_prefix),
    ] {
        assert!(text.contains(&name), "text lacks {name}:\n{text}");
    }
    // Modules in the topology's order.
    let tags = text.find("    tags\n").expect("tags listed");
    let recording = text.find("    recording\n").expect("recording listed");
    assert!(tags < recording, "{text}");

    let mermaid = stdout(&omni_ok(&["topology", "describe", file, "--format", "mermaid"]));
    assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
    assert!(mermaid.contains("mod0[\"tags\"]") && mermaid.contains("mod1[\"recording\"]"), "{mermaid}");
    assert!(mermaid.contains(&format!("src0[/\"{}\"/] --> fold", topology.input_topic())), "{mermaid}");
    assert!(mermaid.contains(&format!("broadcast[/\"{}\"/]", topology.broadcast_topic)), "{mermaid}");

    // A typo in the file is an error naming it.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, std::fs::read_to_string(file).unwrap().replace("partitions =", "partitionz =")).unwrap();
    let output = run(omni_cli().args(["topology", "describe", broken.to_str().unwrap()]));
    assert!(!output.status.success());
    assert!(stderr(&output).contains("partitionz"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_config_masks_the_redis_password_and_other_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("printcfg", 2, &dir.path().join("state"));
    topology.kafka.properties.insert("sasl.password".into(), "kafka-s3cret".into());
    topology.kafka.properties.insert("sasl.username".into(), "omni".into());
    let file = dir.path().join("topology.toml");
    write_topology(&topology, &file);
    let file = file.to_str().unwrap();

    let output = run(omni_cli()
        .args(["run", "--topology", file, "--print-config", "--instance-id", "i7"])
        .env("OMNI_REDIS_URL", "redis://omniuser:hunter2-secret@10.1.2.3:6380/2"));
    assert!(output.status.success(), "{}", stderr(&output));
    let shown = stdout(&output);
    assert!(!shown.contains("hunter2-secret") && !shown.contains("kafka-s3cret"), "a secret leaked:\n{shown}");
    let parsed: Topology = toml::from_str(&shown).expect("print-config prints a topology");
    assert_eq!(parsed.redis.url, "redis://omniuser:***@10.1.2.3:6380/2");
    assert_eq!(parsed.kafka.properties["sasl.password"], "***");
    assert_eq!(parsed.kafka.properties["sasl.username"], "omni");
    assert_eq!(parsed.kafka.brokers, services().brokers, "OMNI_BROKERS overrides the file");
    assert_eq!(parsed.instance.id, "i7", "flags override the file");
    assert_eq!(parsed.application_id, topology.application_id);

    // A password from OMNI_REDIS_PASSWORD is added to the URL, and masked too.
    let output = run(omni_cli()
        .args(["run", "--topology", file, "--print-config"])
        .env("OMNI_REDIS_URL", "redis://omniuser@10.1.2.3:6380")
        .env("OMNI_REDIS_PASSWORD", "p@ss w0rd"));
    assert!(output.status.success(), "{}", stderr(&output));
    let shown = stdout(&output);
    assert!(!shown.contains("p@ss") && !shown.contains("p%40ss") && !shown.contains("w0rd"), "{shown}");
    let parsed: Topology = toml::from_str(&shown).unwrap();
    assert_eq!(parsed.redis.url, "redis://omniuser:***@10.1.2.3:6380");
}
