//! The benchmark's input: Tecate events over Zipf-skewed rooms (rank 1 is
//! the hot room), in realistic proportions, with the expected outcome
//! computed alongside by the same pure folds the job runs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use omni::modules::{Limits, Registry, RoomFolder};
use omni::proto::omni::RoomState;
use omni::proto::tecate::{
    room_event::Kind, RecordingStarted, RecordingStopped, RoomClosed, RoomEvent, TagRemoved, TagSet,
};
use omni::proto::{timestamp_from_millis, Message as _};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// Draws room ranks with probability proportional to 1/rank^exponent.
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(rooms: usize, exponent: f64) -> Zipf {
        let mut total = 0.0;
        let cumulative = (1..=rooms.max(1))
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(exponent);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    pub fn sample(&self, rng: &mut StdRng) -> usize {
        let target = rng.random::<f64>() * self.cumulative.last().copied().unwrap_or(1.0);
        self.cumulative.partition_point(|&c| c < target).min(self.cumulative.len() - 1)
    }
}

/// Generates events: mostly tag sets, some removals, recording starts and stops, a few closes.
pub struct Workload {
    rng: StdRng,
    zipf: Zipf,
    next_id: u64,
}

impl Workload {
    pub fn new(seed: u64, rooms: usize, exponent: f64) -> Workload {
        Workload { rng: StdRng::seed_from_u64(seed), zipf: Zipf::new(rooms, exponent), next_id: 0 }
    }

    pub fn room(&mut self) -> String {
        format!("app/bench/room/r{}", self.zipf.sample(&mut self.rng))
    }

    pub fn event(&mut self, at_ms: i64) -> RoomEvent {
        let rng = &mut self.rng;
        let kind = match rng.random_range(0..1000) {
            0..=779 => Kind::TagSet(TagSet {
                key: format!("k{}", rng.random_range(0..12)),
                value: format!("v{}", rng.random_range(0..1000)),
            }),
            780..=859 => Kind::TagRemoved(TagRemoved { key: format!("k{}", rng.random_range(0..12)) }),
            860..=929 => Kind::RecordingStarted(RecordingStarted {
                recording_id: format!("rec{}", rng.random_range(0..4)),
                started_by: format!("u{}", rng.random_range(0..50)),
            }),
            930..=994 => {
                Kind::RecordingStopped(RecordingStopped { recording_id: String::new(), reason: "host stopped".into() })
            }
            _ => Kind::RoomClosed(RoomClosed {}),
        };
        self.next_id += 1;
        RoomEvent {
            event_id: format!("b{}", self.next_id),
            occurred_at: Some(timestamp_from_millis(at_ms)),
            kind: Some(kind),
        }
    }
}

/// The fold's view of what the job must end with.
#[derive(Default)]
pub struct Expected {
    pub rooms: HashMap<String, RoomState>,
    pub changes: u64,
}

pub fn folder() -> RoomFolder {
    RoomFolder::new(
        Registry::with_builtins().select(&["recording".into(), "tags".into()]).expect("built-in modules"),
        Limits::default(),
    )
}

impl Expected {
    pub fn apply(&mut self, folder: &RoomFolder, room: &str, event: &RoomEvent) {
        let state = self.rooms.entry(room.to_owned()).or_default();
        if let Ok(outcome) = folder.fold(state, event) {
            self.changes += outcome.changes.len() as u64;
        }
    }
}

pub fn fast_producer(brokers: &str, linger_ms: u32) -> anyhow::Result<BaseProducer> {
    Ok(rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("linger.ms", linger_ms.to_string())
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.kbytes", "262144")
        .create()?)
}

pub fn send(producer: &BaseProducer, topic: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
    Ok(omni::kafka::send(producer, BaseRecord::to(topic).key(key.as_bytes()).payload(value))?)
}

/// Produces `count` events and returns what the job must end with, and the produce rate.
pub fn preload(brokers: &str, topic: &str, workload: &mut Workload, count: u64) -> anyhow::Result<(Expected, f64)> {
    let producer = fast_producer(brokers, 20)?;
    let folder = folder();
    let mut expected = Expected::default();
    let started = Instant::now();
    let base_ms = chrono::Utc::now().timestamp_millis();
    for i in 0..count {
        let room = workload.room();
        let event = workload.event(base_ms + i as i64 / 1000);
        expected.apply(&folder, &room, &event);
        send(&producer, topic, &room, &event.encode_to_vec())?;
        if i % 10_000 == 0 {
            omni::kafka::serve_ready(&producer);
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok((expected, count as f64 / started.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_makes_rank_one_the_hot_room() {
        let zipf = Zipf::new(10_000, 1.0);
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = vec![0u32; 10_000];
        for _ in 0..100_000 {
            counts[zipf.sample(&mut rng)] += 1;
        }
        let hottest = counts.iter().enumerate().max_by_key(|(_, c)| **c).map(|(i, _)| i);
        assert_eq!(hottest, Some(0));
        assert!(counts[0] > 8_000 && counts[0] < 12_000, "rank 1 takes about 1/H(10000) ≈ 10%: {}", counts[0]);
    }

    #[test]
    fn the_mix_is_mostly_tag_sets_with_a_few_closes() {
        let mut w = Workload::new(2, 100, 1.0);
        let events: Vec<_> = (0..10_000).map(|_| w.event(0)).collect();
        let sets = events.iter().filter(|e| matches!(e.kind, Some(Kind::TagSet(_)))).count();
        let closes = events.iter().filter(|e| matches!(e.kind, Some(Kind::RoomClosed(_)))).count();
        assert!(sets > 7_000 && sets < 8_500, "{sets}");
        assert!(closes > 10 && closes < 120, "{closes}");
    }
}
