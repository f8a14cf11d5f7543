//! Pub/sub on the real broker: fan-out subscribers, queue groups, start
//! points, and the Java-compatible partitioner. Late joiners that follow
//! room state are in `late_joiners.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use omni::kafka::{ensure_topics, partition_for, TopicSpec};
use omni::path::Path;
use omni::pubsub::{Delivery, Pattern, Publisher, QueueSubscriber, StartAt, Subscriber};
use rand::{Rng, SeedableRng};
use rdkafka::producer::Producer as _;

use crate::common::*;

/// Creates a topic and waits until its partitions' leaders serve offset queries.
async fn create_topic(name: &str, partitions: i32) {
    ensure_topics(&kafka(), &[TopicSpec { name: name.to_owned(), partitions, configs: vec![] }])
        .await
        .expect("creating a topic");
    drop(subscribe_retrying(&kafka(), name).await);
}

fn path(text: &str) -> Path {
    text.parse().unwrap_or_else(|e| panic!("{text:?} is a path: {e}"))
}

/// `per_partition` room subjects `<prefix>/room/r<i>` for every partition, so a batch covers them all.
fn subjects_covering(prefix: &str, partitions: i32, per_partition: usize) -> Vec<String> {
    let mut by_partition: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        if (0..partitions).all(|p| by_partition.get(&p).map_or(0, Vec::len) >= per_partition) {
            break;
        }
        let subject = format!("{prefix}/room/r{i}");
        let list = by_partition.entry(partition_for(subject.as_bytes(), partitions)).or_default();
        if list.len() < per_partition {
            list.push(subject);
        }
    }
    by_partition.into_values().flatten().collect()
}

/// Receives until `want` deliveries arrived (or `timeout` passed), then keeps
/// reading for a second to catch anything extra.
async fn collect(sub: &mut Subscriber, want: usize, timeout: Duration) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < want {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(Ok(delivery))) => got.push(delivery),
            Ok(Some(Err(e))) => panic!("subscriber on {} failed: {e}", sub.topic()),
            Ok(None) => panic!("subscriber on {} ended", sub.topic()),
            Err(_) => break,
        }
    }
    while let Ok(Some(next)) = tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
        got.push(next.expect("subscriber delivery"));
    }
    got
}

/// What identifies a delivery, for comparing sets.
type Key = (i32, i64, String, Vec<u8>);

fn keys(deliveries: &[Delivery]) -> BTreeSet<Key> {
    deliveries.iter().map(|d| (d.partition, d.offset, d.subject.clone(), d.payload.clone())).collect()
}

/// Within each partition, deliveries arrive in offset order, once each.
fn assert_in_partition_order(deliveries: &[Delivery], who: &str) {
    let mut last: HashMap<i32, i64> = HashMap::new();
    for d in deliveries {
        if let Some(previous) = last.insert(d.partition, d.offset) {
            assert!(
                d.offset > previous,
                "{who}: partition {} went from offset {previous} to {}",
                d.partition,
                d.offset
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_with_a_wildcard_each_receive_every_matching_record_and_nothing_else() {
    let topic = unique("fanout");
    create_topic(&topic, 4).await;
    let settings = kafka();
    let pattern = Pattern::parse("app/*/room/*").unwrap();
    let mut first = Subscriber::subscribe(&settings, &topic, pattern.clone(), StartAt::Latest).await.unwrap();
    let mut second = Subscriber::subscribe(&settings, &topic, pattern.clone(), StartAt::Latest).await.unwrap();
    assert_eq!(first.resolved_offsets(), &BTreeMap::from([(0, 0), (1, 0), (2, 0), (3, 0)]));

    let mut subjects = subjects_covering("app/a1", 4, 3);
    subjects.extend(subjects_covering("app/b\\/2", 4, 2));
    let matching = subjects.len();
    // Same topic, subjects the pattern must drop: other tags, deeper paths, another root.
    subjects.extend(
        [
            "app/a1/user/u1",
            "app/a1/room/r1/user/u1",
            "app/a1/channel/c1",
            "region/eu/room/r1",
            "app/a2/room/r2/session/s",
        ]
        .map(String::from),
    );
    let publisher = Publisher::new(&settings, &topic).unwrap();
    let mut expected = Vec::new();
    let mut published_partitions = BTreeSet::new();
    for i in 0..300 {
        let index = i % subjects.len();
        let subject = path(&subjects[index]);
        let payload = format!("m{i}").into_bytes();
        let content_type = (i % 5 == 0).then_some("text/plain");
        let (partition, offset) = if content_type.is_some() {
            publisher.publish_to(&topic, &subject, &payload, content_type).await.unwrap()
        } else {
            publisher.publish(&subject, &payload).await.unwrap()
        };
        published_partitions.insert(partition);
        if index < matching {
            assert!(pattern.matches(&subject.to_string()));
            expected.push((partition, offset, subject.to_string(), payload, content_type.map(String::from)));
        } else {
            assert!(!pattern.matches(&subject.to_string()), "{subject} was meant not to match");
        }
    }
    assert_eq!(published_partitions.len(), 4, "the records span every partition");
    let want: BTreeSet<Key> = expected.iter().map(|(p, o, s, v, _)| (*p, *o, s.clone(), v.clone())).collect();

    for (who, sub) in [("first", &mut first), ("second", &mut second)] {
        let got = collect(sub, want.len(), Duration::from_secs(60)).await;
        assert_eq!(got.len(), want.len(), "{who} received {} records, expected {}", got.len(), want.len());
        assert_eq!(keys(&got), want, "{who} received exactly the matching records");
        assert_in_partition_order(&got, who);
        for d in &got {
            assert_eq!(d.topic, topic);
            assert_eq!(
                d.partition,
                partition_for(d.subject.as_bytes(), 4),
                "{who}: {} on its hash partition",
                d.subject
            );
            let sent = expected.iter().find(|e| e.0 == d.partition && e.1 == d.offset).unwrap();
            assert_eq!(d.content_type, sent.4, "{who}: content type of {}@{}", d.partition, d.offset);
            assert!(d.timestamp_millis.is_some_and(|t| t > 0));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_members_split_the_records_each_exactly_once() {
    let topic = unique("queue");
    let queue = unique("workers");
    let partitions = 4;
    create_topic(&topic, partitions).await;
    let settings = kafka();
    let pattern = Pattern::parse("app/*/room/*").unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Delivery)>();
    let mut members = Vec::new();
    for member in 0..2 {
        let mut sub =
            QueueSubscriber::join(&settings, &topic, &queue, pattern.clone(), StartAt::Earliest).await.unwrap();
        assert_eq!(sub.queue(), queue);
        let tx = tx.clone();
        members.push(tokio::spawn(async move {
            while let Some(next) = sub.next().await {
                match next {
                    Ok(delivery) => {
                        if tx.send((member, delivery)).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(member, error = %e, "queue member error"),
                }
            }
        }));
    }
    assert!(
        matches!(
            QueueSubscriber::join(&settings, &topic, &queue, pattern.clone(), StartAt::Timestamp(0)).await,
            Err(omni::pubsub::PubSubError::UnsupportedStart(_))
        ),
        "a queue refuses a timestamp start"
    );

    let publisher = Publisher::new(&settings, &topic).unwrap();
    // A trickle on every partition until both members have been given partitions.
    let warm_subjects = subjects_covering("app/warm", partitions, 1);
    let mut warmed = [false; 2];
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut round = 0;
    while !(warmed[0] && warmed[1]) {
        assert!(Instant::now() < deadline, "both queue members never received records (got {warmed:?})");
        for subject in &warm_subjects {
            publisher.publish(&path(subject), format!("warm{round}").as_bytes()).await.unwrap();
        }
        round += 1;
        if let Ok(Some((member, _))) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            warmed[member] = true;
        }
        while let Ok((member, _)) = rx.try_recv() {
            warmed[member] = true;
        }
    }

    let subjects = subjects_covering("app/q", partitions, 5);
    let total = 400;
    let mut sent = BTreeMap::new();
    for i in 0..total {
        let subject = &subjects[i % subjects.len()];
        let payload = format!("job{i}");
        let (partition, offset) = publisher.publish(&path(subject), payload.as_bytes()).await.unwrap();
        sent.insert(payload, (partition, offset));
        // Records whose subject does not match are consumed but never delivered.
        if i % 50 == 0 {
            publisher.publish(&path("app/q/user/u1"), b"not for the queue").await.unwrap();
        }
    }

    let mut received: BTreeMap<String, Vec<(usize, i32, i64)>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let record = |member: usize, d: Delivery, received: &mut BTreeMap<String, Vec<(usize, i32, i64)>>| {
        let payload = String::from_utf8(d.payload).unwrap();
        assert!(pattern.matches(&d.subject), "delivered non-matching subject {}", d.subject);
        if payload.starts_with("job") {
            received.entry(payload).or_default().push((member, d.partition, d.offset));
        }
    };
    while received.len() < total {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((member, d))) => record(member, d, &mut received),
            Ok(None) => panic!("queue members stopped"),
            Err(_) => panic!("the queue delivered only {} of {total} records", received.len()),
        }
    }
    while let Ok(Some((member, d))) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        record(member, d, &mut received);
    }
    for m in &members {
        m.abort();
    }

    let mut per_member = [0usize; 2];
    let mut owners: BTreeMap<i32, BTreeSet<usize>> = BTreeMap::new();
    for (payload, deliveries) in &received {
        assert_eq!(deliveries.len(), 1, "{payload} was delivered {} times: {deliveries:?}", deliveries.len());
        let (member, partition, offset) = deliveries[0];
        assert_eq!(sent[payload], (partition, offset), "{payload} came from where it was published");
        per_member[member] += 1;
        owners.entry(partition).or_default().insert(member);
    }
    assert_eq!(received.len(), total);
    assert!(per_member.iter().all(|&n| n > 0), "both members received a share: {per_member:?}");
    for (partition, members) in &owners {
        assert_eq!(members.len(), 1, "partition {partition} went to one member, not {members:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_points_earliest_latest_offsets_and_timestamp_resolve_as_documented() {
    let topic = unique("start");
    let partitions = 3;
    create_topic(&topic, partitions).await;
    let settings = kafka();
    let publisher = Publisher::new(&settings, &topic).unwrap();
    let subjects = subjects_covering("app/s", partitions, 3);
    let all = Pattern::parse(">").unwrap();

    let mut before: Vec<Key> = Vec::new();
    for i in 0..30 {
        let subject = &subjects[i % subjects.len()];
        let payload = format!("before{i}").into_bytes();
        let (p, o) = publisher.publish(&path(subject), &payload).await.unwrap();
        before.push((p, o, subject.clone(), payload));
    }
    let count_before = |p: i32| before.iter().filter(|k| k.0 == p).count() as i64;
    assert!((0..partitions).all(|p| count_before(p) >= 3));

    // The newest timestamp already published; anything published later is at or after t.
    let mut probe = Subscriber::subscribe(&settings, &topic, all.clone(), StartAt::Earliest).await.unwrap();
    let seen = collect(&mut probe, before.len(), Duration::from_secs(60)).await;
    assert_eq!(keys(&seen), before.iter().cloned().collect());
    let t = seen.iter().filter_map(|d| d.timestamp_millis).max().unwrap() + 1;

    let p0: Vec<i64> = before.iter().filter(|k| k.0 == 0).map(|k| k.1).collect();
    let mid = p0[p0.len() / 2];
    let offsets = BTreeMap::from([(0, mid), (1, 1_000_000), (7, 3)]);

    let mut earliest = Subscriber::subscribe(&settings, &topic, all.clone(), StartAt::Earliest).await.unwrap();
    let mut latest = Subscriber::subscribe(&settings, &topic, all.clone(), StartAt::Latest).await.unwrap();
    let mut explicit = Subscriber::subscribe(&settings, &topic, all.clone(), StartAt::Offsets(offsets)).await.unwrap();
    let mut since = Subscriber::subscribe(&settings, &topic, all.clone(), StartAt::Timestamp(t)).await.unwrap();

    let ends: BTreeMap<i32, i64> = (0..partitions).map(|p| (p, count_before(p))).collect();
    assert_eq!(earliest.resolved_offsets(), &(0..partitions).map(|p| (p, 0)).collect::<BTreeMap<_, _>>());
    assert_eq!(latest.resolved_offsets(), &ends);
    // Listed partitions start there (clamped to the end); unknown ones are ignored; others start at the end.
    assert_eq!(explicit.resolved_offsets(), &BTreeMap::from([(0, mid), (1, ends[&1]), (2, ends[&2])]));
    // Nothing at or after t yet: every partition starts at its end.
    assert_eq!(since.resolved_offsets(), &ends);

    let mut after: Vec<Key> = Vec::new();
    for i in 0..30 {
        let subject = &subjects[(i + 1) % subjects.len()];
        let payload = format!("after{i}").into_bytes();
        let (p, o) = publisher.publish(&path(subject), &payload).await.unwrap();
        after.push((p, o, subject.clone(), payload));
    }
    assert!((0..partitions).all(|p| after.iter().any(|k| k.0 == p)));

    let after_set: BTreeSet<Key> = after.iter().cloned().collect();
    let everything: BTreeSet<Key> = before.iter().chain(&after).cloned().collect();
    let from_mid: BTreeSet<Key> = before.iter().filter(|k| k.0 == 0 && k.1 >= mid).chain(&after).cloned().collect();
    for (who, sub, want) in [
        ("earliest", &mut earliest, everything),
        ("latest", &mut latest, after_set.clone()),
        ("offsets", &mut explicit, from_mid),
        ("timestamp", &mut since, after_set),
    ] {
        let got = collect(sub, want.len(), Duration::from_secs(60)).await;
        assert_eq!(got.len(), want.len(), "{who}: {} deliveries, expected {}", got.len(), want.len());
        assert_eq!(keys(&got), want, "{who} received exactly its records");
        assert_in_partition_order(&got, who);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_land_on_the_java_clients_murmur2_partition() {
    let topic = unique("partitioner");
    let partitions = 7;
    create_topic(&topic, partitions).await;
    let publisher = Publisher::new(&kafka(), &topic).unwrap();

    let mut keys_sent: Vec<Vec<u8>> = Vec::new();
    for i in 0..150 {
        // Escaped separators and multi-byte values vary the key length and bytes.
        let subject = match i % 3 {
            0 => Path::room(&format!("a{}", i % 11), &format!("r{i}")).unwrap(),
            1 => Path::room("x/y\\z", &format!("ü{i}")).unwrap(),
            _ => path(&format!("app/a{i}/channel/c{}/room/{}", i * 7, "r".repeat(i % 9 + 1))),
        };
        let key = subject.to_string().into_bytes();
        let (partition, _) = publisher.publish(&subject, b"p").await.unwrap();
        assert_eq!(partition, partition_for(&key, partitions), "publisher put {subject} on {partition}");
        keys_sent.push(key);
    }

    let producer = producer();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for _ in 0..150 {
        let len = rng.random_range(1..=40);
        let key: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        produce_raw(&producer, &topic, Some(&key), Some(b"raw"));
        keys_sent.push(key);
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let records = read_committed(&topic, keys_sent.len(), Duration::from_secs(60));
    assert_eq!(records.len(), keys_sent.len(), "every record read back");
    let mut used = BTreeSet::new();
    for r in &records {
        let key = r.key.as_deref().expect("keyed record");
        assert_eq!(r.partition, partition_for(key, partitions), "key {key:?} is on murmur2's partition");
        used.insert(r.partition);
    }
    assert_eq!(used.len(), partitions as usize, "the keys spread over every partition");
    let read_keys: BTreeSet<Vec<u8>> = records.iter().filter_map(|r| r.key.clone()).collect();
    assert_eq!(read_keys, keys_sent.into_iter().collect::<BTreeSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_waiting_for_missing_topics_start_once_they_are_created() {
    // `subscribe` documents that it waits for the topic to exist. Several
    // subscribers wait on topics that are then created, as a processing job
    // creates its broadcast topic while followers already wait for it.
    let settings = kafka();
    let topics: Vec<String> = (0..16).map(|_| unique("later")).collect();
    let waiting: Vec<_> = topics
        .iter()
        .map(|topic| {
            let settings = settings.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                Subscriber::subscribe(&settings, &topic, Pattern::parse(">").unwrap(), StartAt::Earliest).await
            })
        })
        .collect();
    for topic in &topics {
        ensure_topics(&settings, &[TopicSpec { name: topic.clone(), partitions: 4, configs: vec![] }]).await.unwrap();
    }
    let publisher = Publisher::new(&settings, &topics[0]).unwrap();
    let mut failures = Vec::new();
    for (topic, task) in topics.iter().zip(waiting) {
        match tokio::time::timeout(Duration::from_secs(60), task).await {
            Ok(Ok(Ok(mut sub))) => {
                let room = Path::room("a", "r").unwrap();
                publisher.publish_to(topic, &room, b"hello", None).await.unwrap();
                let got = collect(&mut sub, 1, Duration::from_secs(30)).await;
                assert_eq!(got.len(), 1, "{topic}: the first record after creation arrives");
            }
            Ok(Ok(Err(e))) => failures.push(format!("{topic}: {e}")),
            Ok(Err(e)) => failures.push(format!("{topic}: task {e}")),
            Err(_) => failures.push(format!("{topic}: still waiting after 60 s")),
        }
    }
    assert!(failures.is_empty(), "subscribing to a topic being created failed: {failures:?}");
}

// ---------------------------------------------------------------------------
// Late joiners.

/// A subscriber from the beginning of `topic`, retrying while a new topic's leaders settle.
pub(crate) async fn subscribe_retrying(settings: &omni::kafka::KafkaSettings, topic: &str) -> Subscriber {
    wait_for(Duration::from_secs(60), &format!("a subscription to {topic}"), || async {
        match Subscriber::subscribe(settings, topic, Pattern::parse(">").unwrap(), StartAt::Earliest).await {
            Ok(sub) => Some(sub),
            Err(e) => {
                tracing::warn!(topic, error = %e, "subscribing failed; retrying");
                None
            }
        }
    })
    .await
}
