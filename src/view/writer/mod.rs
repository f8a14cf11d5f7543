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

mod flush;
mod marker;
mod pending;
mod room_write;
mod script;
mod slots;
mod status;
mod task;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{KeyLayout, RedisTarget, ViewConnection};
use marker::Markers;
use pending::{Bounds, Pending};
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

/// The writer task's state: what waits for Redis, the connection, the
/// markers, and what it tells the handles. Its loop is in [`task`], its
/// flushes in [`flush`].
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
