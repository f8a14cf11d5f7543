//! What an operator meets (issue 14): unreachable brokers named by
//! `publish` and `omni run` (and `/readyz`), `publish` through a broker
//! restart, Redis trouble in `/readyz/redis` with gauges back to 0 after it,
//! and Ctrl-C of the demo with no child left behind.

use std::os::unix::process::CommandExt;
use std::path::Path as FsPath;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::newcomer::{assert_published_once_in_order, bare_omni, events_file, line_where, signal, wait_exit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_fail_publish_and_make_run_warn_and_readyz_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("unreachable", 2, &dir.path().join("state"));
    topology.kafka.brokers = "127.0.0.1:1".into();
    let file = dir.path().join("topology.toml");
    write_topology(&topology, &file);
    let f = file.to_str().unwrap();

    let mut publish = bare_omni(dir.path())
        .args(["publish", "--topology", f, "--delivery-timeout-secs", "5", "app/a/room/r", "tag-set", "k", "v"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut publish, Duration::from_secs(60)).expect("publish to unreachable brokers ended");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut publish.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("127.0.0.1:1"), "the error names the brokers: {err}");

    let addr = format!("127.0.0.1:{}", pick_free_port());
    let mut run = bare_omni(dir.path())
        .args(["run", "--topology", f, "--http-listen", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Lines::new(run.stderr.take().unwrap());
    let mut seen = Vec::new();
    let warns = |l: &str| l.contains("WARN") && l.contains("unreachable") && l.contains("127.0.0.1:1");
    let first = line_where(&lines, Duration::from_secs(30), &mut seen, warns);
    assert!(first.is_some(), "no warning naming the brokers:\n{}", seen.join("\n"));
    let (code, body) = http_get(&addr, "/readyz").await.expect("/readyz answers");
    assert_eq!(code, 503);
    assert!(body.contains("127.0.0.1:1") && body.contains("unreachable"), "/readyz says why: {body}");
    // Repeated, with back-off.
    let again = line_where(&lines, Duration::from_secs(30), &mut seen, warns);
    assert!(again.is_some_and(|l| l.contains("retrying in 2 s")), "{}", seen.join("\n"));
    // Logs to a pipe carry no colour codes.
    assert!(seen.iter().all(|l| !l.contains('\u{1b}')), "ANSI codes in piped logs:\n{}", seen.join("\n"));
    signal(&run.id().to_string(), "TERM");
    let status =
        wait_exit(&mut run, Duration::from_secs(10)).expect("omni run stops on SIGTERM while waiting for brokers");
    assert!(status.success(), "{status}");
}

#[test]
fn ctrl_c_stops_the_demo_within_seconds_and_its_redis_with_it() {
    // (signals, how long the demo may take to exit, its exit code if it must be one)
    for (signals, within, code) in [
        (&["INT"][..], Duration::from_secs(10), Some(0)),
        (&["INT", "INT"][..], Duration::from_secs(3), Some(130)),
        (&["KILL"][..], Duration::from_secs(3), None),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut demo = bare_omni(dir.path())
            .args(["demo", "--rate", "50"])
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning omni demo");
        let lines = Lines::new(demo.stdout.take().unwrap());
        let mut seen = Vec::new();
        let redis = line_where(&lines, Duration::from_secs(30), &mut seen, |l| l.starts_with("demo: redis-server on "))
            .unwrap_or_else(|| {
                panic!("the demo started no redis-server (bootstrap.sh installs it):\n{}", seen.join("\n"))
            });
        let port = redis.rsplit(':').next().unwrap().to_owned();
        let shown = line_where(&lines, Duration::from_secs(60), &mut seen, |l| l.starts_with("room "));
        assert!(shown.is_some(), "the demo showed no room:\n{}", seen.join("\n"));
        let group = format!("-{}", demo.id());
        for (i, name) in signals.iter().enumerate() {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            signal(&group, name);
        }
        let status = wait_exit(&mut demo, within)
            .unwrap_or_else(|| panic!("the demo did not stop within {within:?} of {signals:?}"));
        if let Some(code) = code {
            assert_eq!(status.code(), Some(code), "after {signals:?}");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok() {
            assert!(Instant::now() < deadline, "the demo's redis-server outlived it after {signals:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Waits until `topic` holds at least one record: the publish is under way.
fn wait_for_first_record(brokers: &str, topic: &str) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let landed =
            (0..2).any(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(5)).is_ok_and(|(_, high)| high > 0));
        if landed {
            return;
        }
        assert!(Instant::now() < deadline, "nothing reached {topic} within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `omni publish --file` through a broker restart (on the outage services):
/// it rides out a restart within its delivery timeout, every event once and
/// in order; a broker down for longer fails it with a clear error, promptly.
#[test]
fn broker_outage_publish_retries_within_its_delivery_timeout_then_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let topology = outage_topology("pubout", 2, &dir.path().join("state"));
    let file = dir.path().join("topology.toml");
    write_topology(&topology, &file);
    let brokers = topology.kafka.brokers.clone();
    let (count, rooms) = (400_000, 100);
    let publish = |events: &FsPath, timeout_secs: &str| {
        bare_omni(dir.path())
            .args(["publish", "--topology", file.to_str().unwrap(), "--delivery-timeout-secs", timeout_secs])
            .arg("--file")
            .arg(events)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning omni publish")
    };

    // A restart of a few seconds, within the delivery timeout: the publish completes, exactly.
    let first = events_file(dir.path(), "restart", count, rooms);
    let mut child = publish(&first, "120");
    wait_for_first_record(&brokers, topology.input_topic());
    outage_broker("stop");
    assert!(child.try_wait().unwrap().is_none(), "the publish ended before the broker stopped: give it more lines");
    std::thread::sleep(Duration::from_secs(3));
    outage_broker("start");
    let status = wait_exit(&mut child, Duration::from_secs(150)).expect("publish ends within its delivery timeout");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "publish through a broker restart: {status}: {err}");
    assert_published_once_in_order(&brokers, topology.input_topic(), count, rooms);

    // Down for longer than the delivery timeout: a clear error, and an exit soon after the timeout.
    let mut second = topology.clone();
    second.inputs = vec![format!("{}.second", topology.application_id)];
    write_topology(&second, &file);
    let events = events_file(dir.path(), "down", count, rooms);
    let mut child = publish(&events, "10");
    wait_for_first_record(&brokers, second.input_topic());
    outage_broker("stop");
    let stopped = Instant::now();
    let ended = wait_exit(&mut child, Duration::from_secs(60));
    outage_broker("start");
    let status = ended.expect("publish to a broker gone for good ends within its delivery timeout and a margin");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&brokers) && err.contains("not delivered") && err.contains("(10 s)"), "{err}");
    eprintln!("publish failed {:.1} s after the broker stopped: {}", stopped.elapsed().as_secs_f64(), err.trim());
}

/// Redis stopped under a running `omni run`, then started again: the
/// connection failures are counted, `/readyz/redis` says what is wrong while
/// `/readyz` stays ready (processing goes on), and once Redis is back every
/// gauge returns to 0 and Redis holds every room exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_trouble_shows_in_readyz_redis_and_the_backlog_returns_to_zero() {
    let dir = tempfile::tempdir().unwrap();
    let port = pick_free_port();
    let redis = ScratchRedis::start_on(&dir.path().join("redis"), port);
    let mut topology = fresh_topology("redisdown", 2, &dir.path().join("state"));
    topology.redis.url = redis.url("");
    create_input(&topology).await;
    let file = dir.path().join("topology.toml");
    write_topology(&topology, &file);
    let folder = folder(&["recording", "tags"]);
    let events = generate(14, 2000, 100);
    let expected = model(&folder, &events);
    let producer = producer();

    let addr = format!("127.0.0.1:{}", pick_free_port());
    let log = dir.path().join("run.log");
    let child = bare_omni(dir.path())
        .args(["run", "--topology", file.to_str().unwrap(), "--http-listen", &addr])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawning omni run");
    let job = JobProcess { child, log };
    let get = |path: &'static str| {
        let addr = addr.clone();
        async move { http_get(&addr, path).await.map(|(status, body)| (status, body.trim().to_owned())) }
    };
    wait_for(Duration::from_secs(90), "/readyz 200", || async { get("/readyz").await.filter(|r| r.0 == 200) }).await;
    assert_eq!(get("/readyz/redis").await, Some((200, "redis: ok".to_owned())));
    produce(&producer, topology.input_topic(), &events[..1000]);
    let metric = |name: &'static str| async move { metric_sum(&get("/metrics").await?.1, name) };
    wait_for(Duration::from_secs(60), "the first half written", || async {
        (metric("omni_redis_rooms_written_total").await? > 0.0 && metric("omni_redis_backlog_rooms").await? == 0.0)
            .then_some(())
    })
    .await;
    let errors_before = metric("omni_redis_write_errors_total").await.expect("write errors counted");

    drop(redis);
    produce(&producer, topology.input_topic(), &events[1000..]);
    let (_, why) = wait_for(Duration::from_secs(60), "/readyz/redis 503", || async {
        get("/readyz/redis").await.filter(|r| r.0 == 503)
    })
    .await;
    assert!(why.starts_with("redis: writes failing for ") && why.contains("rooms waiting"), "{why}");
    let ready = get("/readyz").await.expect("/readyz answers");
    assert_eq!(ready.0, 200, "processing goes on without Redis: {ready:?}");
    assert!(ready.1.contains("redis: writes failing"), "{ready:?}");
    wait_for(Duration::from_secs(60), "a backlog and connection failures counted", || async {
        (metric("omni_redis_backlog_rooms").await? > 0.0
            && metric("omni_redis_write_errors_total").await? > errors_before)
            .then_some(())
    })
    .await;

    let _redis = ScratchRedis::start_on(&dir.path().join("redis"), port);
    wait_for(Duration::from_secs(90), "Redis caught up: gauges at 0, /readyz/redis ok", || async {
        let caught_up = metric("omni_redis_backlog_rooms").await? == 0.0
            && metric("omni_redis_backlog_bytes").await? == 0.0
            && get("/readyz/redis").await? == (200, "redis: ok".to_owned());
        caught_up.then_some(())
    })
    .await;
    assert_eq!(get("/readyz").await, Some((200, "ready: 2 partitions".to_owned())));
    assert_redis_exact(&topology, &folder, &expected).await;
    job.terminate();
}
