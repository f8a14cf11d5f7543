//! Bringing Redis back in line with the store: after a partition is
//! restored (Redis may have missed writes while it was elsewhere, or down),
//! and after the writer finds that Redis lost data (a "resync"). Rooms
//! stream from the store in small batches through the writer's rewrite
//! lane, which yields to live writes; the compare-and-set leaves every room
//! Redis already holds at its version untouched.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::RuntimeError;
use crate::modules::RoomFolder;
use crate::store::StateStore;
use crate::view::{RedisWriter, RoomWrite, StoredRooms};

/// Rooms per batch handed to the writer's rewrite lane.
const BATCH_ROOMS: usize = 256;

/// Bytes of room state per batch, about: a batch of large rooms is cut short.
const BATCH_BYTES: usize = 2 << 20;

/// Where rooms are rewritten from, and where to.
#[derive(Clone)]
pub(super) struct Rewriter {
    pub store: Arc<dyn StateStore>,
    pub folder: RoomFolder,
    pub writer: RedisWriter,
}

/// Rewrites every room of `partition` from the store to Redis; returns how
/// many, or stops early (and quietly) once `cancel` is set.
pub(super) fn rewrite_partition(rewriter: &Rewriter, partition: i32, cancel: &AtomicBool) -> Result<u64, RuntimeError> {
    let Rewriter { store, folder, writer, .. } = rewriter;
    let mut batch = Vec::with_capacity(BATCH_ROOMS);
    let mut bytes = 0;
    let mut rooms = 0u64;
    let mut open = true;
    store.visit_rooms(partition, &mut |path, state| {
        bytes += state.modules.values().map(String::len).sum::<usize>() + path.len();
        batch.push(RoomWrite::rewrite(folder, &path, partition, &state));
        rooms += 1;
        if batch.len() >= BATCH_ROOMS || bytes >= BATCH_BYTES {
            bytes = 0;
            open = writer.rewrite(std::mem::take(&mut batch), cancel);
        }
        open && !cancel.load(Ordering::Relaxed)
    })?;
    if open && !batch.is_empty() && !cancel.load(Ordering::Relaxed) {
        writer.rewrite(batch, cancel);
    }
    Ok(rooms)
}

/// A resync in progress: one thread rewriting a processing thread's active
/// partitions, one after the other.
pub(super) struct Resync {
    cancel: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Resync {
    /// Starts rewriting `partitions`; `None` if the thread could not start.
    pub(super) fn start(rewriter: Rewriter, partitions: Vec<i32>) -> Option<Resync> {
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&cancel);
        let spawned = std::thread::Builder::new().name("omni-resync".into()).spawn(move || {
            let started = std::time::Instant::now();
            let mut total = 0;
            for partition in &partitions {
                match rewrite_partition(&rewriter, *partition, &stop) {
                    Ok(rooms) => total += rooms,
                    Err(error) => tracing::error!(partition, %error, "resync could not read the store"),
                }
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            tracing::info!(
                ?partitions,
                rooms = total,
                seconds = started.elapsed().as_secs_f64(),
                "every room handed to redis again after it lost data"
            );
        });
        match spawned {
            Ok(thread) => Some(Resync { cancel, thread }),
            Err(error) => {
                tracing::error!(%error, "could not start a resync thread");
                None
            }
        }
    }

    /// Stops the resync and waits for its thread.
    pub(super) fn cancel(self) {
        self.cancel.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// The store's rooms for the writer: a write that waited past the backlog
/// budget is read back from its partition.
pub(super) struct StoreRooms {
    pub store: Arc<dyn StateStore>,
    pub folder: RoomFolder,
}

impl StoredRooms for StoreRooms {
    fn room(&self, path: &str, partition: i32) -> Option<RoomWrite> {
        match self.store.get(partition, path) {
            Ok(Some(state)) => Some(RoomWrite::rewrite(&self.folder, path, partition, &state)),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(%path, %error, "could not read a room back from the store for redis");
                None
            }
        }
    }
}
