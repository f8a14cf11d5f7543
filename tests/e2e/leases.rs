//! Leases on the recording module, end to end: a recording whose lease is
//! not kept alive stops itself with `heartbeat_lost`, once, as an ordinary
//! change (broadcast, changelog, Redis, one version more), across kill -9,
//! a deleted state directory and a partition moving to another instance;
//! kept-alive, stopped, restarted and closed leases never fire, and
//! keep-alives cost no record anywhere.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use omni::modules::{Registry, HEARTBEAT_LOST, KEEPALIVE_TYPE, LEASE_HEADER, TYPE_HEADER};
use omni::proto::omni::{KeepAlive, Lease, RoomState, StateChange};
use omni::proto::tecate::{room_event::Kind, RecordingStarted, RecordingStopped, RoomClosed};
use omni::proto::{millis_of, Message as _};
use omni::topology::Topology;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::common::*;

fn send(producer: &BaseProducer, topic: &str, room: &str, value: &[u8], headers: OwnedHeaders) {
    let record = BaseRecord::<[u8], [u8]>::to(topic).key(room.as_bytes()).payload(value).headers(headers);
    omni::kafka::send(producer, record).expect("producing a test record");
}

/// A recording start in `room` carrying a lease of `ttl`; returns the lease id.
pub(crate) fn leased_start(producer: &BaseProducer, topic: &str, room: &str, recording: &str, ttl: Duration) -> String {
    let lease_id = format!("lease-{}", uuid::Uuid::new_v4().simple());
    let lease = Lease { lease_id: lease_id.clone(), ttl_ms: ttl.as_millis() as i64 };
    let start = Kind::RecordingStarted(RecordingStarted { recording_id: recording.into(), started_by: "u1".into() });
    let value = event(0, chrono::Utc::now().timestamp_millis(), start).encode_to_vec();
    let bytes = lease.encode_to_vec();
    send(producer, topic, room, &value, OwnedHeaders::new().insert(Header { key: LEASE_HEADER, value: Some(&bytes) }));
    lease_id
}

fn keep_alive(producer: &BaseProducer, topic: &str, room: &str, lease_ids: &[&str]) {
    let value = KeepAlive { lease_ids: lease_ids.iter().map(|id| (*id).to_owned()).collect() }.encode_to_vec();
    let header = Header { key: TYPE_HEADER, value: Some(KEEPALIVE_TYPE) };
    send(producer, topic, room, &value, OwnedHeaders::new().insert(header));
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// Keep-alives sent every `every` from a task of their own, until stopped,
/// as a live recorder sends them.
struct Keeper {
    keeping: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Keeper {
    fn start<F, Fut>(every: Duration, mut send: F) -> Keeper
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let keeping = Arc::new(AtomicBool::new(true));
        let running = Arc::clone(&keeping);
        let task = tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                send().await;
                tokio::time::sleep(every).await;
            }
        });
        Keeper { keeping, task }
    }

    /// Keeps `lease_id` of `room` alive with keep-alive records on `topic`.
    fn over_kafka(topic: &str, room: &str, lease_id: &str, every: Duration) -> Keeper {
        let producer = crate::common::producer();
        let (topic, room, lease_id) = (topic.to_owned(), room.to_owned(), lease_id.to_owned());
        Keeper::start(every, move || {
            keep_alive(&producer, &topic, &room, &[&lease_id]);
            std::future::ready(())
        })
    }

    async fn stop(self) {
        self.keeping.store(false, Ordering::Relaxed);
        self.task.await.unwrap();
    }
}

fn plain(producer: &BaseProducer, topic: &str, room: &str, kind: Kind) {
    let value = event(0, chrono::Utc::now().timestamp_millis(), kind).encode_to_vec();
    produce_raw(producer, topic, Some(room.as_bytes()), Some(&value));
    producer.flush(Duration::from_secs(30)).expect("flush");
}

pub(crate) fn room(topology: &Topology, name: &str) -> String {
    format!("app/{}/room/{name}", topology.application_id)
}

/// Every committed broadcast change, by room, in order.
fn broadcast_by_room(topic: &str, want: usize) -> BTreeMap<String, Vec<StateChange>> {
    let mut by_room: BTreeMap<String, Vec<StateChange>> = BTreeMap::new();
    for change in read_broadcast(topic, want) {
        by_room.entry(change.path.clone()).or_default().push(change);
    }
    by_room
}

/// The room's expiry change: its version is one past the start, its cause the lease.
fn assert_expired_once(changes: &[StateChange], lease_id: &str) {
    let versions: Vec<u64> = changes.iter().map(|c| c.version).collect();
    assert_eq!(versions, [1, 2], "a start and one expiry, versions contiguous");
    let expiry = &changes[1];
    assert_eq!(expiry.module, "recording");
    assert_eq!(expiry.cause_event_id, lease_id);
    let state: serde_json::Value = serde_json::from_str(&expiry.state_json).unwrap();
    assert_eq!(state["active"], false);
    assert_eq!(state["reason"], HEARTBEAT_LOST);
}

fn leased_rooms(producer: &BaseProducer, topology: &Topology, count: usize, ttl: Duration) -> BTreeMap<String, String> {
    let rooms: BTreeMap<String, String> = (0..count)
        .map(|i| {
            let path = room(topology, &format!("r{i}"));
            let lease = leased_start(producer, topology.input_topic(), &path, &format!("rec{i}"), ttl);
            (path, lease)
        })
        .collect();
    producer.flush(Duration::from_secs(30)).expect("flush");
    rooms
}

fn assert_each_expired_once(by_room: &BTreeMap<String, Vec<StateChange>>, leases: &BTreeMap<String, String>) {
    assert_eq!(by_room.len(), leases.len(), "rooms on the broadcast");
    for (path, lease_id) in leases {
        assert_expired_once(&by_room[path], lease_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_lease_does_not_fire_and_one_left_alone_fires_once_within_the_promise() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("lease", 2, &dir.path().join("state"));
    create_input(&topology).await;
    let topic = topology.input_topic().to_owned();
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    let producer = producer();
    let ttl = Duration::from_secs(2);
    let [kept, left, stopped, restarted, closed] =
        ["kept", "left", "stopped", "restarted", "closed"].map(|name| room(&topology, name));
    let kept_lease = leased_start(&producer, &topic, &kept, "rk", ttl);
    let left_lease = leased_start(&producer, &topic, &left, "rl", ttl);
    leased_start(&producer, &topic, &stopped, "rs", ttl);
    leased_start(&producer, &topic, &restarted, "rr1", ttl);
    leased_start(&producer, &topic, &closed, "rc", ttl);
    let stop = Kind::RecordingStopped(RecordingStopped { recording_id: "rs".into(), reason: "done".into() });
    plain(&producer, &topic, &stopped, stop);
    let restart = Kind::RecordingStarted(RecordingStarted { recording_id: "rr2".into(), started_by: "u2".into() });
    plain(&producer, &topic, &restarted, restart);
    plain(&producer, &topic, &closed, Kind::RoomClosed(RoomClosed {}));

    // Keep one lease alive all along the checks; the others expire or are cancelled meanwhile.
    let keeper = Keeper::over_kafka(&topic, &kept, &kept_lease, ttl / 4);
    let started = Instant::now();
    wait_for(3 * ttl, "three TTLs of keep-alives", || {
        let done = started.elapsed() >= 3 * ttl;
        async move { done.then_some(()) }
    })
    .await;
    // Keep-alives of leases that are gone, or never were, are harmless no-ops.
    keep_alive(&producer, &topic, &left, &[&left_lease, "no-such-lease"]);
    keep_alive(&producer, &topic, &room(&topology, "nowhere"), &[&kept_lease]);
    // Eight changes: five starts, a stop, a second start, a close, and the one expiry.
    let by_room = broadcast_by_room(&topology.broadcast_topic, 9);
    assert_eq!(by_room[&kept].len(), 1, "the kept-alive lease did not fire");
    assert_expired_once(&by_room[&left], &left_lease);
    let processed = |c: &StateChange| millis_of(c.processed_at.as_ref());
    let after = processed(&by_room[&left][1]) - processed(&by_room[&left][0]);
    let promise = ttl.as_millis() as i64 + topology.commit_interval_ms as i64 + 1000;
    assert!(after >= ttl.as_millis() as i64, "fired {after} ms after its start: less than its TTL");
    assert!(after <= promise, "fired {after} ms after its start, past the {promise} ms promise");
    for path in [&stopped, &restarted] {
        assert_eq!(by_room[path].len(), 2, "{path}: the lease was cancelled");
        assert!(!by_room[path][1].state_json.contains(HEARTBEAT_LOST), "{path}: not an expiry");
    }
    assert_eq!(by_room[&closed].len(), 2, "the close cancelled the lease");
    let dead_letters = read_committed(&topology.dead_letter_topic, 1, Duration::from_secs(3));
    assert!(dead_letters.is_empty(), "keep-alives are not dead-lettered: {dead_letters:?}");

    // Keep-alives wrote nothing: one changelog record and one Redis stream entry for the kept room.
    let changelog = read_committed(&topology.changelog_topic(), 9, Duration::from_secs(10));
    let kept_records: Vec<RoomState> = changelog
        .iter()
        .filter(|r| r.key.as_deref() == Some(kept.as_bytes()))
        .map(|r| RoomState::decode(r.value.as_deref().unwrap()).unwrap())
        .collect();
    assert_eq!(kept_records.len(), 1, "one changelog record for the kept room: its start");
    assert_eq!(kept_records[0].timers[0].lease_id, kept_lease);
    let left_last = changelog.iter().rev().find(|r| r.key.as_deref() == Some(left.as_bytes())).unwrap();
    let left_state = RoomState::decode(left_last.value.as_deref().unwrap()).unwrap();
    assert_eq!(left_state.version, 2);
    assert!(left_state.timers.is_empty(), "the fired lease is gone from the changelog");
    let client = redis::Client::open(topology.redis.url.as_str()).unwrap();
    let mut conn = redis_connection(&client).await;
    let keys = omni::view::KeyLayout::new(&topology.redis.key_prefix);
    let snapshot = omni::view::snapshot(&mut conn, &keys, &left).await.unwrap().unwrap();
    assert_eq!(snapshot.version, 2);
    assert_eq!(snapshot.modules["recording"]["reason"], HEARTBEAT_LOST);
    let stream: usize = redis::AsyncCommands::xlen(&mut conn, format!("{}:changes", keys.room(&kept))).await.unwrap();
    assert_eq!(stream, 1, "keep-alives add no Redis stream entry");

    // Left alone now, the kept lease fires too, once.
    keeper.stop().await;
    let by_room = broadcast_by_room(&topology.broadcast_topic, 10);
    assert_expired_once(&by_room[&kept], &kept_lease);
    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_thousand_leases_pending_fires_each_exactly_once_right_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("lease-kill9", 4, &dir.path().join("state"));
    let addr = format!("127.0.0.1:{}", pick_free_port());
    topology.http.listen = addr.clone();
    create_input(&topology).await;
    let producer = producer();
    let job = JobProcess::spawn(&topology, dir.path(), "i1");
    let ttl = Duration::from_secs(8);
    let leases = leased_rooms(&producer, &topology, 1000, ttl);
    let started = read_committed(&topology.broadcast_topic, 1000, Duration::from_secs(90));
    assert_eq!(started.len(), 1000, "every start committed");
    let metric = |name: &'static str| {
        let addr = addr.clone();
        async move { scraped_metric(&addr, name).await }
    };
    assert_eq!(metric("omni_leases_active").await, Some(1000.0), "every lease pending");
    job.kill9();
    // Down longer than the TTL: every lease is overdue when the job is back.
    let overdue = Instant::now() + ttl;
    while Instant::now() < overdue {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = JobProcess::spawn(&topology, dir.path(), "i1");
    wait_ready(&addr, Duration::from_secs(90)).await;
    let ready = chrono::Utc::now().timestamp_millis();
    let by_room = broadcast_by_room(&topology.broadcast_topic, 2000);
    assert_each_expired_once(&by_room, &leases);
    // Right after the restore, not one more TTL from it: the committed
    // offsets say when the last keep-alive could have been processed.
    let latest = by_room.values().map(|changes| millis_of(changes[1].processed_at.as_ref())).max().unwrap();
    let half_ttl = ttl.as_millis() as i64 / 2;
    assert!(latest - ready < half_ttl, "the last expiry came {} ms after the job was ready", latest - ready);
    wait_for(Duration::from_secs(10), "the timer metrics to count every expiry", || async {
        let fired = metric("omni_timer_expiries_total").await == Some(1000.0);
        let lags = metric("omni_timer_lag_seconds_count").await == Some(1000.0);
        let pending =
            metric("omni_timers_pending").await == Some(0.0) && metric("omni_leases_active").await == Some(0.0);
        (fired && lags && pending).then_some(())
    })
    .await;
    job.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_sent_while_the_job_was_down_count_before_overdue_leases_fire() {
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("lease-down", 2, &dir.path().join("state"));
    let addr = format!("127.0.0.1:{}", pick_free_port());
    topology.http.listen = addr.clone();
    create_input(&topology).await;
    let topic = topology.input_topic().to_owned();
    let producer = producer();
    let job = JobProcess::spawn(&topology, dir.path(), "i1");
    let ttl = Duration::from_secs(4);
    let [alive, dead] = ["alive", "dead"].map(|name| room(&topology, name));
    let alive_lease = leased_start(&producer, &topic, &alive, "ra", ttl);
    let dead_lease = leased_start(&producer, &topic, &dead, "rd", ttl);
    producer.flush(Duration::from_secs(30)).expect("flush");
    assert_eq!(read_committed(&topology.broadcast_topic, 2, Duration::from_secs(90)).len(), 2);
    job.kill9();

    // The live recorder keeps its lease alive all along: the keep-alives
    // wait in the topic while the job is down, two TTLs.
    let keeper = Keeper::over_kafka(&topic, &alive, &alive_lease, ttl / 4);
    let down_until = Instant::now() + 2 * ttl;
    while Instant::now() < down_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = JobProcess::spawn(&topology, dir.path(), "i1");
    wait_ready(&addr, Duration::from_secs(90)).await;
    let ready = chrono::Utc::now().timestamp_millis();
    // The dead recorder's lease fires once, right after the restore...
    let by_room = broadcast_by_room(&topology.broadcast_topic, 3);
    assert_expired_once(&by_room[&dead], &dead_lease);
    let fired = millis_of(by_room[&dead][1].processed_at.as_ref());
    let half_ttl = ttl.as_millis() as i64 / 2;
    assert!(fired - ready < half_ttl, "the overdue lease fired {} ms after the job was ready", fired - ready);
    // ...while the live one, kept alive across the outage, holds for two TTLs more.
    let watched = Instant::now();
    wait_for(3 * ttl, "two TTLs of keep-alives after the restart", || {
        let done = watched.elapsed() >= 2 * ttl;
        async move { done.then_some(()) }
    })
    .await;
    let by_room = broadcast_by_room(&topology.broadcast_topic, 3);
    assert_eq!(by_room[&alive].len(), 1, "the lease kept alive across the outage fired");
    keeper.stop().await;
    let by_room = broadcast_by_room(&topology.broadcast_topic, 4);
    assert_expired_once(&by_room[&alive], &alive_lease);
    job.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_state_directory_rebuilds_the_timers_from_the_changelog() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("lease-wipe", 2, &dir.path().join("state"));
    create_input(&topology).await;
    let producer = producer();
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    let leases = leased_rooms(&producer, &topology, 20, Duration::from_secs(6));
    assert_eq!(read_committed(&topology.broadcast_topic, 20, Duration::from_secs(60)).len(), 20);
    job.stop().await;
    let before = read_committed(&topology.broadcast_topic, 21, Duration::from_secs(3)).len();
    assert_eq!(before, 20, "no lease fired before the state directory went");

    std::fs::remove_dir_all(&topology.store.dir).unwrap();
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    let by_room = broadcast_by_room(&topology.broadcast_topic, 40);
    assert_each_expired_once(&by_room, &leases);
    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_partition_that_moves_to_a_second_instance_fire_there_once() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("lease-move", 4, &dir.path().join("a"));
    let mut second = topology.clone();
    second.store.dir = dir.path().join("b");
    create_input(&topology).await;
    let producer = producer();
    let a = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    // Long enough to outlast the rebalance: every lease falls due after the move.
    let leases = leased_rooms(&producer, &topology, 200, Duration::from_secs(20));
    assert_eq!(read_committed(&topology.broadcast_topic, 200, Duration::from_secs(60)).len(), 200);
    let b = RunningJob::start(second.clone(), Registry::with_builtins()).await;
    wait_for(Duration::from_secs(60), "both instances to own partitions", || {
        let split =
            a.health.assigned() > 0 && b.health.assigned() > 0 && a.health.assigned() + b.health.assigned() == 4;
        async move { split.then_some(()) }
    })
    .await;
    let split_at = chrono::Utc::now().timestamp_millis();
    let by_room = broadcast_by_room(&topology.broadcast_topic, 400);
    assert_each_expired_once(&by_room, &leases);
    // Every expiry came after the split, so the moved partitions' leases fired on the second instance.
    let first_expiry = by_room.values().map(|changes| millis_of(changes[1].processed_at.as_ref())).min().unwrap();
    assert!(first_expiry >= split_at, "a lease fired {} ms before the partitions moved", split_at - first_expiry);
    assert!(b.health.assigned() > 0 && a.health.assigned() > 0, "no further rebalance moved them back");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_a_lease_prints_its_id_last_and_keeps_it_alive() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("lease-cli", 2, &dir.path().join("state"));
    create_input(&topology).await;
    let file = dir.path().join("topology.toml");
    write_topology(&topology, &file);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    let path = room(&topology, "cli");
    let file = file.to_str().unwrap();
    let publish = ["publish", "--topology", file, &path, "recording-start", "--recording-id", "r1", "--by", "u1"];
    let output = omni_cli().args(publish).args(["--lease-ttl", "2s"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let lease_id = stdout.lines().last().unwrap().trim().to_owned();
    assert!(uuid::Uuid::parse_str(&lease_id).is_ok(), "the last line is the lease id: {stdout:?}");
    let mut keeper = omni_cli()
        .args(["keepalive", "--topology", file, &path, &lease_id, "--every", "500ms"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kept alive for three TTLs: only the start is on the broadcast.
    let started = Instant::now();
    wait_for(Duration::from_secs(10), "three TTLs of keep-alives", || {
        let done = started.elapsed() >= Duration::from_secs(6);
        async move { done.then_some(()) }
    })
    .await;
    let early = read_committed(&topology.broadcast_topic, 2, Duration::from_secs(2));
    let _ = keeper.kill();
    let _ = keeper.wait();
    assert_eq!(early.len(), 1, "the kept-alive lease fired");
    let by_room = broadcast_by_room(&topology.broadcast_topic, 2);
    assert_expired_once(&by_room[&path], &lease_id);
    let once = omni_cli().args(["keepalive", "--topology", file, &path, &lease_id]).output().unwrap();
    assert!(once.status.success(), "a keep-alive of an expired lease is accepted");
    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_taken_and_kept_alive_through_omni_serve_fire_once_left_alone() {
    use crate::serve::{http_request, publish_event, topology_for, ServeProcess};
    use omni::proto::omni as pb;
    use omni::proto::tecate::RoomEvent;

    let dir = tempfile::tempdir().unwrap();
    let topology = topology_for("lease-serve", dir.path());
    create_input(&topology).await;
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    let mut serve = ServeProcess::spawn(&topology, dir.path(), &[]);
    let mut client = serve.client().await;
    let ttl = Duration::from_secs(2);
    let ttl_ms = ttl.as_millis() as i64;
    let [grpc_room, json_room] = ["grpc", "json"].map(|name| room(&topology, name));

    // One lease taken over gRPC, one over JSON; each answer names its lease.
    let start = Kind::RecordingStarted(RecordingStarted { recording_id: "rg".into(), started_by: "u1".into() });
    let mut request =
        publish_event(&grpc_room, RoomEvent { event_id: String::new(), occurred_at: None, kind: Some(start) });
    request.lease_ttl_ms = ttl_ms;
    let grpc_lease = client.publish(request).await.unwrap().into_inner().lease_id;
    assert!(!grpc_lease.is_empty(), "the gRPC answer names the lease");
    let body = serde_json::json!({
        "path": json_room,
        "event": {"event_id": "ej", "recording_started": {"recording_id": "rj", "started_by": "u1"}},
        "lease_ttl_ms": ttl_ms,
    });
    let (status, reply) = http_request(&serve.addr, "POST", "/v1/Publish", &body.to_string()).await;
    assert_eq!(status, 200, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let json_lease = reply["lease_id"].as_str().expect("the JSON answer names the lease").to_owned();

    // Kept alive through either transport, all along the check: neither fires.
    let (addr, partitions) = (serve.addr.clone(), topology.partitions);
    let (grpc_path, json_path) = (grpc_room.clone(), json_room.clone());
    let (grpc_id, json_id) = (grpc_lease.clone(), json_lease.clone());
    let keeper = Keeper::start(ttl / 4, move || {
        let (mut client, addr) = (client.clone(), addr.clone());
        let kept = pb::KeepAliveRequest { path: grpc_path.clone(), lease_ids: vec![grpc_id.clone()] };
        let body = serde_json::json!({"path": json_path, "lease_ids": [json_id]});
        let at = omni::kafka::partition_for(grpc_path.as_bytes(), partitions);
        async move {
            let placed = client.keep_alive(kept).await.unwrap().into_inner();
            assert_eq!(placed.partition, at);
            let (status, reply) = http_request(&addr, "POST", "/v1/KeepAlive", &body.to_string()).await;
            assert_eq!(status, 200, "{reply}");
        }
    });
    let started = Instant::now();
    wait_for(4 * ttl, "three TTLs of keep-alives", || {
        let done = started.elapsed() >= 3 * ttl;
        async move { done.then_some(()) }
    })
    .await;
    let by_room = broadcast_by_room(&topology.broadcast_topic, 2);
    assert_eq!(
        (by_room[&grpc_room].len(), by_room[&json_room].len()),
        (1, 1),
        "a kept-alive lease fired: {by_room:#?}"
    );
    keeper.stop().await;

    // Left alone, each fires once.
    let by_room = broadcast_by_room(&topology.broadcast_topic, 4);
    assert_expired_once(&by_room[&grpc_room], &grpc_lease);
    assert_expired_once(&by_room[&json_room], &json_lease);
    job.stop().await;
}
