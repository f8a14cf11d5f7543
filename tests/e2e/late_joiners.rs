//! Late joiners on the real broker: followers that read a room's snapshot
//! from Redis and then follow its changes from the broadcast, while the
//! processing job runs and restarts, reach the exact final state with
//! contiguous versions, and resynchronise a room whose history Redis lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use omni::kafka::{ensure_topics, TopicSpec};
use omni::modules::{Registry, RoomFolder, ROOM_MODULE};
use omni::proto::omni::RoomState;
use omni::pubsub::{FollowEvent, Follower, Pattern};
use omni::topology::Topology;
use omni::view::KeyLayout;
use rand::{Rng, SeedableRng};

use crate::common::*;
use crate::pubsub::subscribe_retrying;

/// What one follower reported, and what it had to reach.
struct Followed {
    label: String,
    pattern: Pattern,
    /// Events published before it started.
    published_before: usize,
    events: Vec<FollowEvent>,
    errors: Vec<String>,
    failure: Option<String>,
}

/// Starts a follower now and reads it until every room it must know is at its final version.
fn spawn_follower(
    label: String,
    topology: &Topology,
    pattern: &str,
    lookback: Duration,
    published_before: usize,
    finals: Arc<BTreeMap<String, RoomState>>,
    prefix_versions: HashMap<String, u64>,
) -> tokio::task::JoinHandle<Followed> {
    let settings = topology.kafka.clone();
    let broadcast = topology.broadcast_topic.clone();
    let redis = redis::Client::open(topology.redis.url.as_str()).unwrap();
    let keys = KeyLayout::new(&topology.redis.key_prefix);
    let pattern = Pattern::parse(pattern).unwrap();
    tokio::spawn(async move {
        let mut out = Followed {
            label,
            pattern: pattern.clone(),
            published_before,
            events: Vec::new(),
            errors: Vec::new(),
            failure: None,
        };
        // Rooms that are open at the end, or change after the follower started, must be reached;
        // a room closed before it started and never touched again may stay unknown.
        let matching: BTreeMap<&String, &RoomState> = finals.iter().filter(|(r, _)| pattern.matches(r)).collect();
        let required: BTreeMap<&String, u64> = matching
            .iter()
            .filter(|(r, s)| !s.closed || prefix_versions.get(r.as_str()).copied().unwrap_or(0) < s.version)
            .map(|(r, s)| (*r, s.version))
            .collect();
        let started = tokio::time::timeout(
            Duration::from_secs(60),
            Follower::start(&settings, &broadcast, redis, keys, pattern, lookback),
        )
        .await;
        let mut follower = match started {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                out.failure = Some(format!("start failed: {e}"));
                return out;
            }
            Err(_) => {
                out.failure = Some("start took over 60 s".into());
                return out;
            }
        };
        let settled = |f: &Follower| {
            required.iter().all(|(r, v)| f.known_version(r) == Some(*v))
                && matching.iter().all(|(r, s)| f.known_version(r).is_none_or(|k| k == s.version))
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
        while !settled(&follower) {
            match tokio::time::timeout_at(deadline, follower.next()).await {
                Ok(Some(Ok(event))) => out.events.push(event),
                Ok(Some(Err(e))) => out.errors.push(e.to_string()),
                Ok(None) => {
                    out.failure = Some("the follower ended".into());
                    return out;
                }
                Err(_) => {
                    let behind: Vec<String> = matching
                        .iter()
                        .filter(|(r, s)| {
                            let known = follower.known_version(r);
                            known.map_or(required.contains_key(*r), |k| k != s.version)
                        })
                        .map(|(r, s)| format!("{r}: at {:?}, final {}", follower.known_version(r), s.version))
                        .collect();
                    out.failure = Some(format!("not at the final state after 240 s: {behind:?}"));
                    return out;
                }
            }
        }
        // Anything after the final state would be a duplicate or an invention.
        while let Ok(Some(next)) = tokio::time::timeout(Duration::from_secs(1), follower.next()).await {
            match next {
                Ok(event) => out.events.push(event),
                Err(e) => out.errors.push(e.to_string()),
            }
        }
        out
    })
}

/// A room as a follower's events describe it.
#[derive(Debug, Default)]
struct SeenRoom {
    version: u64,
    modules: BTreeMap<String, serde_json::Value>,
}

fn check_follower(
    f: &Followed,
    folder: &RoomFolder,
    finals: &BTreeMap<String, RoomState>,
    prefix: &HashMap<String, u64>,
) {
    let label = &f.label;
    assert!(f.failure.is_none(), "{label} ({}): {}", f.pattern, f.failure.as_deref().unwrap_or_default());
    assert!(f.errors.is_empty(), "{label} reported errors: {:?}", f.errors);
    let empty: BTreeMap<&str, serde_json::Value> = folder
        .module_states(&RoomState::default())
        .map(|(m, json)| (m, serde_json::from_str(&json).unwrap()))
        .collect();

    let mut rooms: BTreeMap<String, SeenRoom> = BTreeMap::new();
    for event in &f.events {
        assert!(f.pattern.matches(event.path()), "{label} reported {} outside {}", event.path(), f.pattern);
        let previous = rooms.get(event.path()).map(|r| r.version);
        let room = rooms.entry(event.path().to_owned()).or_default();
        match event {
            FollowEvent::Snapshot(s) => {
                assert!(previous.is_none(), "{label}: a snapshot of {} after other events", s.path);
                room.version = s.version;
                room.modules = s.modules.clone();
            }
            FollowEvent::Resynchronised(s) => {
                assert!(
                    s.version > previous.unwrap_or(0),
                    "{label}: {} resynchronised backwards, {previous:?} to {}",
                    s.path,
                    s.version
                );
                room.version = s.version;
                room.modules = s.modules.clone();
            }
            FollowEvent::Change(c) => {
                assert_eq!(
                    c.version,
                    previous.unwrap_or(0) + 1,
                    "{label}: {} jumped from {previous:?} to {} (versions must be contiguous)",
                    c.path,
                    c.version
                );
                room.version = c.version;
                if c.module == ROOM_MODULE {
                    room.modules.clear();
                } else {
                    room.modules.insert(c.module.clone(), c.state.clone());
                }
            }
        }
    }

    let matching: Vec<(&String, &RoomState)> = finals.iter().filter(|(r, _)| f.pattern.matches(r)).collect();
    assert!(!matching.is_empty(), "{label}: the pattern {} matches some rooms", f.pattern);
    for (room, state) in &matching {
        let Some(seen) = rooms.get(room.as_str()) else {
            let before = prefix.get(room.as_str()).copied().unwrap_or(0);
            assert!(
                state.closed && before >= state.version,
                "{label} never reported {room} (final v{}, {} before it started)",
                state.version,
                before
            );
            continue;
        };
        assert_eq!(seen.version, state.version, "{label}: final version of {room}");
        for (module, json) in folder.module_states(state) {
            let want: serde_json::Value = serde_json::from_str(&json).unwrap();
            let got = seen.modules.get(module).unwrap_or(&empty[module]);
            assert_eq!(got, &want, "{label}: {module} of {room}");
        }
    }
    for room in rooms.keys() {
        assert!(finals.contains_key(room), "{label} reported {room}, which never had a change");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiners_reach_the_exact_final_state_with_contiguous_versions_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let topology = fresh_topology("late", 4, &dir.path().join("state"));
    create_input(&topology).await;
    let folder = folder(&["recording", "tags"]);
    let events = generate(21, 4000, 30);
    let expected = model(&folder, &events);
    let finals = Arc::new(expected.rooms.clone());
    let chunk = 250;
    let chunks = events.len() / chunk;
    // Changes the job must have broadcast once it processed the first k events.
    let changes_after = |k: usize| model(&folder, &events[..k]).total_changes;
    let versions_after = |k: usize| -> HashMap<String, u64> {
        model(&folder, &events[..k]).rooms.into_iter().map(|(r, s)| (r, s.version)).collect()
    };

    let seed = 0x1a7e;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let restart_after = 8;
    // (chunk, pattern, look-back). A zero look-back joins with no overlap
    // between the snapshot and the stream, so changes committed around the
    // moment it starts must be repaired from Redis.
    let schedule: Vec<(usize, &str, Duration)> = vec![
        (0, "app/*/room/r1", omni::pubsub::DEFAULT_LOOKBACK),
        (rng.random_range(1..4), "app/a1/room/>", omni::pubsub::DEFAULT_LOOKBACK),
        (rng.random_range(4..restart_after), "app/*/room/r3", Duration::from_secs(3)),
        (rng.random_range(4..restart_after), "app/*/room/*", Duration::ZERO),
        (rng.random_range(restart_after + 2..chunks - 1), "app/*/room/*", Duration::from_secs(3)),
    ];
    tracing::info!(seed, ?schedule, "late joiner schedule");

    // The broadcast topic exists before anyone subscribes, so the progress
    // counter below starts from its beginning.
    ensure_topics(
        &topology.kafka,
        &[TopicSpec { name: topology.broadcast_topic.clone(), partitions: topology.partitions, configs: vec![] }],
    )
    .await
    .unwrap();
    let mut progress_sub = subscribe_retrying(&topology.kafka, &topology.broadcast_topic).await;

    let producer = producer();
    let mut job = Some(RunningJob::start(topology.clone(), Registry::with_builtins()).await);
    // Counts committed broadcast changes, so followers join while the job is mid-stream.
    let progress = Arc::new(AtomicUsize::new(0));
    let counter = {
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            while let Some(next) = progress_sub.next().await {
                match next {
                    Ok(_) => progress.fetch_add(1, Ordering::Relaxed),
                    Err(e) => panic!("progress subscriber: {e}"),
                };
            }
        })
    };

    let mut followers = Vec::new();
    let mut start = |label: String, pattern: &str, lookback: Duration, k: usize| {
        followers.push(spawn_follower(label, &topology, pattern, lookback, k, Arc::clone(&finals), versions_after(k)));
    };
    for c in 0..chunks {
        let k = c * chunk;
        for (_, pattern, lookback) in schedule.iter().filter(|s| s.0 == c) {
            start(format!("follower@{k}-{pattern}-{lookback:?}"), pattern, *lookback, k);
        }
        if c == restart_after {
            // One joins while the job stops, another while it is down.
            start(format!("follower@{k}-stopping"), "app/a2/room/*", Duration::from_secs(3), k);
            job.take().unwrap().stop().await;
            produce(&producer, topology.input_topic(), &events[k..k + chunk]);
            start(format!("follower@{}-down", k + chunk), "app/a0/>", omni::pubsub::DEFAULT_LOOKBACK, k + chunk);
            job = Some(RunningJob::start(topology.clone(), Registry::with_builtins()).await);
            continue;
        }
        produce(&producer, topology.input_topic(), &events[k..k + chunk]);
        if c > 0 {
            // Stay about one chunk ahead of the job.
            let want = changes_after(k);
            wait_for(Duration::from_secs(90), &format!("the job to broadcast {want} changes"), || {
                assert!(!counter.is_finished(), "the progress counter stopped");
                let done = progress.load(Ordering::Relaxed) >= want;
                async move { done.then_some(()) }
            })
            .await;
        }
    }

    let mut outcomes = Vec::new();
    for f in followers {
        outcomes.push(tokio::time::timeout(Duration::from_secs(300), f).await.expect("follower finishes").unwrap());
    }
    counter.abort();
    assert!(progress.load(Ordering::Relaxed) >= expected.total_changes);
    job.take().unwrap().stop().await;

    assert_eq!(outcomes.len(), schedule.len() + 2);
    for f in &outcomes {
        let prefix = versions_after(f.published_before);
        check_follower(f, &folder, &finals, &prefix);
        let snapshots = f.events.iter().filter(|e| matches!(e, FollowEvent::Snapshot(_))).count();
        let changes = f.events.iter().filter(|e| matches!(e, FollowEvent::Change(_))).count();
        let resyncs = f.events.len() - snapshots - changes;
        tracing::info!(follower = %f.label, pattern = %f.pattern, snapshots, changes, resyncs, "follower checked");
        assert!(changes > 0, "{} saw live changes", f.label);
        if f.published_before >= 4 * chunk {
            assert!(snapshots > 0, "{} joined late and started from snapshots", f.label);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_resynchronises_a_room_whose_history_redis_no_longer_holds() {
    use omni::proto::tecate::{room_event::Kind, RoomClosed, TagSet};
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("resync", 2, &dir.path().join("state"));
    // Each room's change stream keeps only its last few versions.
    topology.redis.stream_max_len = 5;
    create_input(&topology).await;
    ensure_topics(
        &topology.kafka,
        &[TopicSpec { name: topology.broadcast_topic.clone(), partitions: topology.partitions, configs: vec![] }],
    )
    .await
    .unwrap();
    drop(subscribe_retrying(&topology.kafka, &topology.broadcast_topic).await);
    let folder = folder(&["recording", "tags"]);
    let (closed, open) = ("app/r/room/closed", "app/r/room/open");
    let tag = |i: usize, key: &str| Kind::TagSet(TagSet { key: key.into(), value: format!("v{i}") });
    // A long history for both rooms, then one of them closes.
    let mut events: Vec<(String, omni::proto::tecate::RoomEvent)> = Vec::new();
    for i in 0..300 {
        events.push((closed.into(), event(i, 1_795_773_600_000 + i as i64, tag(i, "k"))));
        events.push((open.into(), event(1000 + i, 1_795_773_600_000 + i as i64, tag(i, "k"))));
    }
    events.push((closed.into(), event(400, 1_795_773_700_000, Kind::RoomClosed(RoomClosed {}))));
    let before = model(&folder, &events);
    assert_eq!(before.rooms[closed].version, 301);

    let producer = producer();
    produce(&producer, topology.input_topic(), &events);
    let job = RunningJob::start(topology.clone(), Registry::with_builtins()).await;
    assert_redis_exact(&topology, &folder, &before).await;
    let client = redis::Client::open(topology.redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = KeyLayout::new(&topology.redis.key_prefix);
    let held = omni::view::changes_after(&mut conn, &keys, closed, 0).await.unwrap();
    assert!(held.first().is_some_and(|c| c.version > 1), "the stream no longer holds the room's first versions");

    // No look-back: the closed room has no snapshot and its history is not in the stream.
    let mut follower = Follower::start(
        &topology.kafka,
        &topology.broadcast_topic,
        client.clone(),
        keys.clone(),
        Pattern::parse("app/r/room/*").unwrap(),
        Duration::ZERO,
    )
    .await
    .unwrap();
    let later = vec![
        (closed.to_owned(), event(500, 1_795_773_800_000, tag(500, "reopened"))),
        (open.to_owned(), event(501, 1_795_773_800_000, tag(501, "k"))),
        (closed.to_owned(), event(502, 1_795_773_800_001, tag(502, "again"))),
    ];
    produce(&producer, topology.input_topic(), &later);
    events.extend(later);
    let expected = model(&folder, &events);
    let finals = expected.rooms.clone();

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while finals.iter().any(|(room, s)| follower.known_version(room) != Some(s.version)) {
        match tokio::time::timeout_at(deadline, follower.next()).await {
            Ok(Some(Ok(event))) => seen.push(event),
            Ok(Some(Err(e))) => panic!("follower error: {e}"),
            Ok(None) => panic!("follower ended"),
            Err(_) => panic!("the follower did not reach the final versions; saw {seen:?}"),
        }
    }
    while let Ok(Some(next)) = tokio::time::timeout(Duration::from_secs(1), follower.next()).await {
        seen.push(next.unwrap());
    }
    job.stop().await;

    let resynced: Vec<u64> = seen
        .iter()
        .filter_map(|e| match e {
            FollowEvent::Resynchronised(s) if s.path == closed => Some(s.version),
            _ => None,
        })
        .collect();
    assert_eq!(resynced.len(), 1, "one resynchronisation of {closed}: {seen:?}");
    assert!((301..=303).contains(&resynced[0]), "resynchronised at {}", resynced[0]);
    assert!(
        !seen.iter().any(|e| matches!(e, FollowEvent::Snapshot(s) if s.path == closed)),
        "a closed room has no snapshot"
    );
    assert!(seen.iter().any(|e| matches!(e, FollowEvent::Snapshot(s) if s.path == open && s.version == 300)));
    let outcome = Followed {
        label: "resync follower".into(),
        pattern: Pattern::parse("app/r/room/*").unwrap(),
        published_before: events.len() - 3,
        events: seen,
        errors: Vec::new(),
        failure: None,
    };
    let prefix: HashMap<String, u64> = before.rooms.iter().map(|(r, s)| (r.clone(), s.version)).collect();
    check_follower(&outcome, &folder, &finals, &prefix);
}
