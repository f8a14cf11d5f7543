//! The deploy files against the real thing: every metric the Grafana
//! dashboard and the Prometheus alert rules name is in a real `omni run`
//! scrape (with the process metrics and the build info); `omni health`, the
//! image's health check, tells healthy from unhealthy and unreachable; and
//! what the Dockerfile copies is there. (The manifests' schemas and the
//! PromQL syntax are checked by integration/check-deploy.sh; Docker itself is
//! not available to the tests.)

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use omni::topology::Topology;

use crate::common::*;

/// An `omni run` process, killed if the test ends without stopping it.
struct OmniProcess {
    child: Child,
    log: PathBuf,
}

impl OmniProcess {
    fn spawn(topology: &Topology, dir: &Path) -> OmniProcess {
        let file = dir.join("topology.toml");
        write_topology(topology, &file);
        let log = dir.join("omni.log");
        let child = omni_cli()
            .args(["run", "--topology", file.to_str().unwrap()])
            // The file says where Kafka is: an unreachable broker stays unreachable.
            .env_remove("OMNI_BROKERS")
            .env_remove("OMNI_REDIS_URL")
            .stdout(std::fs::File::create(dir.join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning omni run");
        OmniProcess { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("omni run exited with {status}:\n{}", self.log_text());
        }
    }
}

impl Drop for OmniProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A topology whose operations endpoint is on a known free loopback port.
fn topology_on_port(name: &str, dir: &Path) -> (Topology, String) {
    let mut topology = fresh_topology(name, 2, &dir.join("state"));
    let addr = format!("127.0.0.1:{}", pick_free_port());
    topology.http.listen = addr.clone();
    (topology, addr)
}

/// `omni health` with these arguments, its environment free of `OMNI_*`.
fn omni_health(args: &[&str]) -> Output {
    omni_cli().arg("health").args(args).env_remove("OMNI_BROKERS").env_remove("OMNI_REDIS_URL").output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every omni_* and process_* name in a file: the metric names, since labels,
/// functions and alert names (CamelCase) never start so.
fn metric_names_in(file: &str) -> Vec<String> {
    let content = std::fs::read_to_string(repo_root().join(file)).unwrap();
    let mut names: Vec<String> = content
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.starts_with("omni_") || token.starts_with("process_"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The names with at least one sample in a Prometheus text scrape.
fn sampled_names(scrape: &str) -> std::collections::BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The value of the one sample whose name and labels start a line with `series`.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_the_alert_rules_is_in_a_real_scrape() {
    let dashboard = metric_names_in("deploy/grafana/omni.json");
    let alerts = metric_names_in("deploy/prometheus/alerts.yaml");
    // Each file covers what the issue asks of it, so an emptied file cannot pass.
    for (file, names, wanted) in [
        (
            "omni.json",
            &dashboard,
            &[
                "omni_events_consumed_total",
                "omni_consumer_lag",
                "omni_commit_seconds_bucket",
                "omni_redis_backlog_rooms",
                "omni_restore_remaining_records",
                "omni_dead_letters_total",
                "omni_producer_rebuilds_total",
            ][..],
        ),
        (
            "alerts.yaml",
            &alerts,
            &[
                "omni_consumer_lag",
                "omni_dead_letters_total",
                "omni_redis_backlog_rooms",
                "omni_producer_rebuilds_total",
                "omni_ready",
            ][..],
        ),
    ] {
        for name in wanted {
            assert!(names.iter().any(|n| n == name), "{file} does not use {name}: {names:?}");
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let (topology, addr) = topology_on_port("deployscrape", dir.path());
    create_input(&topology).await;
    // Events for every module, and a record without a key, so the labeled
    // series (per module, per dead-letter kind) exist too.
    let events = generate(41, 300, 20);
    let producer = producer();
    produce(&producer, topology.input_topic(), &events);
    produce_raw(&producer, topology.input_topic(), None, Some(b"not a room event"));
    let mut job = OmniProcess::spawn(&topology, dir.path());

    let mut wanted: Vec<String> = dashboard.iter().chain(&alerts).cloned().collect();
    wanted.extend(
        [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
            "process_threads",
            "omni_build_info",
        ]
        .map(str::to_owned),
    );
    wanted.sort();
    wanted.dedup();
    let deadline = Instant::now() + Duration::from_secs(90);
    let scrape = loop {
        job.assert_running();
        let scrape = http_get(&addr, "/metrics").await.filter(|(status, _)| *status == 200).map(|(_, body)| body);
        let missing: Vec<&String> = match &scrape {
            Some(scrape) => {
                let present = sampled_names(scrape);
                wanted.iter().filter(|name| !present.contains(*name)).collect()
            }
            None => wanted.iter().collect(),
        };
        let ready = http_get(&addr, "/readyz").await.is_some_and(|(status, _)| status == 200);
        match scrape {
            Some(scrape) if missing.is_empty() && ready => break scrape,
            _ => assert!(
                Instant::now() < deadline,
                "after 90 s, the scrape still lacks {missing:?} (ready: {ready}):\n{}",
                job.log_text()
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(sample(&scrape, &format!("omni_build_info{{version=\"{version}\"}}")), Some(1.0), "{scrape}");
    let rss = sample(&scrape, "process_resident_memory_bytes").unwrap();
    assert!(rss > 4e6 && rss < 4e9, "a plausible RSS: {rss}");
    assert!(sample(&scrape, "process_resident_memory_max_bytes").unwrap() >= rss);
    assert!(sample(&scrape, "process_cpu_seconds_total").unwrap() > 0.0);
    assert!(sample(&scrape, "process_threads").unwrap() >= 2.0);
    let open = sample(&scrape, "process_open_fds").unwrap();
    assert!(open >= 3.0 && open <= sample(&scrape, "process_max_fds").unwrap(), "{open} open fds");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let started = sample(&scrape, "process_start_time_seconds").unwrap();
    assert!(started <= now + 1.0 && started > now - 300.0, "started at {started}, now {now}");
    // Scraped once /readyz said ready.
    assert_eq!(sample(&scrape, "omni_ready"), Some(1.0));
    // Histograms are rendered as such, so the dashboard's _bucket queries have data.
    assert!(scrape.contains("# TYPE omni_commit_seconds histogram"), "{scrape}");

    // The image's health check agrees with the endpoint.
    let healthy = omni_health(&["--addr", &addr]);
    assert_eq!(healthy.status.code(), Some(0), "{}", text(&healthy.stderr));
    assert_eq!(text(&healthy.stdout).trim(), "ok");
    let ready = omni_health(&["--addr", &addr, "--ready"]);
    assert_eq!(ready.status.code(), Some(0), "{}", text(&ready.stderr));
    assert!(text(&ready.stdout).starts_with("ready: 2 partitions"), "{}", text(&ready.stdout));
    // As in the image: the address from OMNI_HTTP_LISTEN, a wildcard host asked on loopback.
    let port = addr.rsplit_once(':').unwrap().1;
    let from_env = omni_cli().args(["health"]).env("OMNI_HTTP_LISTEN", format!("0.0.0.0:{port}")).output().unwrap();
    assert_eq!(from_env.status.code(), Some(0), "{}", text(&from_env.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_cannot_reach_kafka_is_alive_but_not_ready_for_metrics_and_omni_health() {
    let dir = tempfile::tempdir().unwrap();
    let (mut topology, addr) = topology_on_port("deploynotready", dir.path());
    topology.kafka.brokers = format!("127.0.0.1:{}", pick_free_port());
    let mut job = OmniProcess::spawn(&topology, dir.path());
    let scrape = wait_for(Duration::from_secs(30), "/metrics answering", || {
        let addr = addr.clone();
        async move { http_get(&addr, "/metrics").await.filter(|(status, _)| *status == 200).map(|(_, body)| body) }
    })
    .await;
    job.assert_running();
    assert_eq!(sample(&scrape, "omni_ready"), Some(0.0), "{scrape}");

    let alive = omni_health(&["--addr", &addr]);
    assert_eq!(alive.status.code(), Some(0), "alive: {}", text(&alive.stderr));
    let not_ready = omni_health(&["--addr", &addr, "--ready"]);
    assert_eq!(not_ready.status.code(), Some(1), "not ready: {}", text(&not_ready.stdout));
    let message = text(&not_ready.stderr);
    assert!(message.contains(&format!("http://{addr}/readyz")) && message.contains("503"), "{message}");
    assert!(message.contains("not ready"), "the endpoint's reason is shown: {message}");
}

/// A one-connection-at-a-time HTTP server answering every request with `response`
/// (or, with `None`, reading the request and never answering).
fn fake_endpoint(response: Option<String>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            match &response {
                Some(response) => {
                    let _ = stream.write_all(response.as_bytes());
                }
                None => held.push(stream),
            }
        }
    });
    addr
}

#[test]
fn omni_health_fails_with_a_message_when_the_endpoint_is_unhealthy_silent_or_unreachable() {
    let body = "stalled: processing thread 0 has been committing for 130 s\n";
    let stalled = fake_endpoint(Some(format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )));
    let unhealthy = omni_health(&["--addr", &stalled]);
    assert_eq!(unhealthy.status.code(), Some(1));
    let message = text(&unhealthy.stderr);
    assert!(message.contains("503") && message.contains(body.trim()), "{message}");
    assert!(message.contains(&format!("http://{stalled}/healthz")), "{message}");

    let silent = fake_endpoint(None);
    let started = Instant::now();
    let timed_out = omni_health(&["--addr", &silent, "--timeout-secs", "1"]);
    assert_eq!(timed_out.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(10), "gave up after {:?}", started.elapsed());
    assert!(text(&timed_out.stderr).contains("did not answer within 1 s"), "{}", text(&timed_out.stderr));

    let closed = format!("127.0.0.1:{}", pick_free_port());
    let unreachable = omni_health(&["--addr", &closed]);
    assert_eq!(unreachable.status.code(), Some(1));
    let message = text(&unreachable.stderr);
    assert!(message.contains(&closed) && message.to_lowercase().contains("refused"), "{message}");

    let garbage = fake_endpoint(Some("SSH-2.0-OpenSSH_9.6\r\n".into()));
    let not_http = omni_health(&["--addr", &garbage]);
    assert_eq!(not_http.status.code(), Some(1));
    assert!(text(&not_http.stderr).contains("did not answer HTTP"), "{}", text(&not_http.stderr));
}

/// The sources of the Dockerfile's `COPY` instructions that come from the
/// build context (not `--from` another stage).
fn dockerfile_context_sources(dockerfile: &str) -> Vec<String> {
    dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COPY "))
        .filter(|args| !args.trim_start().starts_with("--from"))
        .flat_map(|args| {
            let words: Vec<&str> = args.split_whitespace().collect();
            words[..words.len() - 1].iter().map(|w| w.to_string()).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn what_the_dockerfile_copies_and_runs_exists() {
    let root = repo_root();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let ignored: Vec<String> = std::fs::read_to_string(root.join(".dockerignore"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let sources = dockerfile_context_sources(&dockerfile);
    for wanted in ["Cargo.toml", "Cargo.lock", "build.rs", "src", "proto", "topologies"] {
        assert!(sources.iter().any(|s| s == wanted), "the Dockerfile copies {wanted}: {sources:?}");
    }
    for source in &sources {
        assert!(root.join(source).exists(), "COPY {source}: no such file in the repository");
        let excluded = ignored.iter().any(|i| source == i || source.starts_with(&format!("{i}/")));
        assert!(!excluded, "COPY {source}, but .dockerignore leaves it out of the context");
    }
    assert!(ignored.iter().any(|i| i == "target"), "the build directory stays out of the context");
    // cargo-chef cooks the dependencies before the sources are copied.
    let cook = dockerfile.find("cargo chef cook").expect("a cargo chef cook step");
    assert!(cook < dockerfile.find("COPY src src\nRUN cargo build").expect("sources, then the build"));
    // Base images pinned to exact versions, not floating tags.
    for from in dockerfile.lines().filter_map(|l| l.strip_prefix("FROM ")) {
        let image = from.split_whitespace().next().unwrap();
        if let Some((_, tag)) = image.split_once(':') {
            assert!(tag.chars().next().unwrap().is_ascii_digit() && tag.matches('.').count() >= 1, "{image}");
            assert!(!tag.starts_with("1-") && tag != "latest", "{image} floats");
        } else {
            assert!(dockerfile.contains(&format!(" AS {image}")), "FROM {image}: neither pinned nor a stage");
        }
    }

    // The subcommands the image and compose run exist, as the image calls them.
    let healthcheck = dockerfile.lines().find(|l| l.starts_with("HEALTHCHECK")).expect("a HEALTHCHECK");
    assert!(healthcheck.contains(r#"CMD ["omni", "health""#), "{healthcheck}");
    for args in [&["health", "--help"][..], &["health", "--timeout-secs", "4", "--help"], &["run", "--help"]] {
        let out = omni_cli().args(args).output().unwrap();
        assert!(out.status.success(), "omni {args:?}: {}", text(&out.stderr));
    }
    let compose = std::fs::read_to_string(root.join("compose.yaml")).unwrap();
    assert!(compose.contains(r#"test: ["CMD", "omni", "health""#), "compose checks omni's health");
    assert!(compose.contains("OMNI_INSTANCE_ID: omni-1"), "compose gives omni a stable instance id");
}
