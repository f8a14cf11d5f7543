//! The engine: folds consumed records into room state inside the current
//! transaction, and commits the transaction each interval.
//!
//! Within one transaction, changed rooms live in per-partition overlays
//! ("dirty" rooms). A commit sends one changelog record per dirty room, the
//! consumed offsets with the group metadata (so a zombie is fenced), and
//! commits. Only then do the overlays go to Redis, and to the store in one
//! atomic write per partition together with the changelog offset. An
//! aborted transaction drops the overlays and rewinds to the committed
//! offsets, so nothing it touched is seen anywhere.
//!
//! Module timers fire here too, inside the open transaction like any
//! event's change ([`timers`]); each partition keeps its pending timers in
//! a [`DeadlineIndex`], rebuilt from the store after an abort or a restore.

mod partitions;
mod recovery;
mod resume;
mod rooms;
mod timers;

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};

use super::backpressure::Backpressure;
use super::clock::CommitClock;
use super::counters::{LocalCounter, ModuleCounters};
use super::dead_letters::{dead_letter, Refusals};
use super::offsets::offset_stamp;
use super::output::{finish, record, send, take_changelog_ends, transaction_failed, JobProducer, Source};
use super::progress::{Stage, ThreadProgress};
use super::reconcile::{Resync, Rewriter};
use super::restore::{RestoreDone, Restored, Restores};
use super::{Health, RuntimeError, ThreadHealth};
use crate::modules::{Input, LiveRoom, Rejection, RoomFolder, ROOM_MODULE};
use crate::store::{DeadlineIndex, PartitionWrite, StateStore};
use crate::view::{ChangeEntry, RedisWriter, RoomWrite};
use rooms::{dirty_room, emit, input_headers, Cause};

/// The topics one job reads and writes.
#[derive(Debug, Clone)]
pub struct Topics {
    pub input: String,
    pub changelog: String,
    pub broadcast: String,
    pub dead_letter: String,
    /// The producer's batch size, which every output topic takes.
    pub batch_bytes: usize,
    /// The largest input record (key and value) a dead letter carries whole.
    pub dead_letter_record_bytes: usize,
}

/// A room touched in the open transaction, with the changes that Redis has not seen yet.
struct DirtyRoom {
    room: LiveRoom,
    /// False while every event on it was a no-op: nothing to write then.
    changed: bool,
    /// Its timers changed: its changelog record and store entry are
    /// written even without a change of its modules (Redis has nothing new).
    timers_changed: bool,
    /// Its committed state held timers, so the store's list of rooms with
    /// timers may have to lose it.
    had_timers: bool,
    /// The state as sent to the changelog at commit, then written to the store.
    encoded: Vec<u8>,
    changes: Vec<ChangeEntry>,
    /// The input record behind the room's latest change, to blame if the
    /// broker refuses its changelog record.
    last_source: Source,
}

/// What memory a cached room is charged: its encoded state about twice
/// (the decoded module states beside it), its path, and what even a small
/// room costs besides, measured with a heap profile (`omni bench --memory`):
/// a B-tree leaf for its module map and one for its decoded tags (544 bytes
/// each), and its slot in the cache's table.
fn cache_weight(path: &str, encoded_len: usize) -> usize {
    2 * encoded_len + path.len() + 1536
}

/// Rooms by path, under a fast hash (each event looks its room up a few
/// times) that is still seeded per process, so keys cannot be crafted
/// against it in advance.
type RoomMap<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// One assigned input partition.
#[derive(Default)]
struct Task {
    restoring: bool,
    /// Its restore finished, with where its input resumes; it counts as
    /// restoring until consumption resumed.
    restored: Option<Restored>,
    /// Its consumption could not resume yet: when to try again.
    start_retry: Option<resume::StartRetry>,
    /// Next input offset to commit, once this partition consumed something in the transaction.
    next_offset: Option<i64>,
    /// The input offset the group holds for it, once it is consumed: a
    /// transaction that writes its changelog without consuming (timers
    /// alone) commits it again, so the group checks that this member still
    /// owns the partition (KIP-447) and a zombie's transaction fails.
    committed_offset: Option<i64>,
    dirty: RoomMap<DirtyRoom>,
    /// Committed states of recently touched rooms.
    recent: RoomMap<LiveRoom>,
    /// Pending timers by deadline, as of the open transaction.
    deadlines: DeadlineIndex,
    /// The wall-clock time up to which the keep-alives this partition
    /// processed are committed: the stamp on its committed offset. Leases
    /// loaded from the store count their TTL from then.
    keepalives_committed_ms: i64,
    /// The input offset this partition consumes up to before its timers
    /// fire, once it resumed: keep-alives that waited in the topic (sent
    /// while the job was down, or while the partition moved) count first.
    timers_wait_for: Option<i64>,
}

pub struct Engine {
    pub(super) folder: RoomFolder,
    pub(super) store: Arc<dyn StateStore>,
    pub(super) producer: JobProducer,
    pub(super) redis: Option<RedisWriter>,
    pub(super) topics: Topics,
    pub(super) exactly_once: bool,
    commit_clock: CommitClock,
    health: Arc<Health>,
    thread_health: ThreadHealth,
    pub(super) restores: Restores,
    pub(super) restore_results: mpsc::Receiver<RestoreDone>,
    tasks: BTreeMap<i32, Task>,
    /// Memory the cached rooms of every task may take, and what they take.
    room_cache_budget: usize,
    room_cache_bytes: usize,
    pub(super) refusals: Refusals,
    progress: Arc<ThreadProgress>,
    /// Transactions committed, so the thread can tell a recovery that worked.
    pub(super) commits: u64,
    /// Redis data losses the writer had reported when last looked at.
    losses_seen: u64,
    resync: Option<Resync>,
    rewriter: Option<Rewriter>,
    backpressure: Backpressure,
    counters: Vec<ModuleCounters>,
    /// Room closes, counted as changes of the `room` module.
    closes: LocalCounter,
    consumed: LocalCounter,
    /// When the open transaction began; `None` when none is open.
    open_since: Option<Instant>,
    /// An error raised inside a rebalance callback, surfaced by the loop.
    pub(super) failure: Option<RuntimeError>,
    /// Set once the loop stopped on an error: nothing may commit after that.
    pub(super) closing: bool,
    /// Set when the loop stops on request, before its last commit.
    pub(super) stopping: bool,
    usage_reported: Instant,
    timer_metrics: timers::TimerMetrics,
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        folder: RoomFolder,
        store: Arc<dyn StateStore>,
        producer: JobProducer,
        redis: Option<RedisWriter>,
        topics: Topics,
        exactly_once: bool,
        commit_interval: Duration,
        health: Arc<Health>,
        restores: Restores,
        restore_results: mpsc::Receiver<RestoreDone>,
        room_cache_budget: usize,
        progress: Arc<ThreadProgress>,
        rewriter: Option<Rewriter>,
    ) -> Engine {
        Engine {
            room_cache_budget,
            room_cache_bytes: 0,
            refusals: Refusals::default(),
            progress,
            commits: 0,
            losses_seen: 0,
            backpressure: Backpressure::default(),
            resync: None,
            rewriter,
            counters: ModuleCounters::for_modules(&folder),
            closes: LocalCounter::new(metrics::counter!("omni_changes_emitted_total", "module" => ROOM_MODULE)),
            consumed: LocalCounter::new(metrics::counter!("omni_events_consumed_total")),
            folder,
            store,
            producer,
            redis,
            topics,
            exactly_once,
            commit_clock: CommitClock::new(commit_interval, Instant::now()),
            health,
            thread_health: ThreadHealth::default(),
            restores,
            restore_results,
            tasks: BTreeMap::new(),
            open_since: None,
            failure: None,
            closing: false,
            stopping: false,
            usage_reported: Instant::now() - Duration::from_secs(60),
            timer_metrics: timers::TimerMetrics::default(),
        }
    }

    /// How long the loop may wait for a record before a commit falls due.
    pub(super) fn poll_timeout(&self, now: Instant) -> Duration {
        let max = Duration::from_millis(100);
        match self.open_since {
            Some(_) => self.commit_clock.until_due(now).clamp(Duration::from_millis(1), max),
            None => max,
        }
    }

    pub(super) fn commit_due(&self, now: Instant) -> bool {
        self.open_since.is_some() && self.commit_clock.until_due(now).is_zero()
    }

    fn begin(&mut self) -> Result<(), RuntimeError> {
        if self.open_since.is_none() {
            if self.exactly_once {
                self.producer.begin_transaction()?;
            }
            self.open_since = Some(Instant::now());
        }
        Ok(())
    }

    /// Folds one consumed record.
    pub(super) fn process(&mut self, message: &BorrowedMessage<'_>) -> Result<(), RuntimeError> {
        let partition = message.partition();
        let Some(task) = self.tasks.get_mut(&partition) else {
            // Revoked after it was fetched; its new owner reads it from the committed offset.
            return Ok(());
        };
        if task.restoring {
            // Fetched before its pause took hold: read again from the committed offset once it resumes.
            return Ok(());
        }
        self.begin()?;
        self.consumed.add(1);
        let source = Source { partition, offset: message.offset() };
        let (topic, record_bytes) = (&self.topics.dead_letter, self.topics.dead_letter_record_bytes);
        if !self.refusals.dead_letter_if_refused(&self.producer, topic, message, source, record_bytes)? {
            if let Err(rejection) = self.fold(source, message)? {
                dead_letter(&self.producer, &self.topics.dead_letter, message, source, &rejection, record_bytes)?;
            }
        }
        if let Some(task) = self.tasks.get_mut(&partition) {
            task.next_offset = Some(message.offset() + 1);
            if task.timers_wait_for.is_some_and(|end| message.offset() + 1 >= end) {
                task.timers_wait_for = None;
            }
        }
        Ok(())
    }

    /// Folds a record into its room; the inner result is the record's own rejection.
    fn fold(&mut self, source: Source, message: &BorrowedMessage<'_>) -> Result<Result<(), Rejection>, RuntimeError> {
        let Engine {
            tasks, store, folder, producer, topics, counters, closes, room_cache_bytes, timer_metrics, ..
        } = self;
        let partition = source.partition;
        let task = tasks.get_mut(&partition).expect("checked by process");
        // Only keys that passed the check become held rooms.
        let held = |path: &str| task.dirty.contains_key(path) || task.recent.contains_key(path);
        let headers = input_headers(message);
        let (path, input) = match folder.decode(message.key(), message.payload(), headers, held) {
            Ok(decoded) => decoded,
            Err(rejection) => return Ok(Err(rejection)),
        };
        let (event, lease) = match input {
            Input::Event { event, lease } => (event, lease),
            Input::KeepAlive(keepalive) => {
                timer_metrics.keep_alive(&mut task.deadlines, path, &keepalive.lease_ids);
                return Ok(Ok(()));
            }
        };
        let room =
            match dirty_room((&mut task.dirty, &mut task.recent), store.as_ref(), room_cache_bytes, path, source)? {
                Ok(room) => room,
                Err(rejection) => return Ok(Err(rejection)),
            };
        // A rejected event leaves the state as it was, so folding in place is safe.
        let now_ms = chrono::Utc::now().timestamp_millis();
        let outcome = match folder.fold_live(&mut room.room, &event, lease.as_ref(), now_ms) {
            Ok(outcome) => outcome,
            Err(rejection) => return Ok(Err(rejection)),
        };
        if outcome.timers_changed {
            room.timers_changed = true;
            room.last_source = source;
            task.deadlines.set_room(path, &room.room.state().timers);
        }
        for (module, counter) in folder.modules().iter().zip(counters.iter_mut()) {
            counter.processed.add(1);
            if outcome.changes.iter().any(|c| c.module == module.name()) {
                counter.changes.add(1);
            } else {
                counter.noops.add(1);
            }
        }
        if outcome.changes.is_empty() {
            return Ok(Ok(()));
        }
        if outcome.closed {
            closes.add(1);
        }
        let cause = Cause { event_id: &event.event_id, occurred_at: event.occurred_at };
        emit(producer, &topics.broadcast, path, room, outcome.changes, cause, source)?;
        Ok(Ok(()))
    }

    /// Publishes the counts gathered since the last commit.
    fn publish_counts(&mut self) {
        for counter in &mut self.counters {
            counter.processed.publish();
            counter.noops.publish();
            counter.changes.publish();
        }
        self.closes.publish();
        self.consumed.publish();
        self.publish_timer_metrics();
    }

    /// Commits the open transaction, if any, after publishing the counts gathered since the last.
    pub(super) fn commit<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> Result<(), RuntimeError> {
        self.publish_counts();
        let Some(opened) = self.open_since else {
            return Ok(());
        };
        self.commit_clock.began(Instant::now());
        self.check_delivery()?;
        for (&partition, task) in &mut self.tasks {
            for (room, dirty) in task.dirty.iter_mut().filter(|(_, d)| d.changed || d.timers_changed) {
                let value = dirty.room.state().encode_to_vec();
                send(
                    &self.producer,
                    record(&self.topics.changelog, dirty.last_source)
                        .partition(partition)
                        .key(room.as_bytes())
                        .payload(&value[..]),
                )?;
                dirty.encoded = value;
            }
        }
        // Every record up to these offsets was processed by now: the stamp
        // bounds when their keep-alives were (see `timers`).
        let stamp_ms = timers::wall_clock_ms();
        let mut offsets = TopicPartitionList::new();
        for (&partition, task) in &self.tasks {
            let wrote = || task.dirty.values().any(|d| d.changed || d.timers_changed);
            let offset = task.next_offset.or_else(|| task.committed_offset.filter(|_| wrote()));
            if let Some(offset) = offset {
                let mut element = offsets.add_partition(&self.topics.input, partition);
                element.set_offset(Offset::Offset(offset))?;
                element.set_metadata(offset_stamp(stamp_ms));
            }
        }
        let started = Instant::now();
        self.progress.enter(Stage::Committing);
        match finish(&self.producer, self.exactly_once, consumer, &offsets) {
            Ok(()) => {
                metrics::histogram!("omni_commit_seconds").record(started.elapsed().as_secs_f64());
                self.open_since = None;
                self.commits += 1;
                for element in offsets.elements_for_topic(&self.topics.input) {
                    let Some(task) = self.tasks.get_mut(&element.partition()) else { continue };
                    task.keepalives_committed_ms = stamp_ms;
                    if let Offset::Offset(offset) = element.offset() {
                        task.committed_offset = Some(offset);
                    }
                }
                self.after_commit()?;
                metrics::histogram!("omni_transaction_seconds").record(opened.elapsed().as_secs_f64());
                Ok(())
            }
            // A stopping engine only drops an aborted transaction: positions
            // no longer matter, and rewinding would ask the group for its
            // offsets while it rebalances around this member leaving.
            Err(e) if self.exactly_once && requires_abort(&e) && self.stopping => {
                tracing::warn!(error = %e, "transaction failed while stopping; aborting it");
                self.abort_open()
            }
            // The thread decides what a failure calls for: an abort and a
            // rewind, a new producer, or the end of the job.
            Err(e) => Err(e.into()),
        }
    }

    /// Fails at once when a record of the open transaction was not
    /// delivered: it can only be aborted.
    pub(super) fn check_delivery(&self) -> Result<(), RuntimeError> {
        if self.exactly_once && self.open_since.is_some() && transaction_failed(&self.producer) {
            return Err(RuntimeError::TransactionFailed);
        }
        Ok(())
    }

    /// Hands the committed overlays to Redis, then moves them into the store.
    /// Redis goes first: it is what readers wait for, and either order is
    /// safe once the transaction committed.
    fn after_commit(&mut self) -> Result<(), RuntimeError> {
        let ends = take_changelog_ends(&self.producer);
        // Refused records below the committed offsets are dealt with.
        for (&partition, task) in &self.tasks {
            if let Some(next) = task.next_offset {
                self.refusals.forget(partition, Some(next));
            }
        }
        let mut writes = Vec::new();
        let mut store_writes = Vec::new();
        let mut cache_bytes = self.room_cache_bytes;
        for (&partition, task) in &mut self.tasks {
            task.next_offset = None;
            let dirty = std::mem::take(&mut task.dirty);
            if dirty.is_empty() && !ends.contains_key(&partition) {
                continue;
            }
            let mut rooms = Vec::with_capacity(dirty.len());
            let mut timers_cleared = Vec::new();
            for (path, DirtyRoom { room, changed, timers_changed, had_timers, encoded, changes, .. }) in dirty {
                let written = changed || timers_changed;
                let encoded_len = if written { encoded.len() } else { room.state().encoded_len() };
                if changed && self.redis.is_some() {
                    writes.push(RoomWrite::from_state(&self.folder, &path, partition, room.state(), changes));
                }
                if written {
                    if had_timers && room.state().timers.is_empty() {
                        timers_cleared.push(path.as_bytes().to_vec());
                    }
                    rooms.push((path.as_bytes().to_vec(), encoded));
                }
                // A closed room costs nothing in memory: only its version
                // stays, in the store, for a reopening to continue from.
                if !room.state().closed {
                    cache_bytes += cache_weight(&path, encoded_len);
                    task.recent.insert(path, room);
                }
            }
            if !rooms.is_empty() || ends.contains_key(&partition) {
                let changelog_offset = ends.get(&partition).copied();
                store_writes.push((partition, PartitionWrite { rooms, changelog_offset, timers_cleared }));
            }
        }
        self.room_cache_bytes = cache_bytes;
        if self.room_cache_bytes > self.room_cache_budget {
            // Past its budget the cache starts over: cheaper than tracking
            // recency, and hot rooms come back with their next event.
            for task in self.tasks.values_mut() {
                task.recent = RoomMap::default();
            }
            self.room_cache_bytes = 0;
        }
        if let Some(redis) = &self.redis {
            redis.send(writes);
        }
        self.progress.enter(Stage::WritingStore);
        for (partition, write) in store_writes {
            self.store.write(partition, write)?;
        }
        Ok(())
    }

    /// Publishes the store's memory and disk use every few seconds.
    pub(super) fn report_store_usage(&mut self) {
        if self.usage_reported.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.usage_reported = Instant::now();
        let usage = self.store.usage();
        metrics::gauge!("omni_rocksdb_memory_bytes").set(usage.memory_bytes as f64);
        metrics::gauge!("omni_rocksdb_disk_bytes").set(usage.disk_bytes as f64);
    }

    /// Rewrites the rooms of every active partition to Redis when the
    /// writer found that Redis lost data. Partitions still restoring rewrite
    /// theirs once restored anyway.
    pub(super) fn resync_if_redis_lost_data(&mut self) {
        let (Some(redis), Some(rewriter)) = (&self.redis, &self.rewriter) else { return };
        let losses = redis.losses();
        if losses == self.losses_seen {
            return;
        }
        self.losses_seen = losses;
        if let Some(running) = self.resync.take() {
            running.cancel();
        }
        let active: Vec<i32> = self.tasks.iter().filter(|(_, task)| !task.restoring).map(|(&p, _)| p).collect();
        tracing::info!(partitions = ?active, "rewriting every room of this thread's partitions to redis");
        self.resync = Resync::start(rewriter.clone(), active);
    }

    /// Stops every restore and resync, for shutdown.
    pub(super) fn shutdown(&mut self) {
        if let Some(running) = self.resync.take() {
            running.cancel();
        }
        let partitions: Vec<i32> = self.tasks.keys().copied().collect();
        self.revoke(&partitions);
    }
}

fn requires_abort(e: &RdError) -> bool {
    match e {
        RdError::Transaction(t) => t.txn_requires_abort(),
        _ => false,
    }
}
