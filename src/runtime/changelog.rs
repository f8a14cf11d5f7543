//! What the two readers of a partition's changelog share: a restore, which
//! makes a partition this instance now owns current before it is consumed,
//! and a standby, which keeps a copy of a partition owned elsewhere warm.
//!
//! Both write the store from the changelog, so they must never write one
//! partition at once: [`Claims`] says which partitions this instance owns,
//! and a standby writes only under its lock, after checking. Both also start
//! from the store's checkpoint, judged the same way by [`resume_offset`].

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::KafkaSettings;
use crate::store::{PartitionWrite, StateStore, StoreError};

/// Changelog records as the store takes them: room key and encoded state.
pub type ChangelogRecords = Vec<(Vec<u8>, Vec<u8>)>;

/// What restores and standbys read and write: the changelog topic, and
/// the store and its claims.
#[derive(Clone)]
pub struct Changelog {
    pub settings: KafkaSettings,
    pub topic: String,
    pub store: Arc<dyn StateStore>,
    pub claims: Arc<Claims>,
}

/// The partitions this instance owns, which no standby may write.
#[derive(Debug, Default)]
pub struct Claims {
    owned: Mutex<BTreeSet<i32>>,
}

impl Claims {
    fn lock(&self) -> MutexGuard<'_, BTreeSet<i32>> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This instance owns `partition` now. Once this returns, no standby
    /// write to it is under way or will follow.
    pub fn claim(&self, partition: i32) {
        self.lock().insert(partition);
    }

    /// This instance gave these partitions up; a standby may follow them.
    pub fn release(&self, partitions: &[i32]) {
        let mut owned = self.lock();
        for partition in partitions {
            owned.remove(partition);
        }
    }

    pub fn owned(&self) -> BTreeSet<i32> {
        self.lock().clone()
    }

    /// Runs a standby's `write` unless the partition is owned here; false
    /// when it was, and nothing was written.
    pub fn unless_owned(
        &self,
        partition: i32,
        write: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<bool, StoreError> {
        let owned = self.lock();
        if owned.contains(&partition) {
            return Ok(false);
        }
        write()?;
        drop(owned);
        Ok(true)
    }
}

/// Where reading `partition`'s changelog resumes for a store, given the
/// changelog's `low` and `high` watermarks. A checkpoint past the end (the
/// changelog was recreated or truncated) or before its start (records the
/// store has not seen were deleted) means the store no longer matches the
/// changelog: the partition is cleared and read from the start.
pub fn resume_offset(store: &dyn StateStore, partition: i32, (low, high): (i64, i64)) -> Result<i64, StoreError> {
    match store.changelog_offset(partition)? {
        Some(from) if from > high || from < low => {
            tracing::warn!(
                partition,
                from,
                low,
                high,
                "store checkpoint outside the changelog; rebuilding the partition"
            );
            store.clear(partition)?;
            Ok(low)
        }
        Some(from) => Ok(from),
        None => Ok(low),
    }
}

/// How far a reader of `topic`'s `partition` has got, from its consumer's
/// `positions`: transaction markers and compaction leave gaps, and the
/// consumer's position moves past them where the last record read (`next`
/// is the offset after it) does not.
pub fn position_past_markers(positions: &TopicPartitionList, topic: &str, partition: i32, next: i64) -> i64 {
    match positions.find_partition(topic, partition).map(|e| e.offset()) {
        Some(Offset::Offset(position)) => position.max(next),
        _ => next,
    }
}

/// A store write of changelog records as they are, caught up to `next`.
pub fn changelog_write(rooms: ChangelogRecords, next: i64) -> PartitionWrite {
    PartitionWrite { rooms, changelog_offset: Some(next), ..PartitionWrite::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(writes: &mut usize) -> Result<(), StoreError> {
        *writes += 1;
        Ok(())
    }

    #[test]
    fn a_standby_write_runs_only_while_the_partition_is_not_owned_here() {
        let claims = Claims::default();
        let mut writes = 0;
        assert!(claims.unless_owned(3, || count(&mut writes)).unwrap());
        claims.claim(3);
        assert!(!claims.unless_owned(3, || count(&mut writes)).unwrap(), "a claimed partition is not written");
        assert!(claims.unless_owned(4, || count(&mut writes)).unwrap());
        claims.release(&[3]);
        assert!(claims.unless_owned(3, || count(&mut writes)).unwrap());
        assert_eq!(writes, 3);
    }
}
