//! No input stalls the job: an oversized room is dead-lettered while every
//! other room flows, a record the broker refuses is traced back to its event
//! and dead-lettered with the reason, output topics too small for the limits
//! stop the job at start-up with a clear message, a module that panics
//! dead-letters the event instead of crash-looping, and a partition whose
//! committed offset another instance's open transaction holds waits alone
//! while the others flow.

use std::collections::BTreeSet;
use std::time::Duration;

use omni::kafka::{ensure_topics, TopicSpec};
use omni::modules::{Limits, Module, Registry, Rejection, RoomFolder};
use omni::proto::tecate::room_event::Kind;
use omni::proto::tecate::{RoomEvent, TagSet};
use omni::proto::Message as _;
use omni::runtime::HEADER_ERROR_KIND;
use omni::topology::Topology;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;

use crate::common::*;

fn tag_set(id: usize, room: &str, key: &str, value: String) -> (String, RoomEvent) {
    (room.to_owned(), event(id, 1_795_773_600_000 + id as i64, Kind::TagSet(TagSet { key: key.into(), value })))
}

/// Text of `len` random characters, so compression cannot shrink records below the broker's limits.
fn random_text(rng: &mut impl Rng, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// Creates the topology's input and broadcast topics with the broker's
/// defaults (a 1 MiB `max.message.bytes`), as a new user's cluster would.
async fn create_with_broker_defaults(topology: &Topology, extra: Vec<(&'static str, String)>) {
    let spec = |name: &str, configs| TopicSpec { name: name.to_owned(), partitions: topology.partitions, configs };
    ensure_topics(&topology.kafka, &[spec(topology.input_topic(), vec![]), spec(&topology.broadcast_topic, extra)])
        .await
        .expect("creating topics with the broker's defaults");
}

/// The dead letters of a topic, as (room, kind, reason, event id).
fn dead_letters(topic: &str, want: usize) -> Vec<(String, String, String, String)> {
    read_committed(topic, want, Duration::from_secs(90))
        .into_iter()
        .map(|read| {
            let room = String::from_utf8(read.key.unwrap_or_default()).unwrap();
            let event_id = read.value.as_deref().map_or(String::new(), |v| RoomEvent::decode(v).unwrap().event_id);
            let reason = read.headers.get("omni.error.message").cloned().unwrap_or_default();
            (room, read.headers[HEADER_ERROR_KIND].clone(), reason, event_id)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_room_is_dead_lettered_and_every_other_room_flows() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("oversized", 4, &dir.path().join("state"));
    create_with_broker_defaults(&topology, vec![]).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    let mut events = Vec::new();
    for k in 0..256 {
        events.push(tag_set(events.len(), "app/big/room/big", &format!("k{k:03}"), random_text(&mut rng, 4096)));
        let small = format!("app/a/room/small{}", k % 60);
        events.push(tag_set(events.len(), &small, &format!("k{}", k / 60), "v".into()));
    }
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    let big = &expected.rooms["app/big/room/big"];
    let accepted = big.version as usize;
    assert!(accepted > 64 && accepted < 256, "the room stops at its byte limit: {accepted} tags");
    assert_eq!(expected.rooms.len(), 61, "every small room has state");

    produce(&producer(), topology.input_topic(), &events);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;
    let dead = dead_letters(&topology.dead_letter_topic, 256 - accepted);
    assert_eq!(dead.len(), 256 - accepted, "every refused event is dead-lettered once");
    for (room, kind, reason, _) in &dead {
        assert_eq!((room.as_str(), kind.as_str()), ("app/big/room/big", "over_limit"));
        assert!(reason.contains("over the 524288-byte limit"), "{reason}");
    }
    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_is_dead_lettered_with_its_reason_and_the_rest_flows() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("refused", 2, &dir.path().join("state"));
    create_input(&topology).await;
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    // The broadcast topic shrinks under the running job, as an operator's
    // mistake would make it: its records past 300 kB are refused from now on.
    let admin: AdminClient<DefaultClientContext> = topology.kafka.client_config().create().unwrap();
    let alter =
        AlterConfig::new(ResourceSpecifier::Topic(&topology.broadcast_topic)).set("max.message.bytes", "300000");
    for result in admin.alter_configs(&[alter], &AdminOptions::new()).await.unwrap() {
        result.expect("altering the broadcast topic");
    }

    let fat = "app/a/room/fat";
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut events = Vec::new();
    for k in 0..100 {
        events.push(tag_set(events.len(), fat, &format!("k{k:02}"), random_text(&mut rng, 4000)));
        for r in 0..10 {
            events.push(tag_set(events.len(), &format!("app/a/room/thin{r}"), &format!("k{}", k % 7), format!("{k}")));
        }
    }
    // A close ends the fat room small again, and tells when its events are all done.
    events.push((fat.to_owned(), event(events.len(), 1_795_773_700_000, Kind::RoomClosed(Default::default()))));
    produce(&producer(), topology.input_topic(), &events);

    let client = redis::Client::open(topology.redis.url.as_str()).unwrap();
    let mut conn = redis_connection(&client).await;
    let keys = omni::view::KeyLayout::new(&topology.redis.key_prefix);
    let closed_at = wait_for(Duration::from_secs(180), "the fat room's close in redis", || {
        let (mut conn, keys) = (conn.clone(), keys.clone());
        async move {
            let changes = omni::view::changes_after(&mut conn, &keys, fat, 0).await.ok()?;
            let last = changes.last()?;
            (last.module == "room").then_some(last.version)
        }
    })
    .await;
    // The close is the fat room's version after its accepted tags.
    let refused_count = 100 - (closed_at as usize - 1);
    assert!(refused_count >= 10, "the fat room's largest records were refused: {refused_count}");
    let dead = dead_letters(&topology.dead_letter_topic, refused_count);
    assert_eq!(dead.len(), refused_count, "every refused event is dead-lettered");
    let refused: BTreeSet<String> = dead.iter().map(|(_, _, _, id)| id.clone()).collect();
    assert_eq!(refused.len(), dead.len(), "each refused event is dead-lettered once");
    for (room, kind, reason, _) in &dead {
        assert_eq!((room.as_str(), kind.as_str()), (fat, "production_refused"));
        assert!(reason.contains(&topology.broadcast_topic) && reason.contains("too large"), "{reason}");
    }
    let folder = folder(&["recording", "tags"]);
    let kept: Vec<_> = events.iter().filter(|(_, e)| !refused.contains(&e.event_id)).cloned().collect();
    let expected = model(&folder, &kept);
    assert_eq!(expected.rooms[fat].version, 101 - refused.len() as u64);
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;
    let extra = read_committed(&topology.dead_letter_topic, refused_count + 1, Duration::from_secs(3));
    assert_eq!(extra.len(), refused_count, "no event is dead-lettered twice");
    let _ = &mut conn;
    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_refuses_to_start_when_an_output_topic_cannot_take_its_largest_record() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("small-topic", 2, &dir.path().join("state"));
    create_with_broker_defaults(&topology, vec![("max.message.bytes", "100000".into())]).await;
    let health = std::sync::Arc::new(omni::runtime::Health::default());
    let run = omni::runtime::run(topology.clone(), Registry::with_builtins(), health, std::future::pending());
    let error = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the job stops at start-up")
        .expect_err("the job refuses to start");
    let text = error.to_string();
    assert!(text.contains(&topology.broadcast_topic) && text.contains("max.message.bytes"), "{text}");
    assert!(text.contains("100000") && text.contains("limits.max_room_state_bytes"), "{text}");
}

/// Panics on a tag named `boom`, as a module with a bug would.
struct Fragile;

impl Module for Fragile {
    type State = u64;

    fn name(&self) -> &'static str {
        "fragile"
    }

    fn fold(&self, state: &u64, event: &RoomEvent, _: &Limits) -> Result<Option<u64>, Rejection> {
        match &event.kind {
            Some(Kind::TagSet(set)) if set.key == "boom" => panic!("fragile met a boom"),
            Some(Kind::TagSet(_)) => Ok(Some(state + 1)),
            _ => Ok(None),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_panics_dead_letters_the_event_and_the_job_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("panics", 2, &dir.path().join("state"));
    topology.modules = vec!["tags".into(), "fragile".into()];
    create_input(&topology).await;
    let registry = Registry::with_builtins().register(Fragile);
    let folder = RoomFolder::new(registry.select(&topology.modules).unwrap(), Limits::default());
    let mut events = generate(43, 600, 20);
    let booms: Vec<usize> = (0..600).step_by(50).collect();
    for &i in &booms {
        events[i].1.kind = Some(Kind::TagSet(TagSet { key: "boom".into(), value: "x".into() }));
    }
    let expected = model(&folder, &events);
    produce(&producer(), topology.input_topic(), &events);
    let job = RunningJob::start(topology.clone(), registry).await;
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;
    let dead = dead_letters(&topology.dead_letter_topic, booms.len());
    assert_eq!(dead.len(), booms.len());
    for (_, kind, reason, _) in &dead {
        assert_eq!(kind, "module_panic");
        assert!(reason.contains("module fragile panicked: fragile met a boom"), "{reason}");
    }
    job.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_under_a_taken_name_stops_the_job_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("taken", 1, &dir.path().join("state"));
    struct Impostor;
    impl Module for Impostor {
        type State = u64;
        fn name(&self) -> &'static str {
            "tags"
        }
        fn fold(&self, _: &u64, _: &RoomEvent, _: &Limits) -> Result<Option<u64>, Rejection> {
            Ok(None)
        }
    }
    let health = std::sync::Arc::new(omni::runtime::Health::default());
    let registry = Registry::with_builtins().register(Impostor);
    let error = omni::runtime::run(topology, registry, health, std::future::pending()).await.unwrap_err();
    assert!(error.to_string().contains("\"tags\" is registered twice"), "{error}");
}

/// Rooms of `tags` tags of `value_bytes` each, their events spread over the rooms in turn.
fn large_rooms(rooms: usize, tags: usize, value_bytes: usize, seed: u64) -> Vec<(String, RoomEvent)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut events = Vec::with_capacity(rooms * tags);
    for t in 0..tags {
        for r in 0..rooms {
            let value = random_text(&mut rng, value_bytes);
            events.push(tag_set(events.len(), &format!("app/big/room/r{r}"), &format!("t{t:02}"), value));
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_states_through_a_small_write_buffer_never_stall_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("write-buffer", 8, &dir.path().join("state"));
    // Memtables fill many times over: every flush must free room for the next writes.
    topology.store.memory.write_buffer_mib = 1;
    topology.store.memory.block_cache_mib = 4;
    create_input(&topology).await;
    let events = large_rooms(2000, 30, 200, 44);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    produce(&producer(), topology.input_topic(), &events);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;
    assert!(job.health.stall().is_none(), "no processing thread stalled");
    job.stop().await;
    assert_store_exact(&[&topology.store.dir], topology.partitions, &expected);
}

/// A dead instance's transaction, left open with an offset of `partition`
/// for the job's group: until it ends, a read_committed consumer cannot
/// read that partition's committed offset (KIP-447's stable offsets).
fn hold_offsets_open(topology: &Topology, partition: i32) -> rdkafka::producer::BaseProducer {
    use rdkafka::producer::Producer;
    use rdkafka::TopicPartitionList;
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &services().brokers)
        .set("transactional.id", unique("dead-instance"))
        .set("transaction.timeout.ms", "300000")
        .create()
        .expect("a transactional producer");
    let timeout = Duration::from_secs(30);
    producer.init_transactions(timeout).expect("init_transactions");
    producer.begin_transaction().expect("begin_transaction");
    let group: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &services().brokers)
        .set("group.id", &topology.application_id)
        .create()
        .expect("a consumer for the group's metadata");
    let metadata = rdkafka::consumer::Consumer::group_metadata(&group).expect("group metadata");
    let mut offsets = TopicPartitionList::new();
    offsets.add_partition_offset(topology.input_topic(), partition, rdkafka::Offset::Offset(0)).unwrap();
    producer.send_offsets_to_transaction(&offsets, &metadata, timeout).expect("send_offsets_to_transaction");
    producer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_offset_an_open_transaction_holds_waits_alone_while_the_others_flow() {
    use rdkafka::producer::Producer;
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("held-offset", 4, &dir.path().join("state"));
    let addr = format!("127.0.0.1:{}", pick_free_port());
    topology.http.listen = addr.clone();
    create_input(&topology).await;
    let held = 2;
    let dead_instance = hold_offsets_open(&topology, held);

    let events = generate(53, 2000, 80);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    let on_held = |room: &str| omni::kafka::partition_for(room.as_bytes(), topology.partitions) == held;
    let elsewhere: usize = expected.changes.iter().filter(|(room, _)| !on_held(room)).map(|(_, c)| c.len()).sum();
    assert!(elsewhere > 0 && elsewhere < expected.total_changes, "rooms on the held partition and elsewhere");
    produce(&producer(), topology.input_topic(), &events);

    let job = JobProcess::spawn(&topology, dir.path(), "i1");
    let changes = read_broadcast(&topology.broadcast_topic, elsewhere);
    assert_eq!(changes.len(), elsewhere, "every room off the held partition is processed while it waits");
    assert!(changes.iter().all(|c| !on_held(&c.path)), "nothing of the held partition before its offset is readable");
    let waiting = wait_for(Duration::from_secs(30), "the held partition reported as waiting to start", || async {
        scraped_metric(&addr, "omni_partitions_waiting_to_start").await.filter(|&n| n == 1.0)
    })
    .await;
    assert_eq!(waiting, 1.0);
    assert_eq!(http_get(&addr, "/readyz").await.map(|r| r.0), Some(503), "not ready while a partition cannot start");
    assert_eq!(
        scraped_metric(&addr, "omni_transaction_aborts_total").await.unwrap_or(0.0),
        0.0,
        "a partition that cannot start yet aborts nobody's work"
    );

    dead_instance.abort_transaction(Duration::from_secs(30)).expect("the dead instance's transaction ends");
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;
    wait_ready(&addr, Duration::from_secs(30)).await;
    assert_eq!(scraped_metric(&addr, "omni_partitions_waiting_to_start").await, Some(0.0));
    job.terminate();
}
