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
//!
//! It first reads where the partition's input resumes, its committed
//! offset, and only then where the changelog ends: a transaction that
//! commits both (another member's, finishing late) is then in the store
//! too. An open transaction can hold that offset unreadable (see
//! [`super::offsets`]); the restore waits it out here, before it takes a
//! slot, so no other partition waits with it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::changelog::{changelog_write, position_past_markers, resume_offset, Changelog};
use super::offsets::{Committed, OffsetsReader, WaitingToStart};
use super::reconcile::{rewrite_partition, Rewriter};
use super::{Health, RuntimeError};
use crate::kafka::{fresh_leaders, not_served_yet, KafkaSettings};
use crate::store::StateStore;

const BATCH: usize = 10_000;

/// Most restores one processing thread runs at once: each has a consumer
/// with its own fetch buffer and a thread, and more than a few only share
/// the same disk and network.
const MOST_CONCURRENT: usize = 2;

/// Longest pause between two attempts at a restore that failed.
const MOST_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Longest pause between two reads of a committed offset an open transaction holds.
const MOST_OFFSET_RETRY_DELAY: Duration = Duration::from_secs(2);

/// Counts the restores running, so no more than [`MOST_CONCURRENT`] do.
#[derive(Default)]
struct Slots {
    running: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    /// Takes a slot, waiting for one; `false` if cancelled meanwhile.
    fn take(&self, cancel: &AtomicBool) -> bool {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        while *running >= MOST_CONCURRENT {
            if cancel.load(Ordering::Relaxed) {
                return false;
            }
            running = self.freed.wait_timeout(running, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
        }
        *running += 1;
        true
    }

    fn give_back(&self) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.freed.notify_one();
    }
}

/// Why a restore attempt ended without finishing.
enum Interrupted {
    Cancelled,
    Failed(RuntimeError),
}

impl<E: Into<RuntimeError>> From<E> for Interrupted {
    fn from(error: E) -> Interrupted {
        Interrupted::Failed(error.into())
    }
}

/// A finished restore.
pub struct RestoreDone {
    pub partition: i32,
    /// Which start of this partition's restore reports.
    pub generation: u64,
    pub result: Result<Restored, RuntimeError>,
}

/// A restored partition, ready to be consumed.
#[derive(Debug, Clone)]
pub struct Restored {
    pub records: u64,
    /// Where its input resumes: the offset committed with the restored state.
    pub committed: Committed,
    /// Its input's first offset and last stable one, read after the restore.
    pub input: (i64, i64),
}

struct Running {
    generation: u64,
    /// Reported back; its thread may still be rewriting the rooms to Redis.
    reported: bool,
    cancel: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The restores in flight.
pub struct Restores {
    changelog: Changelog,
    /// Asks the changelog's watermarks for every restore.
    watermarks: Arc<BaseConsumer>,
    /// Reads where each restored partition's input resumes.
    offsets: OffsetsReader,
    group_id: String,
    health: Arc<Health>,
    /// Where a restored partition's rooms are written again, when Redis is on.
    reconcile: Option<Rewriter>,
    done: mpsc::Sender<RestoreDone>,
    running: HashMap<i32, Running>,
    generations: u64,
    slots: Arc<Slots>,
}

impl Restores {
    pub fn new(
        changelog: Changelog,
        offsets: OffsetsReader,
        group_id: String,
        health: Arc<Health>,
        reconcile: Option<Rewriter>,
        done: mpsc::Sender<RestoreDone>,
    ) -> Result<Restores, RuntimeError> {
        // Its high watermark, not its last stable offset: a restore reads to
        // there, so a transaction that committed the offset just read is in
        // the store even if its changelog marker came after that offset's.
        let mut client = fresh_leaders(changelog.settings.client_config());
        let watermarks = Arc::new(client.set("isolation.level", "read_uncommitted").create()?);
        Ok(Restores {
            changelog,
            watermarks,
            offsets,
            group_id,
            health,
            reconcile,
            done,
            running: HashMap::new(),
            generations: 0,
            slots: Arc::default(),
        })
    }

    /// Starts restoring `partition` from the changelog offset its store
    /// reached, claimed first so a standby stops writing it.
    pub fn start(&mut self, partition: i32) {
        self.cancel(partition);
        self.changelog.claims.claim(partition);
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            settings: self.changelog.settings.clone(),
            watermarks: Arc::clone(&self.watermarks),
            offsets: self.offsets.clone(),
            group_id: self.group_id.clone(),
            changelog: self.changelog.topic.clone(),
            store: Arc::clone(&self.changelog.store),
            health: Arc::clone(&self.health),
            reconcile: self.reconcile.clone(),
            partition,
            cancel: Arc::clone(&cancel),
        };
        let slots = Arc::clone(&self.slots);
        let done = self.done.clone();
        self.generations += 1;
        let generation = self.generations;
        let thread = std::thread::Builder::new()
            .name(format!("restore-{partition}"))
            .spawn(move || {
                let committed = match job.committed_position() {
                    Ok(Some(committed)) => committed,
                    Ok(None) => return,
                    Err(error) => {
                        let _ = done.send(RestoreDone { partition, generation, result: Err(error) });
                        return;
                    }
                };
                if !slots.take(&job.cancel) {
                    return;
                }
                let records = job.run_to_the_end();
                slots.give_back();
                let result = match records.and_then(|records| Ok((records, job.input_watermarks()?))) {
                    Ok((_, None)) => return,
                    Ok((records, Some(input))) => Ok(Restored { records, committed, input }),
                    Err(error) => Err(error),
                };
                let restored = result.is_ok();
                let _ = done.send(RestoreDone { partition, generation, result });
                // The partition is consumed again meanwhile: its live writes
                // go to Redis ahead of this rewrite.
                if restored {
                    if let Err(error) = job.reconcile() {
                        tracing::error!(partition, %error, "could not rewrite the restored rooms to redis");
                    }
                }
            })
            .expect("spawning a restore thread");
        self.running.insert(partition, Running { generation, reported: false, cancel, thread });
    }

    /// Stops a restore and waits for its thread, so two never write one partition.
    pub fn cancel(&mut self, partition: i32) {
        self.cancel_all(&[partition]);
    }

    /// This instance gave these partitions up: their restores stop, and a
    /// standby may follow them again.
    pub fn revoke(&mut self, partitions: &[i32]) {
        self.cancel_all(partitions);
        self.changelog.claims.release(partitions);
    }

    /// Stops these partitions' restores, every one told before any is
    /// waited for: a revoke then waits for the slowest alone, not their sum.
    fn cancel_all(&mut self, partitions: &[i32]) {
        let stopping: Vec<Running> = partitions.iter().filter_map(|p| self.running.remove(p)).collect();
        for running in &stopping {
            running.cancel.store(true, Ordering::Relaxed);
        }
        for running in stopping {
            let _ = running.thread.join();
        }
    }

    /// Takes a restore's report; false if the report is stale (its restore
    /// was cancelled, and perhaps started again since). Its thread goes on
    /// rewriting the partition's rooms to Redis until done or cancelled.
    pub fn finished(&mut self, partition: i32, generation: u64) -> bool {
        match self.running.get_mut(&partition) {
            Some(running) if running.generation == generation && !running.reported => {
                running.reported = true;
                true
            }
            _ => false,
        }
    }
}

struct Job {
    settings: KafkaSettings,
    watermarks: Arc<BaseConsumer>,
    offsets: OffsetsReader,
    group_id: String,
    changelog: String,
    store: Arc<dyn StateStore>,
    health: Arc<Health>,
    reconcile: Option<Rewriter>,
    partition: i32,
    cancel: Arc<AtomicBool>,
}

/// How long one ask for a changelog partition's watermarks may take.
const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(5);

impl Job {
    /// Restores until the end of the changelog, again after a failure
    /// (a broker restarting, a leader moving) from where the store got to,
    /// until it succeeds or is cancelled. A cancelled restore reports 0
    /// records; nobody reads its report.
    fn run_to_the_end(&self) -> Result<u64, RuntimeError> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.run() {
                Ok(records) => return Ok(records),
                Err(Interrupted::Cancelled) => return Ok(0),
                Err(Interrupted::Failed(error)) if !retriable(&error) => return Err(error),
                Err(Interrupted::Failed(error)) => {
                    tracing::warn!(partition = self.partition, %error, "restore failed; retrying");
                    metrics::counter!("omni_restore_retries_total").increment(1);
                    if !self.sleep_unless_cancelled(delay) {
                        return Ok(0);
                    }
                    delay = (delay * 2).min(MOST_RETRY_DELAY);
                }
            }
        }
    }

    /// Where the partition's input resumes, waited for while an open
    /// transaction holds it. Read before the changelog's end, so a
    /// transaction that commits it also ends in what is restored. `None`
    /// when cancelled first.
    fn committed_position(&self) -> Result<Option<Committed>, RuntimeError> {
        let mut waiting: Option<WaitingToStart> = None;
        self.ask_until_answered(
            || self.offsets.read(self.partition),
            |error| match &mut waiting {
                None => waiting = Some(WaitingToStart::new(self.partition, &offset_held(error))),
                Some(waiting) => waiting.again(&offset_held(error)),
            },
        )
    }

    /// The input partition's watermarks, asked until Kafka answers. `None`
    /// when cancelled first.
    fn input_watermarks(&self) -> Result<Option<(i64, i64)>, RuntimeError> {
        self.ask_until_answered(
            || self.offsets.watermarks(self.partition),
            |error| tracing::warn!(partition = self.partition, %error, "cannot read the input's watermarks; retrying"),
        )
    }

    /// Asks `ask` until it answers, after a pause of 100 ms doubling to
    /// [`MOST_OFFSET_RETRY_DELAY`] past each error Kafka says can pass,
    /// which `failed` reports. Another error is returned; `None` when
    /// cancelled first.
    fn ask_until_answered<T>(
        &self,
        ask: impl Fn() -> Result<T, RuntimeError>,
        mut failed: impl FnMut(&RuntimeError),
    ) -> Result<Option<T>, RuntimeError> {
        let mut delay = Duration::from_millis(100);
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Ok(None);
            }
            match ask() {
                Ok(answer) => return Ok(Some(answer)),
                Err(error) if retriable(&error) => failed(&error),
                Err(error) => return Err(error),
            }
            if !self.sleep_unless_cancelled(delay) {
                return Ok(None);
            }
            delay = (delay * 2).min(MOST_OFFSET_RETRY_DELAY);
        }
    }

    /// Sleeps for `delay`; false if cancelled meanwhile.
    fn sleep_unless_cancelled(&self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        while Instant::now() < deadline {
            if self.cancel.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// The changelog partition's watermarks, waiting out a leader that is not
    /// serving yet (a topic created moments ago, a leader moving).
    fn watermarks(&self) -> Result<(i64, i64), Interrupted> {
        let mut attempts = 0;
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(Interrupted::Cancelled);
            }
            // Short, so a cancel waits for one call at most; a timeout is
            // retried like any other failure, from where the store got to.
            match self.watermarks.fetch_watermarks(&self.changelog, self.partition, WATERMARKS_TIMEOUT) {
                Err(e) if attempts < 50 && not_served_yet(&e) => {
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
        let Some(rewriter) = &self.reconcile else { return Ok(()) };
        if self.cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        rewrite_partition(rewriter, self.partition, &self.cancel)?;
        Ok(())
    }

    fn run(&self) -> Result<u64, Interrupted> {
        let watermarks = self.watermarks()?;
        if self.cancel.load(Ordering::Relaxed) {
            // Watermarks asked for in vain must never pass for a truncated changelog.
            return Err(Interrupted::Cancelled);
        }
        let start = resume_offset(self.store.as_ref(), self.partition, watermarks)?;
        let high = watermarks.1;
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
                position_past_markers(&consumer.position()?, &self.changelog, self.partition, next)
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
                self.store.write(self.partition, changelog_write(rooms, position))?;
            }
            if finished {
                return Ok(restored);
            }
        }
        Err(Interrupted::Cancelled)
    }
}

/// Why a partition's committed offset could not be read: librdkafka says
/// only that its retries timed out.
fn offset_held(error: &RuntimeError) -> String {
    format!("its committed offset is not readable yet (an open transaction may hold it): {error}")
}

/// Whether a failed restore is worth another attempt: anything Kafka says
/// can pass (a broker away, a leader moving, a timeout); not the store.
fn retriable(error: &RuntimeError) -> bool {
    matches!(error, RuntimeError::Client(_) | RuntimeError::Kafka(_))
}
