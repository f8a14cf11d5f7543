//! Transactions that end late or badly around the job's own: another
//! member's transaction that commits a partition's offset and state after
//! the partition was assigned here (its state is not lost), an abort on
//! one partition that must leave an idle partition's leases due, and a
//! transaction of timers alone, which still carries its partition's offset
//! so the group can fence a zombie's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use omni::modules::Registry;
use omni::proto::omni::RoomState;
use omni::proto::tecate::{room_event::Kind, RoomEvent, TagSet};
use omni::proto::Message as _;
use omni::topology::Topology;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::common::*;
use crate::leases::{leased_start, room};

fn tag(id: usize, key: &str) -> RoomEvent {
    event(id, 1_795_773_600_000 + id as i64, Kind::TagSet(TagSet { key: key.into(), value: key.into() }))
}

/// The room's state as Redis holds it, if any.
async fn snapshot(topology: &Topology, path: &str) -> Option<omni::view::RoomSnapshot> {
    let client = redis::Client::open(topology.redis.url.as_str()).unwrap();
    let mut conn = redis_connection(&client).await;
    let keys = omni::view::KeyLayout::new(&topology.redis.key_prefix);
    omni::view::snapshot(&mut conn, &keys, path).await.ok()?
}

async fn wait_for_version(
    topology: &Topology,
    path: &str,
    version: u64,
    timeout: Duration,
) -> omni::view::RoomSnapshot {
    wait_for(timeout, &format!("{path} at version {version} in redis"), || async {
        snapshot(topology, path).await.filter(|s| s.version == version)
    })
    .await
}

/// Another member's transaction: the room's next state in the changelog
/// and the input offset after the event behind it, left open.
fn other_members_transaction(topology: &Topology, path: &str, state: &RoomState, offset: i64) -> BaseProducer {
    let other: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &services().brokers)
        .set("transactional.id", unique("other-member"))
        .set("transaction.timeout.ms", "300000")
        .create()
        .unwrap();
    let timeout = Duration::from_secs(30);
    other.init_transactions(timeout).unwrap();
    other.begin_transaction().unwrap();
    let bytes = state.encode_to_vec();
    let changelog = topology.changelog_topic();
    let record = BaseRecord::<[u8], [u8]>::to(&changelog).partition(0).key(path.as_bytes()).payload(&bytes);
    other.send(record).map_err(|(e, _)| e).unwrap();
    other.flush(timeout).unwrap();
    let group: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &services().brokers)
        .set("group.id", &topology.application_id)
        .create()
        .unwrap();
    let metadata = rdkafka::consumer::Consumer::group_metadata(&group).unwrap();
    let mut offsets = rdkafka::TopicPartitionList::new();
    offsets.add_partition_offset(topology.input_topic(), 0, rdkafka::Offset::Offset(offset)).unwrap();
    other.send_offsets_to_transaction(&offsets, &metadata, timeout).unwrap();
    other
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_commits_after_the_partition_was_assigned_keeps_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("late-commit", 1, &dir.path().join("state"));
    create_input(&topology).await;
    let topic = topology.input_topic().to_owned();
    let r = room(&topology, "r");
    let producer = producer();
    produce_raw(&producer, &topic, Some(r.as_bytes()), Some(&tag(1, "k1").encode_to_vec()));
    producer.flush(Duration::from_secs(30)).unwrap();
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    wait_for_version(&topology, &r, 1, Duration::from_secs(30)).await;
    job.stop().await;

    // Another member processed e2 (input offset 1) into version 2, and its
    // transaction is still open when the partition is assigned here.
    produce_raw(&producer, &topic, Some(r.as_bytes()), Some(&tag(2, "k2").encode_to_vec()));
    producer.flush(Duration::from_secs(30)).unwrap();
    let changelog = read_committed(&topology.changelog_topic(), 1, Duration::from_secs(10));
    let mut state = RoomState::decode(changelog.last().unwrap().value.as_deref().unwrap()).unwrap();
    assert_eq!(state.version, 1);
    state.version = 2;
    let other = other_members_transaction(&topology, &r, &state, 2);

    let health = Arc::new(omni::runtime::Health::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = omni::runtime::run(topology.clone(), Registry::with_builtins(), Arc::clone(&health), async {
        let _ = stopped.await;
    });
    let task = tokio::spawn(run);
    wait_for(Duration::from_secs(60), "the partition assigned", || async { (health.assigned() == 1).then_some(()) })
        .await;
    // Long enough for a restore of one record to have finished, were it to go on alone.
    let assigned = Instant::now();
    wait_for(Duration::from_secs(10), "three seconds of the open transaction", || async {
        (assigned.elapsed() >= Duration::from_secs(3)).then_some(())
    })
    .await;
    assert!(!health.ready(), "the partition cannot start while the transaction holds its offset");
    other.commit_transaction(Duration::from_secs(30)).unwrap();
    wait_for(Duration::from_secs(60), "the job ready", || async { health.ready().then_some(()) }).await;

    produce_raw(&producer, &topic, Some(r.as_bytes()), Some(&tag(3, "k3").encode_to_vec()));
    producer.flush(Duration::from_secs(30)).unwrap();
    let after = wait_for(Duration::from_secs(30), "e3 folded", || async {
        snapshot(&topology, &r).await.filter(|s| s.modules.get("tags").is_some_and(|t| t.to_string().contains("k3")))
    })
    .await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), task).await.expect("the job stops").unwrap().unwrap();
    assert_eq!(after.version, 3, "e3 folded onto the committed version 2, not onto the version 1 a restore stopped at");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_partitions_lease_fires_after_an_abort_on_another_partition() {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("lease-abort", 2, &dir.path().join("state"));
    create_input(&topology).await;
    let topic = topology.input_topic().to_owned();
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    let producer = producer();
    let partition = |r: &str| omni::kafka::partition_for(r.as_bytes(), topology.partitions);
    let quiet = room(&topology, "quiet");
    let fat =
        (0..100).map(|i| room(&topology, &format!("fat{i}"))).find(|r| partition(r) != partition(&quiet)).unwrap();
    let ttl = Duration::from_secs(20);
    let taken = Instant::now();
    leased_start(&producer, &topic, &quiet, "rq", ttl);
    wait_for_version(&topology, &quiet, 1, Duration::from_secs(30)).await;

    // A broadcast topic too small for the fat room's changes: the broker
    // refuses one, and its transaction is aborted on the other partition.
    let admin: AdminClient<DefaultClientContext> = topology.kafka.client_config().create().unwrap();
    let alter =
        AlterConfig::new(ResourceSpecifier::Topic(&topology.broadcast_topic)).set("max.message.bytes", "300000");
    for result in admin.alter_configs(&[alter], &AdminOptions::new()).await.unwrap() {
        result.expect("altering the broadcast topic");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for k in 0..100 {
        let text: String = (0..4000).map(|_| (b'a' + rng.random_range(0..26u8)) as char).collect();
        let value =
            event(k, 1_795_773_600_000 + k as i64, Kind::TagSet(TagSet { key: format!("k{k:02}"), value: text }));
        produce_raw(&producer, &topic, Some(fat.as_bytes()), Some(&value.encode_to_vec()));
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let dead = read_committed(&topology.dead_letter_topic, 1, Duration::from_secs(60));
    assert!(!dead.is_empty(), "the broker refused a record, so a transaction was aborted");
    assert!(taken.elapsed() < ttl, "the abort came before the lease was due");

    let fired = wait_for_version(&topology, &quiet, 2, ttl + Duration::from_secs(40)).await;
    assert!(fired.modules["recording"].to_string().contains("heartbeat_lost"), "{:?}", fired.modules);
    job.stop().await;
}

/// The stamp omni leaves on the group's committed offset of partition 0.
fn committed_stamp(topology: &Topology) -> Option<String> {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &services().brokers)
        .set("group.id", &topology.application_id)
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition(topology.input_topic(), 0);
    let committed = consumer.committed_offsets(list, Duration::from_secs(10)).ok()?;
    let element = committed.elements().into_iter().next()?;
    Some(element.metadata().to_owned()).filter(|m| !m.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_of_timers_alone_commits_its_partitions_offset_too() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("timer-offsets", 1, &dir.path().join("state"));
    create_input(&topology).await;
    let topic = topology.input_topic().to_owned();
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    let quiet = room(&topology, "quiet");
    let producer = producer();
    leased_start(&producer, &topic, &quiet, "rq", Duration::from_secs(4));
    producer.flush(Duration::from_secs(30)).unwrap();
    wait_for_version(&topology, &quiet, 1, Duration::from_secs(30)).await;
    let before =
        wait_for(Duration::from_secs(30), "the start's commit stamped", || async { committed_stamp(&topology) }).await;

    // No input after the start: the fire's transaction holds the timer's change alone.
    wait_for_version(&topology, &quiet, 2, Duration::from_secs(30)).await;
    let after = wait_for(Duration::from_secs(30), "a commit after the fire", || async {
        committed_stamp(&topology).filter(|stamp| *stamp != before)
    })
    .await;
    assert!(after > before, "the fire's transaction re-committed the offset with a later stamp: {before} then {after}");
    job.stop().await;
}
