//! Room state stores. The runtime sees only [`StateStore`]; [`rocks`] is the
//! one place in omni that knows RocksDB exists.
//!
//! A store holds, per input partition, every room's [`RoomState`] and the
//! changelog offset it has caught up to. Both move together in one atomic
//! write, and only after the Kafka transaction that produced them committed,
//! so a store never holds uncommitted state and never needs a wipe after an
//! unclean stop.
//!
//! Rooms with pending timers are also listed under a key of their own, so
//! a partition's timers are found without reading every room; the
//! in-memory [`DeadlineIndex`] orders them by deadline.

mod deadlines;
mod rocks;

use crate::proto::omni::RoomState;

pub use deadlines::{DeadlineIndex, DueTimer};
pub use rocks::{RocksStore, StoreOptions};

/// Errors from a state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Backend(String),
    #[error("state store entry for {0:?} does not decode: {1}")]
    Corrupt(String, prost::DecodeError),
}

/// One atomic update of a partition's store.
#[derive(Debug, Default)]
pub struct PartitionWrite {
    /// Rooms with their new state: canonical path text → encoded [`RoomState`],
    /// the very bytes of its changelog record, so neither side encodes twice.
    pub rooms: Vec<(Vec<u8>, Vec<u8>)>,
    /// The changelog offset the store has now caught up to (next offset to read).
    pub changelog_offset: Option<i64>,
    /// Rooms in `rooms` whose timers are all gone, to take off the list of
    /// rooms with timers (rooms written with timers go on it by themselves).
    pub timers_cleared: Vec<Vec<u8>>,
}

/// Memory and disk use, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct StoreUsage {
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// Per-partition room state, durable across restarts.
pub trait StateStore: Send + Sync {
    /// A room's state, if the partition holds it.
    fn get(&self, partition: i32, room: &str) -> Result<Option<RoomState>, StoreError>;

    /// Applies a write atomically.
    fn write(&self, partition: i32, write: PartitionWrite) -> Result<(), StoreError>;

    /// The changelog offset the partition has caught up to; `None` if never written.
    fn changelog_offset(&self, partition: i32) -> Result<Option<i64>, StoreError>;

    /// Forgets everything a partition holds, for a store the changelog no longer explains.
    fn clear(&self, partition: i32) -> Result<(), StoreError>;

    /// Every room of a partition, for tests and tools; see [`StateStore::visit_rooms`] for large ones.
    fn rooms(&self, partition: i32) -> Result<Vec<(String, RoomState)>, StoreError> {
        let mut rooms = Vec::new();
        self.visit_rooms(partition, &mut |room, state| {
            rooms.push((room, state));
            true
        })?;
        Ok(rooms)
    }

    /// Hands every room of a partition to `visit`, one at a time, until it
    /// returns false: streams a partition of any size in bounded memory.
    fn visit_rooms(&self, partition: i32, visit: &mut dyn FnMut(String, RoomState) -> bool) -> Result<(), StoreError>;

    fn usage(&self) -> StoreUsage;

    /// The rooms of a partition that hold timers, read through the list of
    /// such rooms rather than a scan of all of them. Rooms listed that hold
    /// none any more (a restore overwrote them) leave the list here.
    fn timer_rooms(&self, partition: i32) -> Result<Vec<(String, RoomState)>, StoreError>;
}
