//! A partition's pending timers by deadline, in memory: the runtime finds
//! its due timers by looking at the front of the queue, never by scanning
//! rooms. The rooms' states (and the changelog) hold the timers
//! themselves; this index holds their live deadlines, which keep-alives move
//! without a changelog record. It is rebuilt from the store (whose index of
//! rooms with timers lists them) when a partition is assigned, and after an
//! abort.

use std::collections::{BTreeSet, HashMap};

use crate::proto::omni::Timer;

/// A timer waiting in the index.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    module: String,
    name: String,
    lease_id: String,
    ttl_ms: i64,
    /// The deadline the room's state holds, to tell a timer set again from one kept.
    stored_ms: i64,
    /// The live deadline: the stored one, or later once renewed or restored.
    deadline_ms: i64,
}

/// A timer that fell due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueTimer {
    pub path: String,
    pub module: String,
    pub name: String,
    pub deadline_ms: i64,
}

/// One partition's pending timers.
#[derive(Debug, Default)]
pub struct DeadlineIndex {
    rooms: HashMap<String, Vec<Pending>>,
    /// (deadline, path, module, name), earliest first.
    queue: BTreeSet<(i64, String, String, String)>,
    /// Lease id → the room holding it.
    leases: HashMap<String, String>,
}

impl DeadlineIndex {
    /// Takes a room's timers as its state now holds them, after a fold
    /// changed them. A timer the index holds already (same module, name,
    /// lease and stored deadline) keeps its live deadline.
    pub fn set_room(&mut self, path: &str, timers: &[Timer]) {
        let old = self.take_room(path);
        let pending = timers.iter().map(|timer| {
            let kept = old.iter().find(|p| {
                p.module == timer.module
                    && p.name == timer.name
                    && p.lease_id == timer.lease_id
                    && p.stored_ms == timer.deadline_ms
            });
            pending_of(timer, kept.map_or(timer.deadline_ms, |p| p.deadline_ms))
        });
        let pending: Vec<Pending> = pending.collect();
        self.put_room(path, pending);
    }

    /// Takes a room's timers as a restore found them at `now_ms`. A lease
    /// may have been kept alive after its state was written, so it gets a
    /// whole TTL from now (never less than its TTL, up to one more); a
    /// plain timer keeps its deadline, and an overdue one falls due at once.
    pub fn load_room(&mut self, path: &str, timers: &[Timer], now_ms: i64) {
        self.take_room(path);
        let pending = timers.iter().map(|timer| {
            let deadline = if timer.lease_id.is_empty() {
                timer.deadline_ms
            } else {
                timer.deadline_ms.max(now_ms + timer.ttl_ms)
            };
            pending_of(timer, deadline)
        });
        let pending: Vec<Pending> = pending.collect();
        self.put_room(path, pending);
    }

    /// A keep-alive of `lease_id` for the room at `path`, processed at
    /// `now_ms`: the lease's deadline moves to one TTL from now. False for
    /// a lease the room does not hold (expired, cancelled, or never there).
    pub fn renew(&mut self, path: &str, lease_id: &str, now_ms: i64) -> bool {
        if self.leases.get(lease_id).map(String::as_str) != Some(path) {
            return false;
        }
        let Some(pending) = self.rooms.get_mut(path) else { return false };
        let Some(lease) = pending.iter_mut().find(|p| p.lease_id == lease_id) else { return false };
        let renewed = now_ms + lease.ttl_ms;
        if renewed > lease.deadline_ms {
            let entry = (lease.deadline_ms, path.to_owned(), lease.module.clone(), lease.name.clone());
            self.queue.remove(&entry);
            lease.deadline_ms = renewed;
            self.queue.insert((renewed, entry.1, entry.2, entry.3));
        }
        true
    }

    /// The earliest timer due at `now_ms`, if any; it stays in the index
    /// until its room's timers are set again without it.
    pub fn next_due(&self, now_ms: i64) -> Option<DueTimer> {
        let (deadline_ms, path, module, name) = self.queue.first()?;
        (*deadline_ms <= now_ms).then(|| DueTimer {
            path: path.clone(),
            module: module.clone(),
            name: name.clone(),
            deadline_ms: *deadline_ms,
        })
    }

    /// The earliest live deadline, if any timer is pending.
    pub fn earliest(&self) -> Option<i64> {
        self.queue.first().map(|entry| entry.0)
    }

    /// Forgets a room's timers.
    pub fn remove_room(&mut self, path: &str) {
        self.take_room(path);
    }

    /// Timers pending.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Leases pending.
    pub fn leases(&self) -> usize {
        self.leases.len()
    }

    fn take_room(&mut self, path: &str) -> Vec<Pending> {
        let old = self.rooms.remove(path).unwrap_or_default();
        for p in &old {
            self.queue.remove(&(p.deadline_ms, path.to_owned(), p.module.clone(), p.name.clone()));
            if !p.lease_id.is_empty() && self.leases.get(&p.lease_id).map(String::as_str) == Some(path) {
                self.leases.remove(&p.lease_id);
            }
        }
        old
    }

    fn put_room(&mut self, path: &str, pending: Vec<Pending>) {
        if pending.is_empty() {
            return;
        }
        for p in &pending {
            self.queue.insert((p.deadline_ms, path.to_owned(), p.module.clone(), p.name.clone()));
            if !p.lease_id.is_empty() {
                self.leases.insert(p.lease_id.clone(), path.to_owned());
            }
        }
        self.rooms.insert(path.to_owned(), pending);
    }
}

fn pending_of(timer: &Timer, deadline_ms: i64) -> Pending {
    Pending {
        module: timer.module.clone(),
        name: timer.name.clone(),
        lease_id: timer.lease_id.clone(),
        ttl_ms: timer.ttl_ms,
        stored_ms: timer.deadline_ms,
        deadline_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timer(name: &str, lease_id: &str, deadline_ms: i64) -> Timer {
        Timer {
            module: "m".into(),
            name: name.into(),
            deadline_ms,
            ttl_ms: 1000,
            lease_id: lease_id.into(),
            payload: String::new(),
        }
    }

    fn due(index: &DeadlineIndex, now_ms: i64) -> Option<(String, String, i64)> {
        index.next_due(now_ms).map(|d| (d.path, d.name, d.deadline_ms))
    }

    #[test]
    fn the_earliest_deadline_comes_first_and_only_once_due() {
        let mut index = DeadlineIndex::default();
        index.set_room("a", &[timer("t", "", 3000)]);
        index.set_room("b", &[timer("t", "", 2000), timer("u", "", 5000)]);
        assert_eq!((index.len(), index.earliest()), (3, Some(2000)));
        assert_eq!(due(&index, 1999), None);
        assert_eq!(due(&index, 2000), Some(("b".into(), "t".into(), 2000)));
        index.set_room("b", &[timer("u", "", 5000)]);
        assert_eq!(due(&index, 4000), Some(("a".into(), "t".into(), 3000)));
        index.remove_room("a");
        assert_eq!(due(&index, 4000), None);
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn a_keepalive_pushes_its_lease_back_and_unknown_ones_do_nothing() {
        let mut index = DeadlineIndex::default();
        index.set_room("a", &[timer("lease", "l1", 1000)]);
        assert_eq!(index.leases(), 1);
        assert!(index.renew("a", "l1", 800));
        assert_eq!(due(&index, 1000), None);
        assert_eq!(due(&index, 1800), Some(("a".into(), "lease".into(), 1800)));
        assert!(!index.renew("a", "l2", 900), "unknown lease");
        assert!(!index.renew("b", "l1", 900), "another room's lease");
        assert!(index.renew("a", "l1", 100), "an older keep-alive holds the later deadline");
        assert_eq!(index.earliest(), Some(1800));
        // Setting the room's timers again keeps the renewal of an unchanged lease...
        index.set_room("a", &[timer("lease", "l1", 1000), timer("other", "", 9000)]);
        assert_eq!(index.earliest(), Some(1800));
        // ...but a new lease under the same name starts from its own deadline.
        index.set_room("a", &[timer("lease", "l2", 1500)]);
        assert_eq!((index.earliest(), index.leases()), (Some(1500), 1));
        assert!(!index.renew("a", "l1", 1400), "the replaced lease is gone");
        index.set_room("a", &[]);
        assert!(index.is_empty() && index.leases() == 0);
    }

    #[test]
    fn a_restored_lease_gets_a_whole_ttl_and_a_plain_timer_keeps_its_deadline() {
        let mut index = DeadlineIndex::default();
        index.load_room("a", &[timer("lease", "l1", 1000), timer("plain", "", 1200)], 5000);
        assert_eq!(due(&index, 5000), Some(("a".into(), "plain".into(), 1200)), "overdue: due at once");
        index.set_room("a", &[timer("lease", "l1", 1000)]);
        assert_eq!(due(&index, 5999), None, "never less than its TTL after the restore");
        assert_eq!(due(&index, 6000), Some(("a".into(), "lease".into(), 6000)));
        index.load_room("b", &[timer("lease", "l2", 9000)], 5000);
        assert_eq!(index.next_due(8999).map(|d| d.path), Some("a".into()));
        index.remove_room("a");
        assert_eq!(due(&index, 8999), None, "a deadline later than restore time + TTL stays");
    }
}
