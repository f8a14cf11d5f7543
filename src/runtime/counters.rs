//! Metric counters a processing thread counts locally and publishes in bulk.

use crate::modules::RoomFolder;

/// A counter counted locally and published in bulk: processing threads
/// would otherwise contend on the shared counter's cache line per event.
pub(super) struct LocalCounter {
    handle: metrics::Counter,
    pending: u64,
}

impl LocalCounter {
    pub(super) fn new(handle: metrics::Counter) -> LocalCounter {
        LocalCounter { handle, pending: 0 }
    }

    pub(super) fn add(&mut self, n: u64) {
        self.pending += n;
    }

    pub(super) fn publish(&mut self) {
        if self.pending > 0 {
            self.handle.increment(std::mem::take(&mut self.pending));
        }
    }
}

/// Counters per module, resolved once rather than per event.
pub(super) struct ModuleCounters {
    pub(super) processed: LocalCounter,
    pub(super) noops: LocalCounter,
    pub(super) changes: LocalCounter,
}

impl ModuleCounters {
    pub(super) fn for_modules(folder: &RoomFolder) -> Vec<ModuleCounters> {
        folder
            .modules()
            .iter()
            .map(|m| ModuleCounters {
                processed: LocalCounter::new(metrics::counter!("omni_events_processed_total", "module" => m.name())),
                noops: LocalCounter::new(metrics::counter!("omni_noops_total", "module" => m.name())),
                changes: LocalCounter::new(metrics::counter!("omni_changes_emitted_total", "module" => m.name())),
            })
            .collect()
    }
}
