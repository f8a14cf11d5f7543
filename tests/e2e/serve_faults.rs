//! `omni serve` when things go wrong: SIGTERM, a restart of the service (a
//! watcher resumes through `GetDeltas`), Redis down, Kafka down, a slow
//! watcher that falls behind the shared feed, a gap no change stream fills
//! (a resynchronisation, counted), and a service started on a busy
//! broadcast topic, ready only once it has read the last minute.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use omni::modules::Registry;
use omni::proto::omni::omni_client::OmniClient;
use omni::proto::omni::{self as pb};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::*;
use crate::serve::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_watches_with_unavailable_and_a_restarted_service_resumes_them() {
    let dir = tempfile::tempdir().unwrap();
    let t = topology_for("serve-term", dir.path());
    let job = RunningJob::start(t.clone(), Registry::with_builtins()).await;
    let mut serve = ServeProcess::spawn(&t, dir.path(), &[]);
    let mut client = serve.client().await;
    let room = format!("app/{}/room/r1", t.application_id);
    for i in 1..=3 {
        client.publish(publish_event(&room, tag_event(&format!("e{i}"), "n", &i.to_string()))).await.unwrap();
    }
    snapshot_at(&mut client, &room, 3).await;
    let mut watch = client.watch(pb::WatchRequest { pattern: room.clone() }).await.unwrap().into_inner();
    let mut rooms = BTreeMap::new();
    follow_until(&mut watch, &mut rooms, &BTreeMap::from([(room.clone(), 3)])).await;

    serve.signal("-TERM");
    let ended = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.expect("the watch ends at once");
    assert_eq!(ended.map(|_| ()).unwrap_err().code(), Code::Unavailable);
    assert!(serve.wait_exit(Duration::from_secs(15)).success(), "{}", serve.log_text());

    // Changes while the service is down; the client resumes from its last version.
    let publisher = omni::pubsub::Publisher::new(&t.kafka, t.input_topic()).unwrap();
    for i in 4..=6 {
        let event = tag_event(&format!("e{i}"), "n", &i.to_string());
        publisher.publish(&room.parse().unwrap(), &omni::proto::Message::encode_to_vec(&event)).await.unwrap();
    }
    let mut serve = ServeProcess::spawn_on(&t, dir.path(), &[], &serve.addr.clone());
    let mut client = serve.client().await;
    snapshot_at(&mut client, &room, 6).await;
    let last = rooms[&room].version;
    let deltas = client
        .get_deltas(pb::GetDeltasRequest { path: room.clone(), after_version: last, limit: 0 })
        .await
        .unwrap()
        .into_inner();
    for change in deltas.changes {
        apply(&mut rooms, pb::WatchEvent { event: Some(pb::watch_event::Event::Change(change)) });
    }
    assert_eq!(rooms[&room].version, 6);
    let mut watch = client.watch(pb::WatchRequest { pattern: room.clone() }).await.unwrap().into_inner();
    client.publish(publish_event(&room, tag_event("e7", "n", "7"))).await.unwrap();
    follow_until(&mut watch, &mut rooms, &BTreeMap::from([(room.clone(), 7)])).await;
    let seen: Vec<u64> = rooms[&room].events.iter().map(|(_, v)| *v).collect();
    assert_eq!(&seen[..4], [3, 4, 5, 6], "{seen:?}");
    assert_eq!(seen.last(), Some(&7));
    assert_eq!(rooms[&room].modules["tags"]["n"], "7");
    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_unavailable_within_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let redis = ScratchRedis::start(&dir.path().join("redis"));
    let mut t = topology_for("serve-redis-down", dir.path());
    t.redis.url = redis.url("");
    t.service.redis_timeout_ms = 2000;
    let mut serve = ServeProcess::spawn(&t, dir.path(), &[]);
    let mut client = serve.client().await;
    let room = format!("app/{}/room/r1", t.application_id);
    let known = client.get_snapshot(pb::GetSnapshotRequest { path: room.clone() }).await.map(|_| ()).unwrap_err();
    assert_eq!(known.code(), Code::NotFound, "{known}");
    drop(redis);
    for _ in 0..2 {
        let started = Instant::now();
        let down = client.get_snapshot(pb::GetSnapshotRequest { path: room.clone() }).await.map(|_| ()).unwrap_err();
        assert_eq!(down.code(), Code::Unavailable, "{down}");
        assert!(started.elapsed() < Duration::from_secs(4), "answered after {:?}", started.elapsed());
    }
    let started = Instant::now();
    let down = client.watch(pb::WatchRequest { pattern: room.clone() }).await.map(|_| ()).unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down}");
    assert!(started.elapsed() < Duration::from_secs(6), "answered after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_fails_publish_instead_of_dropping_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = topology_for("serve-kafka-down", dir.path());
    t.kafka.brokers = format!("127.0.0.1:{}", pick_free_port());
    t.service.publish_timeout_ms = 2000;
    let mut serve = ServeProcess::spawn(&t, dir.path(), &[]);
    let mut client = serve.client().await;
    let room = format!("app/{}/room/r1", t.application_id);
    let started = Instant::now();
    let failed = client.publish(publish_event(&room, tag_event("e1", "k", "v"))).await.map(|_| ()).unwrap_err();
    assert!(matches!(failed.code(), Code::Unavailable | Code::DeadlineExceeded), "{failed}");
    assert!(started.elapsed() < Duration::from_secs(10), "answered after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_alone_ends_with_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = topology_for("serve-slow", dir.path());
    t.service.watch_buffer = 1024;
    create_input(&t).await;
    let app = t.application_id.clone();
    let events = events_for(&app, 7, 4000, 30);
    let folder = folder(&["recording", "tags"]);
    let job = RunningJob::start(t.clone(), Registry::with_builtins()).await;
    let mut serve = ServeProcess::spawn(&t, dir.path(), &[]);
    let mut fast = serve.client().await;
    // A small HTTP/2 window, so the slow watcher's unread events back up into the service.
    let narrow = tonic::transport::Endpoint::from_shared(format!("http://{}", serve.addr))
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect()
        .await
        .unwrap();
    let mut slow_client = OmniClient::new(narrow);
    let mut slow = slow_client.watch(pb::WatchRequest { pattern: "app/>".into() }).await.unwrap().into_inner();
    let mut watch = fast.watch(pb::WatchRequest { pattern: "app/>".into() }).await.unwrap().into_inner();
    // In batches the fast watcher drains before the next, so no commit's burst
    // of changes outruns its ring on this busy machine; the slow one never reads.
    let producer = producer();
    let mut rooms = BTreeMap::new();
    for end in (400..=events.len()).step_by(400) {
        produce(&producer, t.input_topic(), &events[end - 400..end]);
        let expected = model(&folder, &events[..end]);
        let finals: BTreeMap<String, u64> = expected.rooms.iter().map(|(r, s)| (r.clone(), s.version)).collect();
        follow_until(&mut watch, &mut rooms, &finals).await;
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let ended = loop {
        match tokio::time::timeout_at(deadline, slow.message()).await.expect("the slow watcher's stream ends") {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the slow watcher's stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended}");
    assert!(ended.message().contains("watch_buffer"), "{ended}");
    let (_, text) = http_get(&serve.addr, "/metrics").await.expect("/metrics answers");
    assert_eq!(metric_sum(&text, "omni_service_watchers_dropped_total"), Some(1.0), "{text}");
    assert_eq!(metric_sum(&text, "omni_service_watchers"), Some(1.0), "the fast watcher is still there: {text}");
    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_service_is_ready_only_once_it_has_read_the_broadcasts_last_minute() {
    use omni::proto::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let t = topology_for("serve-catchup", dir.path());
    create_broadcast(&t).await;
    // A busy minute of broadcast, for the service to read before it is ready.
    let records = 300_000;
    let producer = producer();
    for i in 0..records {
        let path = format!("app/{}/room/r{}", t.application_id, i % 1000);
        let change = pb::StateChange {
            path: path.clone(),
            version: (i / 1000 + 1) as u64,
            module: "tags".into(),
            state_json: "{}".into(),
            ..Default::default()
        };
        produce_raw(&producer, &t.broadcast_topic, Some(path.as_bytes()), Some(&change.encode_to_vec()));
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(60)).unwrap();

    let mut serve = ServeProcess::spawn(&t, dir.path(), &[]);
    serve.client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut polls_not_ready = 0;
    loop {
        // The gRPC health of the service, as a load balancer or a readiness
        // probe asks it, says the same as `/readyz`; the process's own (`""`)
        // is alive. Asked first: it turns SERVING only after `/readyz` says ready.
        let service = grpc_health(&serve.addr, "omni.v1.Omni").await;
        assert_eq!(grpc_health(&serve.addr, "").await, ServingStatus::Serving);
        if http_get(&serve.addr, "/readyz").await.map(|r| r.0) == Some(200) {
            break;
        }
        assert_eq!(service, ServingStatus::NotServing, "omni.v1.Omni's health while /readyz is not ready");
        polls_not_ready += 1;
        assert!(Instant::now() < deadline, "omni serve not ready within 60 s: {}", serve.log_text());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = http_get(&serve.addr, "/metrics").await.expect("metrics").1;
    let read = metric_sum(&metrics, "omni_service_broadcast_age_seconds_count").unwrap_or(0.0);
    assert!(read >= records as f64, "ready after reading {read} of the {records} records of the last minute");
    assert!(polls_not_ready > 0, "the service was ready at once, so the test showed nothing");
    let deadline = Instant::now() + Duration::from_secs(5);
    while grpc_health(&serve.addr, "omni.v1.Omni").await != ServingStatus::Serving {
        assert!(Instant::now() < deadline, "omni.v1.Omni is not SERVING 5 s after /readyz said ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the standard gRPC health service says of `service`.
async fn grpc_health(addr: &str, service: &str) -> ServingStatus {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await;
    let mut health = HealthClient::new(channel.expect("connecting for a health check"));
    let answer = health.check(HealthCheckRequest { service: service.into() }).await.expect("a health check");
    ServingStatus::try_from(answer.into_inner().status).expect("a known status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_no_change_stream_fills_is_a_resynchronisation_the_metrics_count() {
    use omni::proto::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let t = topology_for("serve-resync", dir.path());
    create_broadcast(&t).await;
    let mut serve = ServeProcess::spawn(&t, dir.path(), &[]);
    let mut client = serve.client().await;
    let room = format!("app/{}/room/r1", t.application_id);
    let mut watch = client.watch(pb::WatchRequest { pattern: room.clone() }).await.unwrap().into_inner();

    // A close at version 2 of a room Redis holds nothing of: version 1 is in
    // no change stream, so the watcher can only resynchronise.
    let close = pb::StateChange {
        path: room.clone(),
        version: 2,
        module: omni::modules::ROOM_MODULE.into(),
        state_json: "{}".into(),
        ..Default::default()
    };
    let producer = producer();
    produce_raw(&producer, &t.broadcast_topic, Some(room.as_bytes()), Some(&close.encode_to_vec()));
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30)).unwrap();
    let event = tokio::time::timeout(Duration::from_secs(30), watch.message()).await.unwrap().unwrap().unwrap();
    match event.event {
        Some(pb::watch_event::Event::Resynchronised(snapshot)) => {
            assert_eq!((snapshot.path, snapshot.version), (room, 2))
        }
        other => panic!("expected a resynchronisation, got {other:?}"),
    }
    let name = "omni_service_watchers_resynchronised_total";
    let deadline = Instant::now() + Duration::from_secs(10);
    while scraped_metric(&serve.addr, name).await != Some(1.0) {
        assert!(Instant::now() < deadline, "{name} is {:?}, not 1", scraped_metric(&serve.addr, name).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
