//! Operations: a Redis user restricted by ACL to the job's key prefix, a
//! clear start-up failure on bad Redis credentials, and the `omni run`
//! process's metrics, readiness and JSON logs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use omni::modules::Registry;
use omni::runtime::Health;

use crate::common::*;

/// A Redis whose default user is off, with an `omni` user (password `pw`)
/// that may touch only `<prefix>:*` keys and no dangerous commands.
async fn acl_redis(dir: &std::path::Path, prefix: &str) -> ScratchRedis {
    let redis = ScratchRedis::start(dir);
    let client = redis::Client::open(redis.url("")).unwrap();
    let mut conn = redis_connection(&client).await;
    let acl = |args: &[&str]| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER");
        for a in args {
            cmd.arg(*a);
        }
        cmd
    };
    let pattern = format!("~{prefix}:*");
    for args in [
        vec!["admin", "on", ">adminpw", "~*", "&*", "+@all"],
        vec!["omni", "on", ">pw", &pattern, "+@all", "-@dangerous"],
        vec!["default", "off"],
    ] {
        acl(&args).query_async::<()>(&mut conn).await.unwrap_or_else(|e| panic!("ACL SETUSER {args:?}: {e}"));
    }
    redis
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_limited_to_the_key_prefix_is_all_the_job_needs() {
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("acl", 3, &dir.path().join("state"));
    let prefix = topology.redis.key_prefix.clone();
    let redis = acl_redis(&dir.path().join("redis"), &prefix).await;
    topology.redis.url = redis.url("omni:pw");

    // The restrictions are in force: no anonymous access, no keys outside the prefix.
    let anonymous = redis::Client::open(redis.url("")).unwrap();
    let mut conn = redis_connection(&anonymous).await;
    let denied = redis::cmd("PING").query_async::<String>(&mut conn).await.unwrap_err();
    assert!(denied.to_string().contains("NOAUTH"), "{denied}");
    let omni_user = redis::Client::open(topology.redis.url.as_str()).unwrap();
    let mut conn = redis_connection(&omni_user).await;
    let outside = redis::cmd("SET").arg("elsewhere:x").arg("1").query_async::<()>(&mut conn).await.unwrap_err();
    assert!(outside.to_string().to_lowercase().contains("noperm"), "{outside}");

    create_input(&topology).await;
    let events = generate(31, 1500, 40);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    produce(&producer(), topology.input_topic(), &events);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    // Read back as the restricted user.
    assert_redis_exact(&topology, &folder, &expected).await;
    job.stop().await;

    let admin = redis::Client::open(redis.url("admin:adminpw")).unwrap();
    let mut conn = redis_connection(&admin).await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
    assert!(keys.len() >= expected.rooms.len(), "one hash or stream per room at least, got {}", keys.len());
    let ours = |k: &String| k.starts_with(&format!("{prefix}:room:{{")) || k.starts_with(&format!("{prefix}:writer:"));
    assert!(keys.iter().all(ours), "keys outside the prefix: {keys:?}");
    let denials: Vec<redis::Value> = redis::cmd("ACL").arg("LOG").query_async(&mut conn).await.unwrap();
    for denial in &denials {
        // Only what this test did on purpose was refused, never the job.
        let text = format!("{denial:?}");
        assert!(text.contains("elsewhere:x") || !text.contains("omni"), "the job hit an ACL denial: {text}");
    }
}

/// Runs the job with `url` and expects it to fail at start-up, quickly, over authentication.
async fn expect_auth_failure(topology: &omni::topology::Topology, url: String) {
    let mut topology = topology.clone();
    topology.redis.url = url.clone();
    let started = Instant::now();
    let run =
        omni::runtime::run(topology, Registry::with_builtins(), Arc::new(Health::default()), std::future::pending());
    let result = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| panic!("the job with {url} neither failed nor stopped within 30 s"));
    let error = result.expect_err("start-up with bad Redis credentials fails").to_string();
    tracing::info!(url, %error, elapsed = ?started.elapsed(), "start-up refused");
    let lower = error.to_lowercase();
    assert!(lower.contains("redis"), "the error names Redis: {error}");
    assert!(
        lower.contains("auth") || error.contains("WRONGPASS") || error.contains("NOAUTH"),
        "the error names the authentication problem: {error}"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_redis_credentials_fail_start_up_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("badauth", 2, &dir.path().join("state"));
    let redis = acl_redis(&dir.path().join("redis"), &topology.redis.key_prefix).await;
    expect_auth_failure(&topology, redis.url("omni:wrong-password")).await;
    expect_auth_failure(&topology, redis.url("nobody:pw")).await;
    // No credentials at all while the default user is off.
    expect_auth_failure(&topology, redis.url("")).await;
    assert!(!topology.store.dir.join("CURRENT").exists(), "the store is not opened when start-up fails");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omni_run_serves_metrics_readiness_after_restore_and_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("opsrun", 3, &dir.path().join("state-a"));
    create_input(&topology).await;
    let events = generate(32, 2000, 40);
    let folder = folder(&["recording", "tags"]);
    let first = model(&folder, &events[..1000]);
    let expected = model(&folder, &events);
    let producer = producer();

    // A first instance builds state, so the process below must restore it from the changelog.
    produce(&producer, topology.input_topic(), &events[..1000]);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    read_broadcast(&topology.broadcast_topic, first.total_changes);
    job.stop().await;

    let mut second = topology.clone();
    second.store.dir = dir.path().join("state-b");
    let file = dir.path().join("topology.toml");
    write_topology(&second, &file);
    let addr = format!("127.0.0.1:{}", pick_free_port());
    let log = dir.path().join("omni.log");
    let mut child = omni_cli()
        .args(["run", "--topology", file.to_str().unwrap(), "--http-listen", &addr, "--log-format", "json"])
        .env("OMNI_LOG", "info")
        .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawning omni run");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // Poll /readyz until it says ready; take /metrics at that moment.
    let mut statuses = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let (body, metrics_at_ready) = loop {
        assert!(Instant::now() < deadline, "/readyz never answered 200 (saw {statuses:?}):\n{}", log_text());
        if let Some(exited) = child.try_wait().unwrap() {
            panic!("omni run exited with {exited}:\n{}", log_text());
        }
        if let Some((code, body)) = http_get(&addr, "/readyz").await {
            statuses.push(code);
            if code == 200 {
                let metrics = http_get(&addr, "/metrics").await.expect("/metrics answers").1;
                break (body, metrics);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tracing::info!(?statuses, "/readyz answers until ready");
    assert!(statuses.iter().all(|&s| s == 200 || s == 503), "/readyz answered {statuses:?}");
    assert_eq!(statuses.first(), Some(&503), "not ready while joining and restoring");
    assert_eq!(body.trim(), "ready: 3 partitions");
    let restored = metric_sum(&metrics_at_ready, "omni_restored_records_total").expect("restored records metric");
    assert!(
        restored >= first.rooms.len() as f64,
        "ready only after restoring every room: {restored} records restored for {} rooms",
        first.rooms.len()
    );
    assert_eq!(metric_sum(&metrics_at_ready, "omni_assigned_partitions"), Some(3.0));

    produce(&producer, topology.input_topic(), &events[1000..]);
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;

    let (status, metrics) = http_get(&addr, "/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200);
    for name in [
        "omni_events_consumed_total",
        "omni_changes_emitted_total",
        "omni_redis_rooms_written_total",
        "omni_commit_seconds",
        "omni_consumer_lag",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
    }
    assert!(metrics.contains("# HELP omni_events_consumed_total"), "{metrics}");
    let consumed = metric_sum(&metrics, "omni_events_consumed_total").unwrap();
    assert!(consumed >= 1000.0, "the process consumed the second half: {consumed}");
    let emitted = metric_sum(&metrics, "omni_changes_emitted_total").unwrap() as usize;
    // Module changes and room closes (counted under module `room`) alike.
    let own = expected.total_changes - first.total_changes;
    if metric_sum(&metrics, "omni_transaction_aborts_total") == Some(0.0) {
        assert_eq!(emitted, own, "changes emitted by this process");
    } else {
        assert!(emitted >= own, "changes emitted by this process: {emitted} < {own}");
    }
    assert_eq!(http_get(&addr, "/healthz").await.map(|(s, b)| (s, b.trim().to_owned())), Some((200, "ok".into())));

    JobProcess { child, log: log.clone() }.terminate();
    let text = log_text();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "some log lines: {text}");
    for line in &lines {
        assert!(line["level"].is_string() && line["timestamp"].is_string(), "{line}");
        assert!(line["fields"]["message"].is_string(), "{line}");
    }
    assert!(
        lines.iter().any(|l| l["fields"]["message"].as_str().is_some_and(|m| m.contains(&addr))),
        "the endpoint address is logged"
    );
    assert!(lines.iter().any(|l| l["fields"]["message"] == "partition restored"), "restores are logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_counts_the_backlog_and_returns_to_zero_once_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("lag", 4, &dir.path().join("state"));
    create_input(&topology).await;
    let events = generate(33, 20_000, 200);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    // The backlog is there before the job starts.
    produce(&producer(), topology.input_topic(), &events);
    let file = dir.path().join("topology.toml");
    write_topology(&topology, &file);
    let addr = format!("127.0.0.1:{}", pick_free_port());
    let log = dir.path().join("omni.log");
    let child = omni_cli()
        .args(["run", "--topology", file.to_str().unwrap(), "--http-listen", &addr])
        .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawning omni run");
    let job = JobProcess { child, log };
    read_broadcast(&topology.broadcast_topic, expected.total_changes);
    let lag = wait_for(Duration::from_secs(30), "every partition's lag measured and 0", || {
        let addr = addr.clone();
        async move {
            let metrics = http_get(&addr, "/metrics").await?.1;
            let partitions = metrics.lines().filter(|l| l.starts_with("omni_consumer_lag{")).count();
            let sum = metric_sum(&metrics, "omni_consumer_lag")?;
            (partitions == 4 && sum == 0.0).then_some(metrics)
        }
    })
    .await;
    assert!(
        !lag.lines().any(|l| l.starts_with("omni_consumer_lag ")),
        "no unlabeled lag series beside the partitions' ones"
    );
    job.terminate();
}
