//! The processing job end to end: exact folding, outputs, dead letters.

use std::time::Duration;

use omni::modules::Registry;
use omni::proto::tecate::{room_event::Kind, TagSet};
use omni::proto::Message as _;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_events_over_hundreds_of_rooms_fold_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("e2e", 4, &dir.path().join("state"));
    create_input(&topology).await;
    let events = generate(1, 4000, 150);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    assert!(expected.rooms.len() > 300, "the run covers hundreds of rooms");

    let producer = producer();
    produce(&producer, topology.input_topic(), &events[..2000]);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    produce(&producer, topology.input_topic(), &events[2000..]);

    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;
    job.stop().await;
    assert_store_exact(&[&topology.store.dir], topology.partitions, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_with_reasons_and_the_rest_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("poison", 2, &dir.path().join("state"));
    // The generator uses six tag keys, so only the crowded room below breaks this.
    topology.limits.max_tags_per_room = 6;
    create_input(&topology).await;
    let producer = producer();
    let good = generate(7, 300, 20);
    produce(&producer, topology.input_topic(), &good[..150]);
    let tag = |k: &str, v: String| {
        event(9000, 1_795_773_600_000, Kind::TagSet(TagSet { key: k.into(), value: v })).encode_to_vec()
    };
    // (key, value, the error kind it must be dead-lettered with)
    type Poison = (Option<Vec<u8>>, Option<Vec<u8>>, &'static str);
    let poison: Vec<Poison> = vec![
        (Some(b"app/p/room/x".to_vec()), Some(vec![0xff, 0xff, 0xff, 0x01]), "undecodable"),
        (Some(b"not a path".to_vec()), Some(tag("k", "v".into())), "invalid_key"),
        (None, Some(tag("k", "v".into())), "invalid_key"),
        (Some(b"app/p/room/x".to_vec()), Some(tag(&"k".repeat(129), "v".into())), "over_limit"),
        (Some(b"app/p/room/x".to_vec()), Some(tag("k", "v".repeat(70 * 1024))), "over_limit"),
    ];
    for (key, value, _) in &poison {
        produce_raw(&producer, topology.input_topic(), key.as_deref(), value.as_deref());
    }
    // The seventh tag of a room over a limit of six.
    let crowded: Vec<(String, omni::proto::tecate::RoomEvent)> = (0..7)
        .map(|i| {
            (
                "app/p/room/crowded".to_owned(),
                event(9100 + i, 1_795_773_600_000, Kind::TagSet(TagSet { key: format!("t{i}"), value: "v".into() })),
            )
        })
        .collect();
    produce(&producer, topology.input_topic(), &crowded);
    produce(&producer, topology.input_topic(), &good[150..]);

    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    let mut all = good.clone();
    all.extend(crowded.iter().cloned());
    let mut limited = folder(&["recording", "tags"]);
    limited = omni::modules::RoomFolder::new(limited.modules().to_vec(), topology.limits.clone());
    let expected = model(&limited, &all);

    let dead = read_committed(&topology.dead_letter_topic, poison.len() + 1, Duration::from_secs(60));
    assert_eq!(dead.len(), poison.len() + 1, "every poison record is dead-lettered");
    for (key, value, kind) in &poison {
        let letter = dead.iter().find(|d| &d.key == key && &d.value == value).unwrap_or_else(|| {
            let seen: Vec<_> = dead
                .iter()
                .map(|d| (d.key.as_deref().map(String::from_utf8_lossy), d.headers.get("omni.error.kind")))
                .collect();
            panic!("no dead letter for a {kind} record with key {key:?}; dead letters: {seen:?}")
        });
        assert_eq!(letter.headers["omni.error.kind"], *kind);
        assert!(!letter.headers["omni.error.message"].is_empty());
        assert_eq!(letter.headers["omni.source.topic"], topology.input_topic());
        assert!(letter.headers["omni.source.offset"].parse::<i64>().is_ok());
        assert!(letter.headers["omni.source.partition"].parse::<i32>().is_ok());
    }
    assert!(dead
        .iter()
        .any(|d| d.headers["omni.error.kind"] == "over_limit" && d.headers["omni.error.message"].contains("6 tags")));

    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &limited, &expected).await;
    job.stop().await;
    assert_store_exact(&[&topology.store.dir], topology.partitions, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processing_threads_are_group_members_that_share_the_partitions_and_fold_exactly() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("threads", 6, &dir.path().join("state"));
    topology.instance.threads = 3;
    create_input(&topology).await;
    let events = generate(3, 3000, 120);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);

    let producer = producer();
    produce(&producer, topology.input_topic(), &events[..1500]);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    produce(&producer, topology.input_topic(), &events[1500..]);

    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;
    assert_eq!(job.health.assigned(), 6, "the threads hold every partition between them");
    let admin: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &services().brokers).create().unwrap();
    let groups = admin.fetch_group_list(Some(&topology.application_id), Duration::from_secs(10)).unwrap();
    let members = groups.groups().first().map_or(0, |g| g.members().len());
    assert_eq!(members, 3, "each thread is its own group member");
    job.stop().await;
    assert_store_exact(&[&topology.store.dir], topology.partitions, &expected);
}
