//! Restoring a partition's store from its changelog.
//!
//! Each restore runs on its own thread with its own consumer, so one
//! partition's restore never holds up processing of the others. Whether
//! there is anything to restore is asked first through one client shared by
//! all restores, so a partition already up to date (every partition of a
//! first start) costs no client of its own. It reads
//! read_committed from the store's checkpoint and finishes by *position*:
//! transaction markers and compaction leave gaps in offsets, so waiting for
//! a record at the end offset could wait forever.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::engine::room_write;
use super::{Health, RuntimeError};
use crate::kafka::{not_served_yet, KafkaSettings};
use crate::modules::RoomFolder;
use crate::store::{PartitionWrite, StateStore};
use crate::view::RedisWriter;

const BATCH: usize = 10_000;

/// A finished restore.
pub struct RestoreDone {
    pub partition: i32,
    /// Which start of this partition's restore reports.
    pub generation: u64,
    /// Records restored.
    pub result: Result<u64, RuntimeError>,
}

struct Running {
    generation: u64,
    cancel: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The restores in flight.
pub struct Restores {
    settings: KafkaSettings,
    /// Asks the changelog's watermarks for every restore.
    watermarks: Arc<BaseConsumer>,
    group_id: String,
    changelog: String,
    store: Arc<dyn StateStore>,
    health: Arc<Health>,
    /// Where a restored partition's rooms are written again, when Redis is on.
    reconcile: Option<(RoomFolder, RedisWriter)>,
    done: mpsc::Sender<RestoreDone>,
    running: HashMap<i32, Running>,
    generations: u64,
}

impl Restores {
    pub fn new(
        settings: KafkaSettings,
        group_id: String,
        changelog: String,
        store: Arc<dyn StateStore>,
        health: Arc<Health>,
        reconcile: Option<(RoomFolder, RedisWriter)>,
        done: mpsc::Sender<RestoreDone>,
    ) -> Result<Restores, RuntimeError> {
        let watermarks = Arc::new(settings.client_config().create()?);
        Ok(Restores {
            settings,
            watermarks,
            group_id,
            changelog,
            store,
            health,
            reconcile,
            done,
            running: HashMap::new(),
            generations: 0,
        })
    }

    /// Starts restoring `partition` from changelog offset `from` (the beginning when `None`).
    pub fn start(&mut self, partition: i32, from: Option<i64>) {
        self.cancel(partition);
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            settings: self.settings.clone(),
            watermarks: Arc::clone(&self.watermarks),
            group_id: self.group_id.clone(),
            changelog: self.changelog.clone(),
            store: Arc::clone(&self.store),
            health: Arc::clone(&self.health),
            reconcile: self.reconcile.clone(),
            partition,
            from,
            cancel: Arc::clone(&cancel),
        };
        let done = self.done.clone();
        self.generations += 1;
        let generation = self.generations;
        let thread = std::thread::Builder::new()
            .name(format!("restore-{partition}"))
            .spawn(move || {
                let result = job.run().and_then(|records| job.reconcile().map(|()| records));
                let _ = done.send(RestoreDone { partition, generation, result });
            })
            .expect("spawning a restore thread");
        self.running.insert(partition, Running { generation, cancel, thread });
    }

    /// Stops a restore and waits for its thread, so two never write one partition.
    pub fn cancel(&mut self, partition: i32) {
        if let Some(running) = self.running.remove(&partition) {
            running.cancel.store(true, Ordering::Relaxed);
            let _ = running.thread.join();
        }
    }

    /// Forgets a restore that reported back; false if the report is stale
    /// (its restore was cancelled, and perhaps started again since).
    pub fn finished(&mut self, partition: i32, generation: u64) -> bool {
        match self.running.get(&partition) {
            Some(running) if running.generation == generation => {
                if let Some(running) = self.running.remove(&partition) {
                    let _ = running.thread.join();
                }
                true
            }
            _ => false,
        }
    }
}

struct Job {
    settings: KafkaSettings,
    watermarks: Arc<BaseConsumer>,
    group_id: String,
    changelog: String,
    store: Arc<dyn StateStore>,
    health: Arc<Health>,
    reconcile: Option<(RoomFolder, RedisWriter)>,
    partition: i32,
    from: Option<i64>,
    cancel: Arc<AtomicBool>,
}

impl Job {
    /// The changelog partition's watermarks, waiting out a leader that is not
    /// serving yet (a topic created moments ago, a leader moving).
    fn watermarks(&self) -> Result<(i64, i64), RuntimeError> {
        let mut attempts = 0;
        loop {
            match self.watermarks.fetch_watermarks(&self.changelog, self.partition, Duration::from_secs(30)) {
                Err(e) if attempts < 50 && not_served_yet(&e) => {
                    if self.cancel.load(Ordering::Relaxed) {
                        return Ok((0, 0));
                    }
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return Ok(other?),
            }
        }
    }

    /// Writes every room of the restored partition to Redis again: it may have
    /// missed writes (down, or a crash before they were sent), and the
    /// compare-and-set makes the repeat harmless. Done here, off the
    /// processing thread, since a partition can hold many rooms.
    fn reconcile(&self) -> Result<(), RuntimeError> {
        let Some((folder, redis)) = &self.reconcile else { return Ok(()) };
        if self.cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        let writes = self
            .store
            .rooms(self.partition)?
            .into_iter()
            .map(|(room, state)| room_write(folder, &room, &state, Vec::new()))
            .collect();
        redis.send(writes);
        Ok(())
    }

    fn run(&self) -> Result<u64, RuntimeError> {
        let (low, high) = self.watermarks()?;
        let start = match self.from {
            // A checkpoint past the end (the changelog was recreated or truncated)
            // or before its start (records the store has not seen were deleted)
            // means the store no longer matches the changelog: start afresh.
            Some(from) if from > high || from < low => {
                tracing::warn!(
                    partition = self.partition,
                    from,
                    low,
                    high,
                    "store checkpoint outside the changelog; rebuilding the partition"
                );
                self.store.clear(self.partition)?;
                low
            }
            Some(from) => from,
            None => low,
        };
        let gauge = metrics::gauge!("omni_restore_remaining_records", "partition" => self.partition.to_string());
        if start >= high {
            gauge.set(0.0);
            return Ok(0);
        }
        tracing::info!(partition = self.partition, from = start, to = high, "restoring from the changelog");
        self.health.restore_planned((high - start) as u64);
        let mut config = self.settings.client_config();
        config
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("fetch.max.bytes", "8388608")
            // A restore reads to the end: waiting there for more bytes only delays it.
            .set("fetch.wait.max.ms", "10");
        let consumer: BaseConsumer = config.create()?;
        let mut reported = start;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&self.changelog, self.partition, Offset::Offset(start))?;
        consumer.assign(&assignment)?;

        let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(BATCH);
        let mut restored = 0u64;
        let mut next = start;
        while !self.cancel.load(Ordering::Relaxed) {
            let polled = consumer.poll(Duration::from_millis(10));
            let idle = polled.is_none();
            if let Some(polled) = polled {
                let message = polled?;
                next = message.offset() + 1;
                // Stored as they are: the store keeps the changelog's own bytes.
                if let (Some(key), Some(value)) = (message.key(), message.payload()) {
                    batch.push((key.to_vec(), value.to_vec()));
                }
            }
            // Markers and compaction leave gaps, so the end is judged by the
            // consumer's position, which moves past them, not by a last record.
            let position = if idle || batch.len() >= BATCH || next >= high {
                match consumer.position()?.find_partition(&self.changelog, self.partition).map(|e| e.offset()) {
                    Some(Offset::Offset(p)) => p.max(next),
                    _ => next,
                }
            } else {
                next
            };
            gauge.set((high - position).max(0) as f64);
            let finished = position >= high;
            let reached = position.min(high);
            if reached > reported {
                self.health.restore_advanced((reached - reported) as u64);
                reported = reached;
            }
            if batch.len() >= BATCH || finished {
                let rooms = std::mem::take(&mut batch);
                restored += rooms.len() as u64;
                metrics::counter!("omni_restored_records_total").increment(rooms.len() as u64);
                self.store.write(self.partition, PartitionWrite { rooms, changelog_offset: Some(position) })?;
            }
            if finished {
                return Ok(restored);
            }
        }
        Ok(restored)
    }
}
