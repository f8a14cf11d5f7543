//! What a newcomer meets (issue 14): the harness's `env` exports, one
//! layered configuration for every command from any directory, one
//! validation, batched `publish --file`, exit codes, help for every flag,
//! and a true MSRV with its licence. `operator.rs` has the operator's side.

use std::path::Path as FsPath;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use omni::topology::Topology;
use serde_json::Value;

use crate::common::*;

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `omni` with no `OMNI_*` variable at all, run in `cwd`: only what the command line and files say.
pub fn bare_omni(cwd: &FsPath) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_omni"));
    for (name, _) in std::env::vars() {
        if name.starts_with("OMNI_") {
            command.env_remove(name);
        }
    }
    command.current_dir(cwd).stdin(Stdio::null());
    command
}

pub fn output(command: &mut Command) -> Output {
    command.output().expect("running omni")
}

/// Waits for a child process to exit, up to `timeout`; `None` if it did not.
pub fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn signal(target: &str, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), "--", target]).status().expect("kill");
    assert!(status.success(), "kill -{name} {target}");
}

/// The next line satisfying `wanted`, waiting at most `timeout` in all; every line read goes to `seen`.
pub fn line_where(
    lines: &Lines,
    timeout: Duration,
    seen: &mut Vec<String>,
    wanted: impl Fn(&str) -> bool,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let line = lines.next(left)?;
        seen.push(line.clone());
        if wanted(&line) {
            return Some(line);
        }
    }
    None
}

#[test]
fn services_env_prints_export_lines_that_eval_exports() {
    let script = repo_root().join("integration/services.sh");
    let shell = format!(
        "eval \"$(bash {})\" && bash -c 'echo \"$OMNI_BROKERS|$OMNI_REDIS_URL\"'",
        format_args!("{} env", script.display())
    );
    let out =
        Command::new("bash").args(["-c", &shell]).env_remove("OMNI_BROKERS").env_remove("OMNI_REDIS_URL").output();
    let out = out.expect("running services.sh env");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A child of the shell sees them: they were exported, as the README says.
    assert_eq!(text(&out.stdout).trim(), format!("{}|{}", services().brokers, services().redis_url));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_reads_one_topology_file_from_any_directory() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let topology = fresh_topology("newcomer", 2, &dir.path().join("state"));
    let file = dir.path().join("topology.toml");
    write_topology(&topology, &file);
    let file_arg = file.to_str().unwrap();
    let room = format!("app/{}/room/r1", topology.application_id);

    // publish: by --topology, then by OMNI_TOPOLOGY; no OMNI_BROKERS anywhere.
    let published =
        output(bare_omni(elsewhere.path()).args(["publish", "--topology", file_arg, &room, "tag-set", "k", "1"]));
    assert!(published.status.success(), "{}", text(&published.stderr));
    assert!(text(&published.stdout).contains(topology.input_topic()), "{}", text(&published.stdout));
    let published =
        output(bare_omni(elsewhere.path()).env("OMNI_TOPOLOGY", &file).args(["publish", &room, "tag-set", "k", "2"]));
    assert!(published.status.success(), "{}", text(&published.stderr));

    // The file's [kafka.properties] reach publish: a TLS setting against a plaintext broker fails it.
    let mut tls = topology.clone();
    tls.kafka.properties.insert("security.protocol".into(), "ssl".into());
    let tls_file = dir.path().join("tls.toml");
    write_topology(&tls, &tls_file);
    let refused = output(bare_omni(elsewhere.path()).args([
        "publish",
        "--topology",
        tls_file.to_str().unwrap(),
        "--delivery-timeout-secs",
        "5",
        &room,
        "tag-set",
        "k",
        "never",
    ]));
    assert!(!refused.status.success(), "publish over TLS to a plaintext broker succeeded");
    assert!(text(&refused.stderr).contains(&topology.kafka.brokers), "{}", text(&refused.stderr));

    // run: the file alone, JSON logs.
    let log = dir.path().join("run.log");
    let job = bare_omni(elsewhere.path())
        .args(["run", "--topology", file_arg, "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawning omni run");

    // snapshot: Redis URL and key prefix from the file.
    let snapshot = wait_for(Duration::from_secs(90), "omni snapshot --topology at version 2", || {
        let out = output(bare_omni(elsewhere.path()).args(["snapshot", "--topology", file_arg, "--json", &room]));
        async move {
            let json: Value = serde_json::from_slice(&out.stdout).ok()?;
            (json["version"] == 2).then_some(json)
        }
    })
    .await;
    assert_eq!(snapshot["tags"], serde_json::json!({"k": "2"}));

    // watch: brokers, broadcast topic, Redis and prefix from the file.
    let mut watch = bare_omni(elsewhere.path())
        .args(["watch", "--topology", file_arg, &format!("app/{}/room/>", topology.application_id)])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning omni watch");
    let lines = Lines::new(watch.stdout.take().unwrap());
    let first = lines.next(Duration::from_secs(60)).expect("omni watch --topology printed the room");
    assert!(first.contains(&room), "{first}");
    watch.kill().unwrap();
    watch.wait().unwrap();

    // JSON logs keep a partition list an array.
    let logged = std::fs::read_to_string(&log).unwrap();
    let assigned: Vec<Value> = logged
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "partitions assigned")
        .collect();
    assert!(!assigned.is_empty(), "no 'partitions assigned' line:\n{logged}");
    assert!(assigned.iter().all(|l| l["fields"]["partitions"].is_array()), "{assigned:?}");
    JobProcess { child: job, log }.terminate();

    // With no topology named and none in the directory: a message saying how to name one.
    let missing = output(bare_omni(elsewhere.path()).args(["snapshot", &room]));
    assert_eq!(missing.status.code(), Some(1));
    let err = text(&missing.stderr);
    assert!(
        err.contains("--topology") && err.contains("OMNI_TOPOLOGY") && err.contains("topologies/room-state.toml"),
        "{err}"
    );
    let missing =
        output(bare_omni(elsewhere.path()).args(["publish", "--topology", "nowhere.toml", &room, "room-close"]));
    assert!(text(&missing.stderr).contains("nowhere.toml"), "{}", text(&missing.stderr));
}

#[test]
fn every_command_that_reads_a_topology_validates_it_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let mut topology = Topology::with_defaults("validate-me", &["recording", "tagz"]);
    topology.kafka.brokers = "127.0.0.1:1".into();
    let file = dir.path().join("typo.toml");
    write_topology(&topology, &file);
    let f = file.to_str().unwrap();
    for args in [
        vec!["topology", "validate", f],
        vec!["topology", "describe", f],
        vec!["topology", "describe", "--topology", f, "--format", "mermaid"],
        vec!["run", "--topology", f, "--print-config"],
        vec!["run", "--topology", f],
        vec!["publish", "--topology", f, "app/a/room/r", "tag-set", "k", "v"],
        vec!["snapshot", "--topology", f, "app/a/room/r"],
        vec!["watch", "--topology", f, "app/a/room/r"],
        vec!["bench", "--topology", f],
    ] {
        let out = output(bare_omni(dir.path()).args(&args));
        assert_eq!(out.status.code(), Some(1), "omni {args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("unknown module \"tagz\""), "omni {args:?}: {}", text(&out.stderr));
    }
    topology.modules = vec!["recording".into(), "tags".into()];
    write_topology(&topology, &file);
    let out = output(bare_omni(dir.path()).args(["topology", "validate", f]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("valid: application validate-me"), "{}", text(&out.stdout));
    // The environment is a layer of the same configuration: an invalid one fails validation too.
    let out = output(bare_omni(dir.path()).env("OMNI_THREADS", "0").args(["topology", "validate", f]));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("instance.threads"), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_file_sends_every_line_once_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("pubfile", 4, &dir.path().join("state"));
    let file = dir.path().join("topology.toml");
    write_topology(&topology, &file);
    let (count, rooms) = (20_000, 50);
    let events = events_file(dir.path(), &topology.application_id, count, rooms);
    let started = Instant::now();
    let out =
        output(bare_omni(dir.path()).args(["publish", "--topology", file.to_str().unwrap(), "--file"]).arg(&events));
    assert!(out.status.success(), "{}", text(&out.stderr));
    eprintln!("omni publish --file: {count} lines in {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(text(&out.stdout).trim(), format!("published {count} events to {}", topology.input_topic()));
    assert_published_once_in_order(&services().brokers, topology.input_topic(), count, rooms);
}

#[test]
fn exit_codes_are_distinct_and_documented() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("exitcodes", 1, &dir.path().join("state"));
    let file = dir.path().join("topology.toml");
    write_topology(&topology, &file);
    let unknown =
        output(bare_omni(dir.path()).args(["snapshot", "--topology", file.to_str().unwrap(), "app/x/room/none"]));
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown.stderr));
    assert!(text(&unknown.stderr).contains("not known"));
    for usage in [vec!["snapshot"], vec!["publish", "--bogus"], vec!["topology", "describe", "--format", "svg"]] {
        let out = output(bare_omni(dir.path()).args(&usage));
        assert_eq!(out.status.code(), Some(64), "usage error {usage:?}: {}", text(&out.stderr));
    }
    let help = output(bare_omni(dir.path()).arg("--help"));
    assert_eq!(help.status.code(), Some(0));
    assert!(text(&help.stdout)
        .contains("Exit codes: 0 success; 1 error; 2 `omni snapshot` of a room Redis does not know; 64 usage error"));
}

#[test]
fn every_flag_has_help_and_connection_flags_appear_only_where_they_apply() {
    let dir = tempfile::tempdir().unwrap();
    let help = |args: &[&str]| {
        let out = output(bare_omni(dir.path()).args(args).arg("--help"));
        assert!(out.status.success(), "{args:?} --help");
        text(&out.stdout)
    };
    let commands: [&[&str]; 13] = [
        &[],
        &["run"],
        &["demo"],
        &["publish"],
        &["publish", "recording-start"],
        &["publish", "recording-stop"],
        &["publish", "tag-set"],
        &["publish", "tag-remove"],
        &["watch"],
        &["snapshot"],
        &["topology", "validate"],
        &["topology", "describe"],
        &["bench"],
    ];
    for command in commands {
        let text = help(command);
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            let is_arg = (2..=6).contains(&indent)
                && (trimmed.starts_with('-') || trimmed.starts_with('<') || trimmed.starts_with('['));
            if is_arg {
                let next = lines.get(i + 1).copied().unwrap_or_default();
                assert!(
                    next.len() > 10 && next.starts_with("          ") && !next.trim().is_empty(),
                    "omni {} --help: {trimmed} has no help text:\n{text}",
                    command.join(" ")
                );
            }
        }
    }
    let has = |text: &str, flag: &str| text.lines().any(|l| l.trim_start().starts_with(flag));
    let run = help(&["run"]);
    for flag in ["--topology", "--brokers", "--redis-url", "--key-prefix", "--state-dir", "--instance-id"] {
        assert!(has(&run, flag), "run lacks {flag}");
    }
    for (command, absent) in [
        (&["topology", "describe"][..], &["--brokers", "--redis-url", "--key-prefix"][..]),
        (&["topology", "validate"][..], &["--brokers", "--redis-url", "--key-prefix"][..]),
        (&["demo"][..], &["--brokers", "--redis-url", "--key-prefix", "--topology"][..]),
        (&["publish"][..], &["--redis-url", "--key-prefix"][..]),
        (&["snapshot"][..], &["--brokers"][..]),
    ] {
        let text = help(command);
        for flag in absent {
            assert!(!has(&text, flag), "omni {} --help shows {flag}, which it does not use", command.join(" "));
        }
    }
}

#[test]
fn the_msrv_is_what_the_locked_dependencies_need_and_the_licence_is_there() {
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap()).unwrap();
    let declared = manifest["package"]["rust-version"].as_str().expect("rust-version").to_owned();
    let platform = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let metadata = Command::new(option_env!("CARGO").unwrap_or("cargo"))
        .args(["metadata", "--format-version", "1", "--locked", "--filter-platform", &platform])
        .current_dir(repo_root())
        .output()
        .expect("cargo metadata");
    assert!(metadata.status.success(), "{}", text(&metadata.stderr));
    let metadata: Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let resolved: std::collections::BTreeSet<&str> =
        metadata["resolve"]["nodes"].as_array().unwrap().iter().filter_map(|n| n["id"].as_str()).collect();
    let version = |text: &str| -> Vec<u64> {
        let mut parts: Vec<u64> = text.split('.').map(|p| p.parse().unwrap()).collect();
        parts.resize(3, 0);
        parts
    };
    let (needed, by) = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| resolved.contains(id)))
        .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].as_str()?.to_owned())))
        .max()
        .expect("some dependency declares a rust-version");
    assert_eq!(version(&declared), needed, "rust-version {declared}, but {by} needs {needed:?}");

    assert_eq!(manifest["package"]["license"].as_str(), Some("Apache-2.0"));
    let licence = std::fs::read_to_string(repo_root().join("LICENSE")).expect("a LICENSE file");
    assert!(licence.trim_start().starts_with("Apache License") && licence.contains("Version 2.0, January 2004"));
}

/// Every event of `file`'s `count` lines (`event_id` `e<line>`, rooms `r<line % rooms>`)
/// is in `topic` once, each room's in the file's order.
pub fn assert_published_once_in_order(brokers: &str, topic: &str, count: usize, rooms: usize) {
    let read = read_committed_at(brokers, topic, count, Duration::from_secs(60));
    assert_eq!(read.len(), count, "every line published");
    // Then nothing beyond them: no line published twice.
    let again = read_committed_at(brokers, topic, count + 1, Duration::from_secs(3));
    assert_eq!(again.len(), count, "no line published twice");
    let mut per_room: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for record in &read {
        let value = record.value.as_deref().expect("a value");
        let event: omni::proto::tecate::RoomEvent = omni::proto::Message::decode(value).unwrap();
        let index: usize = event.event_id.trim_start_matches('e').parse().unwrap();
        per_room.entry(text(record.key.as_deref().expect("a key"))).or_default().push(index);
    }
    assert_eq!(per_room.len(), rooms);
    for (room, indexes) in per_room {
        assert!(indexes.windows(2).all(|w| w[0] < w[1]), "{room} out of order");
    }
}

pub fn events_file(dir: &FsPath, app: &str, count: usize, rooms: usize) -> std::path::PathBuf {
    let lines: String = (0..count)
        .map(|i| {
            format!(
                "{{\"path\":\"app/{app}/room/r{}\",\"type\":\"tag_set\",\"key\":\"k\",\"value\":\"{i}\",\"event_id\":\"e{i}\"}}\n",
                i % rooms
            )
        })
        .collect();
    let file = dir.join(format!("{app}-{count}.jsonl"));
    std::fs::write(&file, lines).unwrap();
    file
}
