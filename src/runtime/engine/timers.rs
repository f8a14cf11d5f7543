//! Firing module timers inside the open transaction. A due timer's change
//! goes out exactly like an event's: broadcast, changelog, Redis, one
//! version more, committed or aborted with everything else in the
//! transaction. An aborted fire is undone with the rest (the deadlines are
//! rebuilt from the committed store), so across aborts, kill -9, restores
//! and moves a timer's change is emitted once.
//!
//! Deadlines are the processing instance's wall clock. A keep-alive moves
//! a lease's deadline in memory only, so each committed input offset
//! carries a stamp: the wall-clock time of its commit, by which every
//! keep-alive below it was processed. When a partition is (re)loaded, its
//! leases get a whole TTL from that stamp (see [`DeadlineIndex::load_room`]
//! and [`crate::runtime::offsets`]):
//! never less than their TTL from the last keep-alive, and overdue at once
//! when the job was down longer than that. Kafka Streams keeps a task's
//! stream time in the same place.

use std::time::Instant;

use super::{dirty_room, emit, Cause, Engine, Source};
use crate::modules::Fired;
use crate::proto::timestamp_from_millis;
use crate::runtime::counters::LocalCounter;
use crate::runtime::RuntimeError;
use crate::store::{DeadlineIndex, DueTimer, StateStore};

/// Most timers one partition fires per turn of the loop, so a burst of
/// expiries (after a restart, say) does not hold up commits and records.
const MOST_FIRES_PER_TURN: usize = 256;

/// The wall clock, in milliseconds since the Unix epoch: what deadlines are counted in.
pub(super) fn wall_clock_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A partition's pending timers, read from the store's list of rooms with
/// timers (not a scan of its rooms), leases re-armed from the time its
/// processed keep-alives are committed up to.
pub(super) fn load_deadlines(
    store: &dyn StateStore,
    partition: i32,
    keepalives_committed_ms: i64,
) -> Result<DeadlineIndex, RuntimeError> {
    let mut index = DeadlineIndex::default();
    for (path, state) in store.timer_rooms(partition)? {
        index.load_room(&path, &state.timers, keepalives_committed_ms);
    }
    Ok(index)
}

/// The timer metrics one processing thread keeps.
pub(super) struct TimerMetrics {
    renewed: LocalCounter,
    unknown: LocalCounter,
    /// What this thread last added to the shared gauges.
    reported_timers: usize,
    reported_leases: usize,
}

impl Default for TimerMetrics {
    fn default() -> Self {
        TimerMetrics {
            renewed: LocalCounter::new(metrics::counter!("omni_keepalives_total", "result" => "renewed")),
            unknown: LocalCounter::new(metrics::counter!("omni_keepalives_total", "result" => "unknown_lease")),
            reported_timers: 0,
            reported_leases: 0,
        }
    }
}

impl TimerMetrics {
    /// Renews the leases a keep-alive names; a lease the room does not hold
    /// (expired, cancelled, never there) is a harmless no-op.
    pub(super) fn keep_alive(&mut self, deadlines: &mut DeadlineIndex, path: &str, lease_ids: &[String]) {
        let now_ms = wall_clock_ms();
        for lease_id in lease_ids {
            if deadlines.renew(path, lease_id, now_ms) {
                self.renewed.add(1);
            } else {
                self.unknown.add(1);
            }
        }
    }

    /// Publishes the counts, and this thread's share of the pending gauges.
    fn publish<'a>(&mut self, indexes: impl Iterator<Item = &'a DeadlineIndex>) {
        self.renewed.publish();
        self.unknown.publish();
        let (timers, leases) = indexes.fold((0, 0), |(t, l), index| (t + index.len(), l + index.leases()));
        let delta = |now: usize, before: usize| now as f64 - before as f64;
        metrics::gauge!("omni_timers_pending").increment(delta(timers, self.reported_timers));
        metrics::gauge!("omni_leases_active").increment(delta(leases, self.reported_leases));
        (self.reported_timers, self.reported_leases) = (timers, leases);
    }
}

impl Engine {
    /// Fires the timers due by now in every consumed partition, opening a
    /// transaction when one falls due.
    pub(in crate::runtime) fn fire_due_timers(&mut self) -> Result<(), RuntimeError> {
        let now_ms = wall_clock_ms();
        let due: Vec<i32> = self
            .tasks
            .iter()
            .filter(|(_, task)| {
                !task.restoring && task.timers_wait_for.is_none() && task.deadlines.next_due(now_ms).is_some()
            })
            .map(|(&partition, _)| partition)
            .collect();
        for partition in due {
            for _ in 0..MOST_FIRES_PER_TURN {
                let Some(timer) = self.tasks.get(&partition).and_then(|t| t.deadlines.next_due(now_ms)) else {
                    break;
                };
                self.begin()?;
                self.fire(partition, timer, now_ms)?;
            }
        }
        Ok(())
    }

    /// Fires one due timer of `partition` in the open transaction.
    fn fire(&mut self, partition: i32, due: DueTimer, now_ms: i64) -> Result<(), RuntimeError> {
        let Engine { tasks, store, folder, producer, topics, room_cache_bytes, .. } = self;
        let task = tasks.get_mut(&partition).expect("a partition with a due timer");
        // No input record is behind a fire; no input offset matches this one.
        let source = Source { partition, offset: -1 };
        let room = match dirty_room(
            (&mut task.dirty, &mut task.recent),
            store.as_ref(),
            room_cache_bytes,
            &due.path,
            source,
        )? {
            Ok(room) => room,
            Err(rejection) => {
                tracing::error!(path = %due.path, %rejection, "a due timer's room does not decode; the timer is dropped");
                task.deadlines.remove_room(&due.path);
                return Ok(());
            }
        };
        match folder.fire(&mut room.room, &due.module, &due.name, due.deadline_ms) {
            Ok(Some(Fired { timer, change })) => {
                metrics::counter!("omni_timer_expiries_total", "module" => timer.module.clone()).increment(1);
                metrics::histogram!("omni_timer_lag_seconds").record((now_ms - due.deadline_ms).max(0) as f64 / 1e3);
                if let Some(change) = change {
                    let event_id = match timer.lease_id.as_str() {
                        "" => format!("timer:{}/{}", timer.module, timer.name),
                        lease_id => lease_id.to_owned(),
                    };
                    let cause =
                        Cause { event_id: &event_id, occurred_at: Some(timestamp_from_millis(due.deadline_ms)) };
                    emit(producer, &topics.broadcast, &due.path, room, vec![change], cause, source)?;
                }
            }
            Ok(None) => {}
            Err(rejection) => {
                tracing::error!(path = %due.path, module = %due.module, timer = %due.name, %rejection, "a timer fold failed; the timer is dropped");
                metrics::counter!("omni_timer_failures_total", "module" => due.module.clone()).increment(1);
                folder.drop_timer(&mut room.room, &due.module, &due.name);
            }
        }
        room.timers_changed = true;
        task.deadlines.set_room(&due.path, &room.room.state().timers);
        Ok(())
    }

    /// Rebuilds every consumed partition's deadlines from the store, after
    /// the open transaction was dropped: what it set, fired or cancelled is
    /// back as committed.
    pub(super) fn reload_deadlines(&mut self) -> Result<(), RuntimeError> {
        let started = Instant::now();
        for (&partition, task) in self.tasks.iter_mut().filter(|(_, task)| !task.restoring) {
            task.deadlines = load_deadlines(self.store.as_ref(), partition, task.keepalives_committed_ms)?;
        }
        tracing::debug!(elapsed = ?started.elapsed(), "deadlines reloaded");
        Ok(())
    }

    /// Publishes the timer metrics; called at each commit.
    pub(super) fn publish_timer_metrics(&mut self) {
        self.timer_metrics.publish(self.tasks.values().map(|task| &task.deadlines));
    }
}
