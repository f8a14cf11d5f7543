//! Writes committed room state to Redis.
//!
//! The runtime hands over writes only after their Kafka transaction
//! committed. Writes to one room coalesce while they wait ([`pending`]), so a
//! hot room costs one round trip per flush, and every flush is one pipeline.
//! Each room is written by a Lua compare-and-set ([`script`]) that applies
//! only a newer version: replays, a lagging previous owner after a
//! rebalance, and retries are all harmless, and Redis never goes back to an
//! older version through omni's writes.
//!
//! Faults, and what the writer does about them:
//! - Redis unreachable: writes wait (coalesced, bounded in bytes) and the
//!   flush is retried with back-off until it is back.
//! - One room's write fails: that room alone is retried with back-off,
//!   counted and logged once; the others keep flowing.
//! - Redis lost data (FLUSHALL, a restart without persistence, a restart
//!   from an older snapshot): a marker the writer advances on every flush
//!   and checks every second no longer holds what it set last. The writer
//!   counts a loss, and the runtime rewrites every room of its partitions
//!   from the store through [`RedisWriter::rewrite`], a lane that yields to
//!   live writes. On a Redis Cluster each master can lose data on its own (a
//!   failover to a replica that had not received the last writes, a master
//!   restarted empty), so the writer keeps one marker per master ([`slots`]).
//! - Redis slower than the job: past its backlog budget the writer asks the
//!   runtime to pause consumption ([`RedisWriter::should_hold_back`]), as a
//!   full producer buffer blocks Kafka Streams' `send`, until it drained to
//!   three quarters of the budget.
//! - Redis failing for long: the job is not held back by a Redis outage.
//!   Once the backlog passes its budget by a quarter, the writer sheds it
//!   and, when Redis takes writes again, counts a loss: the runtime then
//!   rewrites every room from the store, as after a FLUSHALL. Memory stays
//!   bounded however long Redis is away.

mod marker;
mod pending;
mod room_write;
mod script;
mod slots;
mod status;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{KeyLayout, RedisTarget, ViewConnection};
use marker::{Markers, MARKER_CHECK};
use pending::{Bounds, Pending, Place, Waiting};
#[cfg(test)]
use room_write::test_write;
pub use room_write::{ChangeEntry, RoomWrite};
use status::Pressure;
pub use status::{RedisTrouble, WriterStatus};

/// Tuning of the writer.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub keys: KeyLayout,
    /// How many of a room's latest versions its change stream keeps (whole
    /// entries: an entry holding one of them is kept with all its changes).
    pub stream_max_len: usize,
    /// Most rooms per pipeline.
    pub batch_rooms: usize,
    /// Most bytes of writes waiting for Redis (see [`crate::modules::Limits::redis_backlog_bytes`]).
    pub backlog_bytes: usize,
    /// Most bytes of change entries one room's write carries.
    pub write_bytes: usize,
    /// How long a closed room's change stream outlives it.
    pub closed_stream_retention: Duration,
}

/// Rooms as the store holds them, for writes that waited past the backlog
/// budget with only their path.
pub trait StoredRooms: Send + Sync {
    /// The room's committed state in `partition`, rewritten whole; `None` if the store does not hold it.
    fn room(&self, path: &str, partition: i32) -> Option<RoomWrite>;
}

/// Most bytes of writes one pipeline carries. A flush holds its batch, the
/// commands and their encoding at once, none of it counted in the backlog.
const PIPELINE_BYTES: usize = 4 << 20;

/// How long Redis may take to answer one pipeline.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Batches of rewrites queued at most; a rewriting thread waits past that.
const REWRITE_QUEUE: usize = 2;

/// The runtime's handle to the writer task. Dropping every handle lets the
/// task finish what it holds and stop.
#[derive(Clone)]
pub struct RedisWriter {
    live: mpsc::UnboundedSender<Vec<RoomWrite>>,
    rewrites: mpsc::Sender<Vec<RoomWrite>>,
    losses: Arc<AtomicU64>,
    pressure: Arc<Pressure>,
    status: Arc<WriterStatus>,
}

impl RedisWriter {
    /// Queues committed room writes; never blocks.
    pub fn send(&self, writes: Vec<RoomWrite>) {
        if writes.is_empty() {
            return;
        }
        self.pressure.queued.fetch_add(writes.iter().map(pending::write_bytes).sum(), Ordering::Relaxed);
        if self.live.send(writes).is_err() {
            tracing::warn!("redis writer has stopped; dropping a write that the next reconcile will repair");
        }
    }

    /// Queues rooms rewritten from the store, after the live writes: blocks
    /// while earlier rewrites wait, so a partition's rooms stream through a
    /// bounded queue. From a thread outside the async runtime. `false` if
    /// `cancel` was set or the writer stopped first.
    pub fn rewrite(&self, writes: Vec<RoomWrite>, cancel: &AtomicBool) -> bool {
        let mut writes = writes;
        loop {
            match self.rewrites.try_send(writes) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(back)) => writes = back,
            }
            if cancel.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many times the writer found that Redis had lost data, or shed
    /// its backlog: either way, every room must be rewritten from the store.
    pub fn losses(&self) -> u64 {
        self.losses.load(Ordering::Relaxed)
    }

    /// Whether consumption should pause: Redis takes writes, but fewer than
    /// the job makes, and the backlog reached its budget.
    pub fn should_hold_back(&self) -> bool {
        let p = &self.pressure;
        !p.failing.load(Ordering::Relaxed) && p.total() >= p.budget
    }

    /// Whether paused consumption may resume: the backlog drained to three
    /// quarters of its budget, or Redis fails (and the writer sheds instead).
    pub fn may_resume(&self) -> bool {
        let p = &self.pressure;
        p.failing.load(Ordering::Relaxed) || p.total() <= p.budget / 4 * 3
    }
}

impl RedisWriter {
    /// How the writer's dealings with Redis go.
    pub fn status(&self) -> Arc<WriterStatus> {
        Arc::clone(&self.status)
    }
}

/// Starts the writer task on the current tokio runtime. With `stored`, a
/// write that waits past the backlog budget keeps only its path.
pub fn spawn_writer(
    client: impl Into<RedisTarget>,
    options: WriterOptions,
    stored: Option<Arc<dyn StoredRooms>>,
) -> (RedisWriter, tokio::task::JoinHandle<()>) {
    let (live, live_rx) = mpsc::unbounded_channel();
    let (rewrites, rewrites_rx) = mpsc::channel(REWRITE_QUEUE);
    let losses = Arc::new(AtomicU64::new(0));
    let pressure = Arc::new(Pressure {
        bytes: AtomicUsize::new(0),
        queued: AtomicUsize::new(0),
        failing: AtomicBool::new(false),
        budget: options.backlog_bytes,
    });
    let status = Arc::new(WriterStatus::default());
    let bounds = Bounds {
        changes_per_room: options.stream_max_len,
        change_bytes_per_room: options.write_bytes,
        backlog_bytes: options.backlog_bytes,
        reloadable: stored.is_some(),
    };
    let client = client.into();
    let markers = Markers::new(&options.keys, client.is_cluster());
    let writer = Writer {
        client,
        script: redis::Script::new(script::ROOM_CAS),
        marker_script: redis::Script::new(script::MARKER),
        pending: Pending::new(bounds),
        options,
        stored,
        connection: None,
        backoff: Duration::from_millis(50),
        markers,
        losses: Arc::clone(&losses),
        pressure: Arc::clone(&pressure),
        rewrite_owed: false,
        status: Arc::clone(&status),
        live: Some(live_rx),
        rewrites: Some(rewrites_rx),
    };
    let task = tokio::spawn(writer.run());
    (RedisWriter { live, rewrites, losses, pressure, status }, task)
}

struct Writer {
    client: RedisTarget,
    options: WriterOptions,
    script: redis::Script,
    marker_script: redis::Script,
    pending: Pending,
    stored: Option<Arc<dyn StoredRooms>>,
    connection: Option<ViewConnection>,
    backoff: Duration,
    markers: Markers,
    losses: Arc<AtomicU64>,
    pressure: Arc<Pressure>,
    /// The backlog was shed while Redis failed: once it takes writes again,
    /// every room is rewritten from the store.
    rewrite_owed: bool,
    status: Arc<WriterStatus>,
    /// `None` once every handle is dropped.
    live: Option<mpsc::UnboundedReceiver<Vec<RoomWrite>>>,
    rewrites: Option<mpsc::Receiver<Vec<RoomWrite>>>,
}

/// What a waiting writer woke up for.
enum Wake {
    Live(Option<Vec<RoomWrite>>),
    Rewrite(Option<Vec<RoomWrite>>),
    Tick,
}

impl Writer {
    async fn run(mut self) {
        loop {
            if self.idle() {
                if self.live.is_none() && self.rewrites.is_none() && self.pending.is_empty() {
                    return;
                }
                self.wait_for_work().await;
            }
            self.take_in();
            self.report_backlog();
            if self.idle() {
                if self.markers.checked.elapsed() >= MARKER_CHECK && (self.live.is_some() || self.rewrites.is_some()) {
                    self.flush(Vec::new()).await;
                }
                continue;
            }
            let batch = self.pending.take(self.options.batch_rooms, PIPELINE_BYTES, Instant::now());
            let batch = self.reload(batch);
            if batch.is_empty() && self.markers.checked.elapsed() < MARKER_CHECK {
                continue;
            }
            self.flush(batch).await;
            self.report_backlog();
        }
    }

    /// Nothing to write now: no room waits, or every one backs off after a failure.
    fn idle(&self) -> bool {
        let backing_off =
            || self.pending.only_failing() && self.pending.next_retry().is_some_and(|at| at > Instant::now());
        self.pending.is_empty() || backing_off()
    }

    /// Waits for new writes, a failing room's retry, or the next marker check.
    async fn wait_for_work(&mut self) {
        let next_check = self.markers.checked + MARKER_CHECK;
        let until = self.pending.next_retry().map_or(next_check, |retry| retry.min(next_check));
        let sleep = tokio::time::sleep_until(until.into());
        let (live_open, rewrites_open) = (self.live.is_some(), self.rewrites.is_some());
        let wake = tokio::select! {
            writes = recv_unbounded(&mut self.live), if live_open => Wake::Live(writes),
            writes = recv_bounded(&mut self.rewrites), if rewrites_open => Wake::Rewrite(writes),
            () = sleep => Wake::Tick,
        };
        match wake {
            Wake::Live(Some(writes)) => self.absorb_live(writes),
            Wake::Live(None) => self.live = None,
            Wake::Rewrite(Some(writes)) => self.absorb_rewrites(writes),
            Wake::Rewrite(None) => self.rewrites = None,
            Wake::Tick => {}
        }
    }

    /// Takes every live write that arrived, and a batch of rewrites when
    /// few live writes wait: live writes go first.
    fn take_in(&mut self) {
        while let Some(Ok(writes)) = self.live.as_mut().map(|live| live.try_recv()) {
            self.absorb_live(writes);
        }
        if self.pending.len() < self.options.batch_rooms / 2 {
            if let Some(Ok(writes)) = self.rewrites.as_mut().map(|r| r.try_recv()) {
                self.absorb_rewrites(writes);
            }
        }
    }

    fn absorb_live(&mut self, writes: Vec<RoomWrite>) {
        self.pressure.queued.fetch_sub(writes.iter().map(pending::write_bytes).sum(), Ordering::Relaxed);
        self.pending.absorb_all(writes);
    }

    fn absorb_rewrites(&mut self, writes: Vec<RoomWrite>) {
        for write in writes {
            self.pending.absorb(Waiting::Write(write), Place::Back);
        }
    }

    fn report_backlog(&self) {
        self.pressure.bytes.store(self.pending.bytes(), Ordering::Relaxed);
        self.status.backlog_rooms.store(self.pending.len(), Ordering::Relaxed);
        metrics::gauge!("omni_redis_backlog_rooms").set(self.pending.len() as f64);
        metrics::gauge!("omni_redis_backlog_bytes").set(self.pending.bytes() as f64);
    }

    /// Records whether Redis takes writes (`None`) or why not, for the
    /// runtime's backpressure and the operations endpoint. Back from a
    /// failure during which the backlog was shed, it owes a rewrite of every room.
    fn redis_failing(&mut self, error: Option<&dyn std::fmt::Display>) {
        self.pressure.failing.store(error.is_some(), Ordering::Relaxed);
        match error {
            Some(error) => self.status.failed(error),
            None => self.status.succeeded(),
        }
        if error.is_none() && self.rewrite_owed {
            self.rewrite_owed = false;
            self.losses.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("omni_redis_resyncs_total").increment(1);
            tracing::warn!("redis takes writes again after its backlog was shed; rewriting every room from the store");
        }
    }

    /// While Redis fails, drops the backlog once it passes its budget by a
    /// quarter, for a rewrite from the store when Redis is back: a Redis
    /// outage neither holds the job back nor grows its memory. Only with a
    /// store to rewrite from.
    fn shed_if_over_budget(&mut self) {
        let budget = self.options.backlog_bytes;
        if self.stored.is_none() || self.pending.bytes() <= budget + budget / 4 {
            return;
        }
        let rooms = self.pending.len();
        self.pending = Pending::new(self.pending.bounds());
        self.rewrite_owed = true;
        metrics::counter!("omni_redis_backlog_shed_rooms_total").increment(rooms as u64);
        tracing::warn!(
            rooms,
            "redis is failing and its backlog passed the budget; shed it for a rewrite from the store"
        );
        self.report_backlog();
    }

    /// Reads back the state of rooms that waited with only their path. A
    /// room the store has not caught up with yet (the store takes a commit
    /// just after Redis does), older there or not there at all when new,
    /// waits again, a moment, a bounded number of times. Past that, the
    /// store is not going to catch up here (the partition moved, and its
    /// new owner writes Redis from its own store): what it holds goes.
    fn reload(&mut self, batch: Vec<Waiting>) -> Vec<RoomWrite> {
        let mut writes = Vec::with_capacity(batch.len());
        let now = Instant::now();
        for waiting in batch {
            match waiting {
                Waiting::Write(write) => writes.push(write),
                Waiting::Reload { path, version, partition } => {
                    let stored = self.stored.as_ref().and_then(|s| s.room(&path, partition));
                    let behind = stored.as_ref().is_none_or(|write| write.version < version);
                    if behind && self.pending.defer(Waiting::Reload { path: path.clone(), version, partition }, now) {
                        continue;
                    }
                    match stored {
                        Some(write) => writes.push(write),
                        None => {
                            tracing::warn!(%path, partition, version, "the store never held a room waiting for redis; it is left to the partition's owner");
                            self.pending.succeeded(&path);
                        }
                    }
                }
            }
        }
        writes
    }

    /// Writes a batch and then advances the markers: in one pipeline on one
    /// server; on a cluster, each room's script on its slot's master, all at
    /// once, and the markers once every room has answered.
    async fn flush(&mut self, batch: Vec<RoomWrite>) {
        if self.connect().await.is_none() {
            self.requeue(batch);
            self.back_off().await;
            return;
        }
        if self.markers.placement_due() {
            self.place_markers().await;
        }
        let rooms: Vec<redis::Cmd> =
            batch.iter().map(|write| script::room_command(&self.script, &self.options, write)).collect();
        let (markers, values) = self.markers.commands(&self.marker_script);
        let started = Instant::now();
        let conn = self.connection.as_mut().expect("connected above");
        let replies = if conn.is_cluster() {
            // A cluster connection recovering from a dead master can keep
            // requests waiting past any response timeout: bounded here.
            tokio::time::timeout(RESPONSE_TIMEOUT, slots::send(conn, rooms, markers))
                .await
                .map_err(|_| slots::timed_out("a flush to the cluster"))
        } else {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for cmd in rooms.into_iter().chain(markers) {
                pipe.add_command(cmd);
            }
            // Markers last: Redis and its persistence keep a prefix of what
            // they ran, so a marker that survived vouches for every write before it.
            pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(conn).await
        };
        match replies {
            Ok(replies) => {
                metrics::histogram!("omni_redis_write_seconds").record(started.elapsed().as_secs_f64());
                self.backoff = Duration::from_millis(50);
                self.settle(batch, values, replies).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, rooms = batch.len(), "redis write failed; will retry");
                metrics::counter!("omni_redis_write_errors_total").increment(1);
                self.redis_failing(Some(&e));
                self.markers.unanswered(values);
                if self.connection.as_ref().is_some_and(ViewConnection::is_cluster) {
                    // A cluster connection that failed this way may stay stuck:
                    // the next flush discovers the cluster afresh.
                    self.connection = None;
                }
                self.requeue(batch);
                self.back_off().await;
            }
        }
    }

    /// On a cluster, reads which masters serve slots, for the markers.
    async fn place_markers(&mut self) {
        let Some(conn) = self.connection.as_mut().filter(|c| c.is_cluster()) else { return };
        let read = tokio::time::timeout(RESPONSE_TIMEOUT, slots::marker_slots(conn)).await;
        match read.unwrap_or_else(|_| Err(slots::timed_out("CLUSTER SLOTS"))) {
            Ok(slots) => self.markers.place(slots),
            // The markers stay where they were; the next check asks again.
            Err(error) => tracing::debug!(%error, "reading the cluster's slots failed"),
        }
    }

    /// Sorts out the replies: each room's, then each marker's.
    async fn settle(
        &mut self,
        batch: Vec<RoomWrite>,
        values: Vec<String>,
        mut replies: Vec<redis::RedisResult<redis::Value>>,
    ) {
        let marker_replies = replies.split_off(replies.len().saturating_sub(values.len()));
        let verdict = self.markers.answered(values, marker_replies);
        if verdict.lost {
            self.data_lost();
        }
        let mut missing_script = verdict.missing_script;
        let mut refused_all = None;
        let now = Instant::now();
        let mut written = 0;
        let mut again = Vec::new();
        for (write, reply) in batch.into_iter().zip(replies) {
            match reply {
                Ok(_) => {
                    written += 1;
                    self.pending.succeeded(&write.path);
                }
                Err(e) if is_no_script(&e) => {
                    missing_script = true;
                    again.push(write);
                }
                // Out of memory, read-only, loading…: no room's fault, so
                // none is held back alone; the whole writer backs off.
                Err(e) if refuses_every_write(&e) => {
                    refused_all = Some(e);
                    again.push(write);
                }
                Err(e) => self.room_failed(write, &e, now),
            }
        }
        metrics::counter!("omni_redis_rooms_written_total").increment(written);
        if missing_script {
            // Redis restarted, or its scripts were flushed: load them, try again.
            self.load_scripts().await;
        }
        self.requeue(again);
        match refused_all {
            Some(error) => {
                tracing::warn!(%error, backlog = self.pending.len(), "redis refuses writes; holding them");
                metrics::counter!("omni_redis_write_errors_total").increment(1);
                self.redis_failing(Some(&error));
                self.back_off().await;
            }
            None => self.redis_failing(None),
        }
    }

    fn data_lost(&mut self) {
        self.losses.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("omni_redis_resyncs_total").increment(1);
        tracing::warn!(
            "redis lost data (FLUSHALL, a restart without persistence, an older snapshot, or a failover \
             to a replica that missed writes); rewriting every room from the store"
        );
    }

    fn room_failed(&mut self, write: RoomWrite, error: &redis::RedisError, now: Instant) {
        metrics::counter!("omni_redis_room_failures_total").increment(1);
        let path = write.path.clone();
        let failures = self.pending.fail(Waiting::Write(write), now);
        if failures == 1 {
            tracing::warn!(%path, %error, "redis refused a room's write; retrying that room alone, with back-off");
        }
    }

    async fn load_scripts(&mut self) {
        if let Some(conn) = &mut self.connection {
            for script in [&self.script, &self.marker_script] {
                if let Err(e) = script.prepare_invoke().load_async(conn).await {
                    tracing::warn!(error = %e, "loading a script into redis failed");
                }
            }
        }
    }

    fn requeue(&mut self, batch: Vec<RoomWrite>) {
        for write in batch.into_iter().rev() {
            self.pending.requeue(Waiting::Write(write));
        }
    }

    async fn connect(&mut self) -> Option<()> {
        if self.connection.is_none() {
            let connecting = tokio::time::timeout(RESPONSE_TIMEOUT, self.client.connect_managed(RESPONSE_TIMEOUT));
            match connecting.await.unwrap_or_else(|_| Err(slots::timed_out("connecting"))) {
                Ok(conn) => self.connection = Some(conn),
                Err(e) => {
                    metrics::counter!("omni_redis_write_errors_total").increment(1);
                    self.redis_failing(Some(&e));
                    tracing::warn!(error = %e, backlog = self.pending.len(), "redis unreachable; holding writes");
                    return None;
                }
            }
        }
        Some(())
    }

    /// Backs off before a retry while still taking in new writes.
    async fn back_off(&mut self) {
        let deadline = tokio::time::Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
        loop {
            self.shed_if_over_budget();
            let Some(live) = &mut self.live else {
                tokio::time::sleep_until(deadline).await;
                return;
            };
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return,
                writes = live.recv() => match writes {
                    Some(writes) => self.absorb_live(writes),
                    None => self.live = None,
                },
            }
        }
    }
}

async fn recv_unbounded(rx: &mut Option<mpsc::UnboundedReceiver<Vec<RoomWrite>>>) -> Option<Vec<RoomWrite>> {
    rx.as_mut()?.recv().await
}

async fn recv_bounded(rx: &mut Option<mpsc::Receiver<Vec<RoomWrite>>>) -> Option<Vec<RoomWrite>> {
    rx.as_mut()?.recv().await
}

/// Errors Redis gives every write while it lasts, whatever the room.
fn refuses_every_write(error: &redis::RedisError) -> bool {
    matches!(
        error.code(),
        Some(
            "OOM"
                | "READONLY"
                | "LOADING"
                | "BUSY"
                | "MASTERDOWN"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "NOPERM"
                | "MISCONF"
                // A slot whose master is failing over, as the cluster client gives up on it.
                | "MOVED"
                | "ASK"
        )
    ) || error.is_io_error()
        // A cluster's master failing over: its slots have no node for a moment.
        || error.kind() == redis::ErrorKind::ClusterConnectionNotFound
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
}

fn is_no_script(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}
