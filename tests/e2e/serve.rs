//! `omni serve` end to end, as a separate process against the real broker and
//! Redis, through a tonic client: every rpc, bad input for each, wildcards, a
//! watcher joining mid-load and following across an `omni run` kill -9 and
//! restart, a slow watcher, a wrong token, Redis and Kafka down, SIGTERM.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};
use std::time::{Duration, Instant};

use omni::modules::{Registry, RoomFolder};
use omni::proto::omni::omni_client::OmniClient;
use omni::proto::omni::{self as pb, publish_request, watch_event};
use omni::proto::tecate::{room_event::Kind, RecordingStarted, RoomEvent, TagSet};
use omni::topology::Topology;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::common::*;

/// An `omni serve` process of a test's own.
pub(crate) struct ServeProcess {
    pub child: std::process::Child,
    pub addr: String,
    log: PathBuf,
}

impl ServeProcess {
    pub(crate) fn spawn(topology: &Topology, dir: &FsPath, envs: &[(&str, &str)]) -> ServeProcess {
        let addr = format!("127.0.0.1:{}", pick_free_port());
        ServeProcess::spawn_on(topology, dir, envs, &addr)
    }

    pub(crate) fn spawn_on(topology: &Topology, dir: &FsPath, envs: &[(&str, &str)], addr: &str) -> ServeProcess {
        let file = dir.join("serve.toml");
        write_topology(topology, &file);
        let log = dir.join(format!("serve-{}.log", uuid::Uuid::new_v4().simple()));
        let out = std::fs::File::create(&log).unwrap();
        let mut command = omni_cli();
        command.env_remove("OMNI_BROKERS").env_remove("OMNI_REDIS_URL");
        for (name, value) in envs {
            command.env(name, value);
        }
        let child = command
            .args(["serve", "--topology"])
            .arg(&file)
            .args(["--listen", addr])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawning omni serve");
        ServeProcess { child, addr: addr.to_owned(), log }
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client, once the service accepts connections.
    pub(crate) async fn client(&mut self) -> OmniClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("omni serve exited with {status}: {}", self.log_text());
            }
            if let Ok(client) = OmniClient::connect(format!("http://{}", self.addr)).await {
                return client;
            }
            assert!(Instant::now() < deadline, "omni serve did not listen within 30 s: {}", self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) fn signal(&self, name: &str) {
        std::process::Command::new("kill").args([name, &self.child.id().to_string()]).status().unwrap();
    }

    /// Waits for the process to exit; its exit status.
    pub(crate) fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "omni serve did not exit within {within:?}: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn tag_event(id: &str, key: &str, value: &str) -> RoomEvent {
    RoomEvent {
        event_id: id.to_owned(),
        occurred_at: None,
        kind: Some(Kind::TagSet(TagSet { key: key.into(), value: value.into() })),
    }
}

pub(crate) fn publish_event(path: &str, event: RoomEvent) -> pb::PublishRequest {
    pb::PublishRequest {
        path: path.to_owned(),
        body: Some(publish_request::Body::Event(event)),
        topic: String::new(),
        content_type: String::new(),
        lease_ttl_ms: 0,
    }
}

pub(crate) async fn snapshot_at(client: &mut OmniClient<Channel>, path: &str, version: u64) -> pb::RoomSnapshot {
    wait_for(Duration::from_secs(60), &format!("{path} at version {version}"), || {
        let mut client = client.clone();
        let path = path.to_owned();
        async move {
            let snap = client.get_snapshot(pb::GetSnapshotRequest { path }).await.ok()?.into_inner();
            (snap.version >= version).then_some(snap)
        }
    })
    .await
}

/// Per room, what a watcher saw: its events' versions and the state they leave.
#[derive(Debug, Default, Clone)]
pub(crate) struct Followed {
    pub version: u64,
    pub modules: BTreeMap<String, serde_json::Value>,
    /// Events seen, as (kind, version).
    pub events: Vec<(&'static str, u64)>,
}

/// Applies a watch event, checking that it follows on from what came before:
/// a change at exactly the next version, a resync never going back.
pub(crate) fn apply(rooms: &mut BTreeMap<String, Followed>, event: pb::WatchEvent) {
    let state = |json: &str| serde_json::from_str::<serde_json::Value>(json).unwrap();
    match event.event.expect("an event") {
        watch_event::Event::Snapshot(s) | watch_event::Event::Resynchronised(s) => {
            let room = rooms.entry(s.path.clone()).or_default();
            assert!(
                s.version >= room.version,
                "{}: a snapshot at {} after version {}",
                s.path,
                s.version,
                room.version
            );
            room.version = s.version;
            room.modules = s.modules.iter().map(|(k, v)| (k.clone(), state(v))).collect();
            room.events.push(("snapshot", s.version));
        }
        watch_event::Event::Change(c) => {
            let room = rooms.entry(c.path.clone()).or_default();
            assert_eq!(
                c.version,
                room.version + 1,
                "{}: change {} after version {} ({:?})",
                c.path,
                c.version,
                room.version,
                room.events
            );
            room.version = c.version;
            if c.module == omni::modules::ROOM_MODULE {
                room.modules.clear();
            } else {
                room.modules.insert(c.module.clone(), state(&c.state_json));
            }
            room.events.push(("change", c.version));
        }
    }
}

/// Reads a watch until every room in `want` reached its version.
pub(crate) async fn follow_until(
    stream: &mut Streaming<pb::WatchEvent>,
    rooms: &mut BTreeMap<String, Followed>,
    want: &BTreeMap<String, u64>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while want.iter().any(|(room, v)| rooms.get(room).map_or(0, |r| r.version) < *v) {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(event))) => apply(rooms, event),
            Ok(Ok(None)) => panic!("the watch ended"),
            Ok(Err(status)) => panic!("the watch failed: {status}"),
            Err(_) => {
                let behind: Vec<_> =
                    want.iter().filter(|(r, v)| rooms.get(*r).map_or(0, |f| f.version) < **v).take(5).collect();
                panic!("the watch did not reach the final versions within 120 s; behind: {behind:?}");
            }
        }
    }
}

/// The status of a call that must fail.
fn status_of<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    result.expect_err("the call fails")
}

/// Creates the topology's (first) pub/sub topic; its name.
pub(crate) async fn create_pubsub_topic(t: &Topology) -> String {
    let chat = t.service.pubsub_topics[0].clone();
    let spec = omni::kafka::TopicSpec { name: chat.clone(), partitions: 2, configs: vec![] };
    omni::kafka::ensure_topics(&kafka(), &[spec]).await.unwrap();
    chat
}

/// Creates the job's broadcast topic before any job runs, for a test that writes it itself.
pub(crate) async fn create_broadcast(t: &Topology) {
    let spec = omni::kafka::TopicSpec { name: t.broadcast_topic.clone(), partitions: 4, configs: vec![] };
    omni::kafka::ensure_topics(&kafka(), &[spec]).await.unwrap();
}

pub(crate) fn topology_for(name: &str, dir: &FsPath) -> Topology {
    let mut t = fresh_topology(name, 4, &dir.join("state"));
    t.service.pubsub_topics = vec![format!("{}.chat", t.application_id)];
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_every_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let t = topology_for("serve-rpcs", dir.path());
    let job = RunningJob::start(t.clone(), Registry::with_builtins()).await;
    let mut serve = ServeProcess::spawn(&t, dir.path(), &[]);
    let mut client = serve.client().await;
    let room = format!("app/{}/room/r1", t.application_id);

    let published =
        client.publish(publish_event(&room, tag_event("e1", "topic", "physics"))).await.unwrap().into_inner();
    assert_eq!(published.topic, t.input_topic());
    assert_eq!(published.partition, omni::kafka::partition_for(room.as_bytes(), t.partitions));
    assert!(published.offset >= 0);
    client.publish(publish_event(&room, tag_event("e2", "level", "2"))).await.unwrap();
    let snap = snapshot_at(&mut client, &room, 2).await;
    assert_eq!(snap.path, room);
    assert_eq!(snap.modules.get("tags").map(String::as_str), Some(r#"{"level":"2","topic":"physics"}"#));
    assert!(snap.updated_at.is_some());

    let deltas = client
        .get_deltas(pb::GetDeltasRequest { path: room.clone(), after_version: 0, limit: 0 })
        .await
        .unwrap()
        .into_inner();
    let versions: Vec<u64> = deltas.changes.iter().map(|c| c.version).collect();
    assert_eq!(versions, [1, 2]);
    assert_eq!(deltas.changes[0].cause_event_id, "e1");
    assert!(!deltas.more);
    let first = client
        .get_deltas(pb::GetDeltasRequest { path: room.clone(), after_version: 0, limit: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.changes.len(), first.more), (1, true));
    let none = client
        .get_deltas(pb::GetDeltasRequest { path: room.clone(), after_version: 2, limit: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(none.changes.is_empty());

    // Watch: the snapshot, then the next change.
    let mut watch = client.watch(pb::WatchRequest { pattern: room.clone() }).await.unwrap().into_inner();
    let mut rooms = BTreeMap::new();
    follow_until(&mut watch, &mut rooms, &BTreeMap::from([(room.clone(), 2)])).await;
    assert_eq!(rooms[&room].events, [("snapshot", 2)]);
    client.publish(publish_event(&room, tag_event("e3", "topic", "chemistry"))).await.unwrap();
    follow_until(&mut watch, &mut rooms, &BTreeMap::from([(room.clone(), 3)])).await;
    assert_eq!(rooms[&room].events, [("snapshot", 2), ("change", 3)]);
    assert_eq!(rooms[&room].modules["tags"]["topic"], "chemistry");

    // Subscribe and a raw publish on an allowed topic.
    let chat = create_pubsub_topic(&t).await;
    let subject = format!("app/{}/channel/c1", t.application_id);
    let raw = pb::PublishRequest {
        path: subject.clone(),
        body: Some(publish_request::Body::Payload(b"hello".to_vec())),
        topic: chat.clone(),
        content_type: "text/plain".into(),
        lease_ttl_ms: 0,
    };
    let sent = client.publish(raw).await.unwrap().into_inner();
    assert_eq!(sent.topic, chat);
    let subscribing = client.subscribe(pb::SubscribeRequest {
        topic: chat.clone(),
        pattern: format!("app/{}/>", t.application_id),
        start: Some(pb::Start { at: Some(pb::start::At::Earliest(true)) }),
    });
    let mut records = subscribing.await.unwrap().into_inner();
    let record = tokio::time::timeout(Duration::from_secs(30), records.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(
        (record.path.as_str(), record.payload.as_slice(), record.content_type.as_str()),
        (subject.as_str(), &b"hello"[..], "text/plain")
    );
    assert_eq!((record.partition, record.offset), (sent.partition, sent.offset));
    // A message many times the codec's first buffer (1 KiB), both ways.
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let raw = pb::PublishRequest {
        path: subject.clone(),
        body: Some(publish_request::Body::Payload(big.clone())),
        topic: chat.clone(),
        content_type: "application/octet-stream".into(),
        lease_ttl_ms: 0,
    };
    client.publish(raw).await.unwrap();
    let record = tokio::time::timeout(Duration::from_secs(30), records.message()).await.unwrap().unwrap().unwrap();
    assert!(record.payload == big, "a 100,000-byte payload came back as {} bytes", record.payload.len());

    // Operations endpoints and metrics on the same port.
    let (status, _) = http_get(&serve.addr, "/healthz").await.expect("/healthz answers");
    assert_eq!(status, 200);
    let (status, text) = http_get(&serve.addr, "/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(text.contains(r#"omni_service_requests_total{method="GetSnapshot",code="OK"}"#), "{text}");
    assert_eq!(metric_sum(&text, "omni_service_watchers"), Some(1.0), "{text}");
    drop(watch);
    drop(records);
    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_from_every_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = topology_for("serve-bad", dir.path());
    t.service.max_message_bytes = 1000;
    let mut serve = ServeProcess::spawn(&t, dir.path(), &[]);
    let mut client = serve.client().await;
    let room = format!("app/{}/room/r1", t.application_id);

    let bad = status_of(client.get_snapshot(pb::GetSnapshotRequest { path: "not a path//".into() }).await);
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    assert!(bad.message().contains("not a path//"), "{bad}");
    let unknown = status_of(client.get_snapshot(pb::GetSnapshotRequest { path: room.clone() }).await);
    assert_eq!(unknown.code(), Code::NotFound, "{unknown}");
    let bad = status_of(
        client.get_deltas(pb::GetDeltasRequest { path: "app/x/planet/y".into(), after_version: 0, limit: 0 }).await,
    );
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    let unknown =
        status_of(client.get_deltas(pb::GetDeltasRequest { path: room.clone(), after_version: 0, limit: 0 }).await);
    assert_eq!(unknown.code(), Code::NotFound, "{unknown}");
    let bad = status_of(client.watch(pb::WatchRequest { pattern: "app/>/room".into() }).await);
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    assert!(bad.message().contains('>'), "{bad}");
    let chat = t.service.pubsub_topics[0].clone();
    let bad = status_of(
        client.subscribe(pb::SubscribeRequest { topic: chat.clone(), pattern: "app/r*".into(), start: None }).await,
    );
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    let denied = status_of(
        client
            .subscribe(pb::SubscribeRequest { topic: t.broadcast_topic.clone(), pattern: ">".into(), start: None })
            .await,
    );
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied}");

    let publish = |path: &str, body| pb::PublishRequest {
        path: path.into(),
        body,
        topic: String::new(),
        content_type: String::new(),
        lease_ttl_ms: 0,
    };
    let bad = status_of(client.publish(publish(&room, None)).await);
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    let bad = status_of(
        client.publish(publish("app/a/channel/c", Some(publish_request::Body::Event(tag_event("e", "k", "v"))))).await,
    );
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    assert!(bad.message().contains("not a room path"), "{bad}");
    let kindless = RoomEvent { event_id: "e".into(), occurred_at: None, kind: None };
    let bad = status_of(client.publish(publish(&room, Some(publish_request::Body::Event(kindless)))).await);
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    let huge = tag_event("e", "k", &"v".repeat(70_000));
    let bad = status_of(client.publish(publish(&room, Some(publish_request::Body::Event(huge)))).await);
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    assert!(bad.message().contains("max_record_bytes"), "{bad}");
    let mut raw = publish(&room, Some(publish_request::Body::Payload(vec![7; 1001])));
    raw.topic = chat.clone();
    let bad = status_of(client.publish(raw.clone()).await);
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    assert!(bad.message().contains("max_message_bytes"), "{bad}");
    raw.topic = "not-allowed".into();
    let denied = status_of(client.publish(raw).await);
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied}");
    // A lease goes only with a recording start, and within the TTL bounds.
    let mut leased_tag = publish(&room, Some(publish_request::Body::Event(tag_event("e", "k", "v"))));
    leased_tag.lease_ttl_ms = 5000;
    let bad = status_of(client.publish(leased_tag).await);
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    assert!(bad.message().contains("recording_started"), "{bad}");
    let start = Kind::RecordingStarted(RecordingStarted { recording_id: "r".into(), started_by: "u".into() });
    let mut too_short = publish(
        &room,
        Some(publish_request::Body::Event(RoomEvent { event_id: "e".into(), occurred_at: None, kind: Some(start) })),
    );
    too_short.lease_ttl_ms = 5;
    let bad = status_of(client.publish(too_short).await);
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    assert!(bad.message().contains("lease_ttl_ms"), "{bad}");
    let keep_alive = |path: &str, lease_ids: Vec<String>| pb::KeepAliveRequest { path: path.into(), lease_ids };
    let bad = status_of(client.keep_alive(keep_alive("app/x/planet/y", vec!["l".into()])).await);
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    let bad = status_of(client.keep_alive(keep_alive(&room, Vec::new())).await);
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    let bad = status_of(client.keep_alive(keep_alive(&room, vec!["x".repeat(200)])).await);
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad}");
    // The service is still there and answers.
    let (status, _) = http_get(&serve.addr, "/healthz").await.expect("/healthz answers");
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let t = topology_for("serve-auth", dir.path());
    let mut serve = ServeProcess::spawn(&t, dir.path(), &[("OMNI_SERVICE_TOKENS", "tok-1,tok-2")]);
    let client = serve.client().await;
    let room = format!("app/{}/room/r1", t.application_id);
    let ask = |token: Option<&str>| {
        let mut client = client.clone();
        let mut request = tonic::Request::new(pb::GetSnapshotRequest { path: room.clone() });
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        async move { client.get_snapshot(request).await.map(|_| ()).unwrap_err().code() }
    };
    assert_eq!(ask(None).await, Code::Unauthenticated);
    assert_eq!(ask(Some("tok-3")).await, Code::Unauthenticated);
    assert_eq!(ask(Some("tok-2")).await, Code::NotFound, "a right token gets through to the call");
    assert!(!serve.log_text().contains("tok-1"), "tokens are never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_deltas_says_out_of_range_when_the_stream_was_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = topology_for("serve-trim", dir.path());
    t.redis.stream_max_len = 5;
    let job = RunningJob::start(t.clone(), Registry::with_builtins()).await;
    let mut serve = ServeProcess::spawn(&t, dir.path(), &[]);
    let mut client = serve.client().await;
    let room = format!("app/{}/room/r1", t.application_id);
    for i in 1..=20 {
        client.publish(publish_event(&room, tag_event(&format!("e{i}"), "n", &i.to_string()))).await.unwrap();
    }
    snapshot_at(&mut client, &room, 20).await;
    let trimmed = client
        .get_deltas(pb::GetDeltasRequest { path: room.clone(), after_version: 2, limit: 0 })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(trimmed.code(), Code::OutOfRange, "{trimmed}");
    assert!(trimmed.message().contains("oldest version it holds is"), "{trimmed}");
    let tail = client
        .get_deltas(pb::GetDeltasRequest { path: room.clone(), after_version: 17, limit: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tail.changes.iter().map(|c| c.version).collect::<Vec<_>>(), [18, 19, 20]);
    job.stop().await;
}

/// Events for `rooms` rooms under the test's own app, from the shared generator.
pub(crate) fn events_for(app: &str, seed: u64, count: usize, rooms: usize) -> Vec<(String, RoomEvent)> {
    generate(seed, count, rooms)
        .into_iter()
        .map(|(room, event)| (room.replacen("app/a", &format!("app/{app}-a"), 1), event))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_with_wildcards_follow_across_a_kill9_of_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let t = topology_for("serve-kill", dir.path());
    create_input(&t).await;
    let app = t.application_id.clone();
    let events = events_for(&app, 15, 3000, 40);
    let folder: RoomFolder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    let job = JobProcess::spawn(&t, dir.path(), "i1");
    let mut serve = ServeProcess::spawn(&t, dir.path(), &[]);
    let mut client = serve.client().await;
    let producer = producer();

    // One watcher before any event, on everything (`>`): the broadcast topic is the test's own.
    let mut everything = client.watch(pb::WatchRequest { pattern: "app/>".into() }).await.unwrap().into_inner();
    let mut all_rooms: BTreeMap<String, Followed> = BTreeMap::new();

    let thirds = events.len() / 3;
    produce(&producer, t.input_topic(), &events[..thirds]);
    // A watcher that joins mid-load, on one app id with a `*` for the room.
    let one_app = format!("app/{app}-a1/room/*");
    let mut late = client.watch(pb::WatchRequest { pattern: one_app.clone() }).await.unwrap().into_inner();
    let mut late_rooms: BTreeMap<String, Followed> = BTreeMap::new();
    // And one on the busiest room alone (a literal pattern: that room's own ring).
    let busiest =
        expected.changes.iter().max_by_key(|(_, changes)| changes.len()).map(|(room, _)| room.clone()).unwrap();
    let mut single = client.watch(pb::WatchRequest { pattern: busiest.clone() }).await.unwrap().into_inner();
    let mut single_rooms: BTreeMap<String, Followed> = BTreeMap::new();
    produce(&producer, t.input_topic(), &events[thirds..2 * thirds]);
    job.kill9();
    let job = JobProcess::spawn(&t, dir.path(), "i1");
    produce(&producer, t.input_topic(), &events[2 * thirds..]);

    assert_redis_exact(&t, &folder, &expected).await;
    let finals: BTreeMap<String, u64> = expected.rooms.iter().map(|(room, s)| (room.clone(), s.version)).collect();
    follow_until(&mut everything, &mut all_rooms, &finals).await;
    let late_finals: BTreeMap<String, u64> = finals
        .iter()
        .filter(|(room, _)| room.starts_with(&format!("app/{app}-a1/")))
        .map(|(r, v)| (r.clone(), *v))
        .collect();
    assert!(!late_finals.is_empty());
    follow_until(&mut late, &mut late_rooms, &late_finals).await;
    let single_finals = BTreeMap::from([(busiest.clone(), finals[&busiest])]);
    follow_until(&mut single, &mut single_rooms, &single_finals).await;
    assert_eq!(single_rooms.keys().collect::<Vec<_>>(), [&busiest], "the single-room watcher saw only its room");
    assert!(
        late_rooms.keys().all(|room| room.starts_with(&format!("app/{app}-a1/room/"))),
        "the late watcher saw only its pattern"
    );

    // The final view equals the model's, which assert_redis_exact found in Redis.
    let parse = |json: String| serde_json::from_str::<serde_json::Value>(&json).unwrap();
    let empty: BTreeMap<&str, serde_json::Value> =
        folder.module_states(&Default::default()).map(|(m, json)| (m, parse(json))).collect();
    let watchers = [
        ("everything", &all_rooms, &finals),
        ("late", &late_rooms, &late_finals),
        ("single", &single_rooms, &single_finals),
    ];
    for (watcher, rooms, want) in watchers {
        for room in want.keys() {
            let state = &expected.rooms[room];
            let seen = &rooms[room];
            assert_eq!(seen.version, state.version, "{watcher}: {room}");
            for (module, json) in folder.module_states(state) {
                let got = seen.modules.get(module).unwrap_or(&empty[module]);
                assert_eq!(got, &parse(json), "{watcher}: {module} of {room} ({:?})", seen.events);
            }
        }
    }
    job.terminate();
}

/// One HTTP/1.1 request on loopback: `(status, body)`.
pub(crate) async fn http_request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.split_whitespace().nth(1).unwrap().parse().unwrap(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_over_http_serves_the_calls_and_watch_as_server_sent_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = topology_for("serve-json", dir.path());
    t.service.max_streams_per_connection = 2;
    let job = RunningJob::start(t.clone(), Registry::with_builtins()).await;
    let mut serve = ServeProcess::spawn(&t, dir.path(), &[]);
    let mut client = serve.client().await;
    let room = format!("app/{}/room/r1", t.application_id);
    let publish = format!(r#"{{"path":"{room}","event":{{"tag_set":{{"key":"topic","value":"maths"}}}}}}"#);
    let (status, body) = http_request(&serve.addr, "POST", "/v1/Publish", &publish).await;
    assert_eq!(status, 200, "{body}");
    let published: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(published["topic"], t.input_topic());
    snapshot_at(&mut client, &room, 1).await;
    let (status, body) = http_request(&serve.addr, "POST", "/v1/GetSnapshot", &format!(r#"{{"path":"{room}"}}"#)).await;
    assert_eq!(status, 200, "{body}");
    let snapshot: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (snapshot["version"].as_u64(), &snapshot["modules"]["tags"]["topic"]),
        (Some(1), &serde_json::json!("maths"))
    );
    let (status, body) =
        http_request(&serve.addr, "POST", "/v1/GetDeltas", &format!(r#"{{"path":"{room}","after_version":0}}"#)).await;
    assert_eq!(status, 200, "{body}");
    let deltas: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(deltas["changes"][0]["version"], 1);
    let (status, body) = http_request(&serve.addr, "POST", "/v1/GetSnapshot", r#"{"path":"app/x"}"#).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("INVALID_ARGUMENT"), "{body}");
    let (status, body) = http_request(&serve.addr, "POST", "/v1/GetSnapshot", r#"{"path":"app/x/room/none"}"#).await;
    assert_eq!((status, body.contains("NOT_FOUND")), (404, true), "{body}");
    // Ready once it has read the broadcast's last minute.
    wait_ready(&serve.addr, Duration::from_secs(30)).await;
    let (status, body) = http_get(&serve.addr, "/readyz").await.expect("/readyz answers");
    assert_eq!((status, body.starts_with("ready")), (200, true), "{body}");

    // Watch as Server-Sent Events: the snapshot first.
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(&serve.addr).await.unwrap();
    let request = format!("GET /v1/Watch?pattern={room} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut lines = tokio::io::BufReader::new(stream).lines();
    let event = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("the event stream goes on");
            if let Some(data) = line.strip_prefix("data: ") {
                return serde_json::from_str::<serde_json::Value>(data).unwrap();
            }
        }
    })
    .await
    .expect("a snapshot event within 20 s");
    assert_eq!((event["path"].as_str(), event["version"].as_u64()), (Some(room.as_str()), Some(1)));

    // Streams per connection are bounded.
    let first = client.watch(pb::WatchRequest { pattern: room.clone() }).await.unwrap();
    let second = client.watch(pb::WatchRequest { pattern: room.clone() }).await.unwrap();
    let third = status_of(client.watch(pb::WatchRequest { pattern: room.clone() }).await);
    assert_eq!(third.code(), Code::ResourceExhausted, "{third}");
    drop((first, second));
    job.stop().await;
}
