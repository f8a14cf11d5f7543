//! The Redis writer's backlog stays within `limits.redis_backlog_bytes`
//! whatever Redis does: a Redis slower than the job holds consumption back
//! (the job then runs at Redis's pace), and a Redis that is away sheds the
//! backlog without holding the job back, then gets every room rewritten from
//! the store once it is back. Each test owns its Redis.

use std::time::{Duration, Instant};

use crate::common::*;

/// The backlog budget of these tests: far below what their input makes wait.
const BUDGET: usize = 64 << 10;

/// Starts `omni run` on `topology` with its operations endpoint; returns it and the endpoint's address.
fn spawn_job(topology: &mut omni::topology::Topology, dir: &std::path::Path) -> (JobProcess, String) {
    let addr = format!("127.0.0.1:{}", pick_free_port());
    topology.http.listen = addr.clone();
    (JobProcess::spawn(topology, dir, "i1"), addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_slower_than_the_job_holds_consumption_back_within_the_backlog_budget() {
    let dir = tempfile::tempdir().unwrap();
    let redis = ScratchRedis::start_volatile(&dir.path().join("redis"));
    let url = redis.url("");
    let mut topology = fresh_topology("slowredis", 2, &dir.path().join("state"));
    topology.redis.url = url.clone();
    topology.limits.redis_backlog_bytes = BUDGET;
    create_input(&topology).await;
    let events = generate(71, 6000, 3000);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    let (job, addr) = spawn_job(&mut topology, dir.path());
    wait_ready(&addr, Duration::from_secs(60)).await;

    // Redis holds every write for 6 s (well under the writer's 10 s
    // response timeout even on a loaded machine, so to the writer it is
    // slow, not failing).
    pause_redis_writes(&url, Duration::from_secs(6)).await;
    let paused_until = Instant::now() + Duration::from_secs(5);
    produce(&producer(), topology.input_topic(), &events);
    let (mut held_back, mut most) = (false, 0.0f64);
    while Instant::now() < paused_until {
        held_back |= scraped_metric(&addr, "omni_redis_backpressure_threads").await.unwrap_or(0.0) >= 1.0;
        most = most.max(scraped_metric(&addr, "omni_redis_backlog_bytes").await.unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !held_back {
        let metrics = http_get(&addr, "/metrics").await.map(|m| m.1).unwrap_or_default();
        let redis: Vec<&str> = metrics.lines().filter(|l| l.contains("redis") && !l.starts_with('#')).collect();
        let log = std::fs::read_to_string(&job.log).unwrap_or_default();
        panic!("the job never held consumption back while Redis held its writes\n{}\n{log}", redis.join("\n"));
    }
    // A commit's worth of path-only rooms may join past the budget before the pause takes.
    assert!(most <= 2.0 * BUDGET as f64, "the backlog reached {most} bytes over a {BUDGET}-byte budget");

    assert_redis_exact(&topology, &folder, &expected).await;
    assert_broadcast_exact(&read_broadcast(&topology.broadcast_topic, expected.total_changes), &expected);
    let addr2 = addr.clone();
    wait_for(Duration::from_secs(30), "consumption resumed", || {
        let addr = addr2.clone();
        async move { (scraped_metric(&addr, "omni_redis_backpressure_threads").await? == 0.0).then_some(()) }
    })
    .await;
    job.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_away_past_the_backlog_budget_holds_nothing_back_and_gets_every_room_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let port = pick_free_port();
    let redis = ScratchRedis::start_on(&dir.path().join("redis"), port);
    let url = redis.url("");
    let mut topology = fresh_topology("awayredis", 2, &dir.path().join("state"));
    topology.redis.url = url.clone();
    topology.limits.redis_backlog_bytes = BUDGET;
    create_input(&topology).await;
    let events = generate(72, 6000, 3000);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    let (job, addr) = spawn_job(&mut topology, dir.path());
    wait_ready(&addr, Duration::from_secs(60)).await;

    drop(redis);
    produce(&producer(), topology.input_topic(), &events);
    // Redis being away holds nothing back: every change is broadcast.
    assert_broadcast_exact(&read_broadcast(&topology.broadcast_topic, expected.total_changes), &expected);
    let addr2 = addr.clone();
    let most = wait_for(Duration::from_secs(30), "the backlog shed", || {
        let addr = addr2.clone();
        async move {
            let metrics = http_get(&addr, "/metrics").await?.1;
            let shed = metric_sum(&metrics, "omni_redis_backlog_shed_rooms_total")?;
            (shed > 0.0).then(|| metric_sum(&metrics, "omni_redis_backlog_bytes").unwrap_or(0.0))
        }
    })
    .await;
    assert!(most <= 1.5 * BUDGET as f64, "the backlog holds {most} bytes over a {BUDGET}-byte budget");
    // A thread may pause in the moment before the writer finds Redis gone;
    // once it knows, nothing stays held back.
    let addr2 = addr.clone();
    wait_for(Duration::from_secs(10), "consumption not held back while Redis is away", || {
        let addr = addr2.clone();
        async move {
            // No such gauge yet: no thread ever held back.
            let metrics = http_get(&addr, "/metrics").await?.1;
            (metric_sum(&metrics, "omni_redis_backpressure_threads").unwrap_or(0.0) == 0.0).then_some(())
        }
    })
    .await;

    let _back = ScratchRedis::start_on(&dir.path().join("redis"), port);
    assert_redis_exact(&topology, &folder, &expected).await;
    assert!(scraped_metric(&addr, "omni_redis_resyncs_total").await.unwrap_or(0.0) >= 1.0, "no rewrite counted");
    job.terminate();
}
