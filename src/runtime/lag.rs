//! Consumer lag that stays true whatever the processing threads do.
//!
//! librdkafka's own lag statistics are delivered through the consumer's
//! poll, so they freeze when a thread blocks, and they count from the
//! offsets the consumer committed itself, which under exactly-once it never
//! does (offsets commit with the transaction). Instead each thread
//! publishes where it has got to in every assigned partition, and a watcher
//! of its own compares that with the partition's last stable offset every
//! few seconds: a blocked thread's lag grows as input arrives, and a thread
//! that has caught up shows 0.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::KafkaSettings;

/// How often the watcher measures.
pub const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Where each assigned partition's processing has got to.
#[derive(Debug, Default)]
pub struct Positions {
    positions: Mutex<BTreeMap<i32, Slot>>,
}

/// One partition's position, and the processing thread that owns it.
#[derive(Debug, Clone, Copy)]
struct Slot {
    thread: usize,
    /// Next offset to process, or `None` before its first record (the
    /// committed offset stands in then).
    offset: Option<i64>,
}

impl Positions {
    /// `thread` owns these partitions now, whoever owned them before.
    pub(super) fn assigned(&self, thread: usize, partitions: &[i32]) {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        for &partition in partitions {
            positions.insert(partition, Slot { thread, offset: None });
        }
    }

    /// `thread` gave these partitions up. A slot another thread of this
    /// instance took since stays: a revoke can come after the partition
    /// moved to a sibling thread.
    pub(super) fn revoked(&self, thread: usize, partitions: &[i32]) {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        for partition in partitions {
            if positions.get(partition).is_some_and(|slot| slot.thread == thread) {
                positions.remove(partition);
            }
        }
    }

    /// Records where `thread`'s consumer stands, from its `position()`; only
    /// in the partitions `thread` owns.
    pub(super) fn advanced(&self, thread: usize, list: &TopicPartitionList) {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        for element in list.elements() {
            let slot = positions.get_mut(&element.partition()).filter(|slot| slot.thread == thread);
            if let (Offset::Offset(offset), Some(slot)) = (element.offset(), slot) {
                slot.offset = Some(offset);
            }
        }
    }

    fn assigned_partitions(&self) -> BTreeSet<i32> {
        self.positions.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect()
    }

    fn snapshot(&self) -> BTreeMap<i32, Option<i64>> {
        let positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        positions.iter().map(|(&partition, slot)| (partition, slot.offset)).collect()
    }
}

/// Measures the lag of the assigned partitions every [`LAG_INTERVAL`] until
/// `stop` is set; meant for a thread of its own, as every call blocks.
pub(super) fn watch(
    settings: &KafkaSettings,
    group: &str,
    input: &str,
    positions: &Positions,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut config = settings.client_config();
    config.set("group.id", group).set("isolation.level", "read_committed").set("enable.auto.commit", "false");
    let consumer: BaseConsumer = match config.create() {
        Ok(consumer) => consumer,
        Err(error) => {
            tracing::warn!(%error, "no lag watcher: could not create its client");
            return;
        }
    };
    let mut reported = BTreeSet::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let now = positions.snapshot();
        for partition in reported.difference(&now.keys().copied().collect()) {
            metrics::gauge!("omni_consumer_lag", "partition" => partition.to_string()).set(0.0);
        }
        reported = now.keys().copied().collect();
        for (partition, position) in lags(&consumer, input, now) {
            metrics::gauge!("omni_consumer_lag", "partition" => partition.to_string()).set(position as f64);
        }
        // A new assignment is measured at once, the rest every interval.
        let deadline = std::time::Instant::now() + LAG_INTERVAL;
        while std::time::Instant::now() < deadline && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            if positions.assigned_partitions() != reported {
                break;
            }
        }
    }
}

/// Each partition's records between its position and its last stable offset.
fn lags(consumer: &BaseConsumer, input: &str, positions: BTreeMap<i32, Option<i64>>) -> Vec<(i32, i64)> {
    let timeout = Duration::from_secs(5);
    let mut unknown = TopicPartitionList::new();
    for (&partition, position) in &positions {
        if position.is_none() {
            unknown.add_partition(input, partition);
        }
    }
    // `None` when the committed offsets could not be read: such partitions are not measured this time.
    let committed: Option<BTreeMap<i32, i64>> = if unknown.count() == 0 {
        Some(BTreeMap::new())
    } else {
        consumer.committed_offsets(unknown, timeout).ok().map(|list| {
            list.elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect()
        })
    };
    let mut out = Vec::new();
    for (partition, position) in positions {
        let Ok((low, stable)) = consumer.fetch_watermarks(input, partition, timeout) else { continue };
        // Before its first record a partition stands at its committed offset, or at the start without one.
        let from = match (position, &committed) {
            (Some(position), _) => position,
            (None, Some(committed)) => committed.get(&partition).copied().unwrap_or(low),
            (None, None) => continue,
        };
        out.push((partition, (stable - from).max(0)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(partition: i32, offset: i64) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset("in", partition, Offset::Offset(offset)).unwrap();
        list
    }

    #[test]
    fn a_partition_moved_to_a_sibling_thread_keeps_its_slot_against_the_old_owner() {
        let positions = Positions::default();
        positions.assigned(0, &[1]);
        positions.advanced(0, &at(1, 10));
        // The partition moves to thread 1 before thread 0 hears of its revoke.
        positions.assigned(1, &[1]);
        positions.advanced(0, &at(1, 12));
        positions.revoked(0, &[1]);
        assert_eq!(positions.snapshot(), BTreeMap::from([(1, None)]), "the old owner neither moved nor removed it");
        positions.advanced(1, &at(1, 11));
        assert_eq!(positions.snapshot(), BTreeMap::from([(1, Some(11))]));
        positions.revoked(1, &[1]);
        assert!(positions.snapshot().is_empty());
    }
}
