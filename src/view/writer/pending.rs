//! Writes waiting for Redis: coalesced per room, in the order their rooms
//! started waiting, bounded in bytes, and with rooms that keep failing held
//! back alone.
//!
//! Rooms go to Redis in the order they started waiting, and a room that is
//! written again while it waits keeps its place, so a busy room is never
//! starved. The rooms of one commit start waiting together; among them, the
//! room whose oldest change has the earliest event goes first, so the
//! changes that waited longest turn visible first, which keeps the tail of
//! the event-to-Redis latency near that of the broadcast. Event times come
//! from the event's producer (fold order would not do: the records that
//! queue up during a commit are folded in a burst, partition by partition);
//! a producer's skewed clock can only reorder the rooms of one commit, never
//! hold a room back past the next.
//!
//! Memory is bounded in bytes twice over. A room's change entries are
//! capped (older ones dropped, and the stream told of the hole), and past
//! the backlog budget a waiting room keeps only its path: its state is read
//! back from the store when its turn comes.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::{ChangeEntry, RoomWrite};

/// A room waiting for its write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Waiting {
    /// The write itself.
    Write(RoomWrite),
    /// Only the path and the version it must reach: the state is read from
    /// the store (its partition's) when its turn comes.
    Reload { path: String, version: u64, partition: i32 },
}

impl Waiting {
    pub(super) fn path(&self) -> &str {
        match self {
            Waiting::Write(write) => &write.path,
            Waiting::Reload { path, .. } => path,
        }
    }

    fn version(&self) -> u64 {
        match self {
            Waiting::Write(write) => write.version,
            Waiting::Reload { version, .. } => *version,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Waiting::Write(write) => write_bytes(write),
            // Its slot in the map, its place in the queue and both copies of
            // its path, as a heap profile measured them.
            Waiting::Reload { path, .. } => 2 * path.len() + 320,
        }
    }
}

/// What a change entry costs while it waits, about.
pub(super) fn change_bytes(change: &ChangeEntry) -> usize {
    change.state_json.len() + change.cause_event_id.len() + 160
}

pub(super) fn write_bytes(write: &RoomWrite) -> usize {
    let modules: usize = write.modules.iter().map(|(name, json)| name.len() + json.len() + 32).sum();
    write.path.len() + modules + write.changes.iter().map(change_bytes).sum::<usize>() + 128
}

/// Bounds of the pending writes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    /// Most change entries a room's write keeps: the stream keeps no more.
    pub changes_per_room: usize,
    /// Most bytes of change entries a room's write keeps.
    pub change_bytes_per_room: usize,
    /// Most bytes all waiting writes take; past it, new writes keep only their path.
    pub backlog_bytes: usize,
    /// Whether a room's state can be read back from the store, so a write
    /// past the budget can be reduced to its path.
    pub reloadable: bool,
}

/// A room whose write failed on its own, held back until `retry_at`.
struct Failing {
    failures: u32,
    retry_at: Instant,
    /// Its path stands in `order` already, put there when it fell due.
    queued: bool,
}

/// Times a room the store has not caught up with waits for it, 20 ms
/// each: a few seconds, for a store write held up on a loaded machine.
const MOST_DEFERRALS: u32 = 250;

/// The longest a failing room waits between two attempts.
const MOST_ROOM_BACKOFF: Duration = Duration::from_secs(30);

pub(super) struct Pending {
    rooms: HashMap<String, Waiting>,
    /// Paths in the order their rooms started waiting. A requeue can leave a
    /// path in twice; `take` skips a path whose room was already taken.
    order: VecDeque<String>,
    failing: HashMap<String, Failing>,
    bytes: usize,
    bounds: Bounds,
}

/// Where a room that was not waiting joins the queue.
#[derive(Clone, Copy)]
pub(super) enum Place {
    Back,
    Front,
}

impl Pending {
    pub(super) fn new(bounds: Bounds) -> Pending {
        Pending { rooms: HashMap::new(), order: VecDeque::new(), failing: HashMap::new(), bytes: 0, bounds }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.rooms.len()
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// Takes in one commit's writes.
    pub(super) fn absorb_all(&mut self, mut writes: Vec<RoomWrite>) {
        writes.sort_by_key(RoomWrite::first_occurred);
        for write in writes {
            self.absorb(Waiting::Write(write), Place::Back);
        }
    }

    pub(super) fn absorb(&mut self, incoming: Waiting, place: Place) {
        let mut waiting = match self.rooms.remove(incoming.path()) {
            Some(existing) => {
                self.bytes -= existing.bytes();
                merge(existing, incoming)
            }
            None => {
                let path = incoming.path().to_owned();
                match place {
                    Place::Back => self.order.push_back(path),
                    Place::Front => self.order.push_front(path),
                }
                incoming
            }
        };
        if let Waiting::Write(write) = &mut waiting {
            cap_changes(write, self.bounds);
        }
        if self.bounds.reloadable && self.bytes + waiting.bytes() > self.bounds.backlog_bytes {
            if let Waiting::Write(write) = &waiting {
                metrics::counter!("omni_redis_stream_entries_dropped_total").increment(write.changes.len() as u64);
                waiting =
                    Waiting::Reload { path: write.path.clone(), version: write.version, partition: write.partition };
            }
        }
        self.bytes += waiting.bytes();
        self.rooms.insert(waiting.path().to_owned(), waiting);
    }

    /// The rooms that have waited longest, taken out, longest first: at most
    /// `n` of them, and no more once they weigh `max_bytes` (one at least).
    /// Failing rooms whose back-off is over go first.
    pub(super) fn take(&mut self, n: usize, max_bytes: usize, now: Instant) -> Vec<Waiting> {
        for (path, failing) in &mut self.failing {
            if failing.retry_at <= now && !failing.queued && self.rooms.contains_key(path) {
                failing.queued = true;
                self.order.push_front(path.clone());
            }
        }
        let mut batch = Vec::with_capacity(n.min(self.rooms.len()));
        let mut weight = 0;
        while batch.len() < n && weight < max_bytes {
            let Some(path) = self.order.pop_front() else { break };
            if let Some(failing) = self.failing.get_mut(&path) {
                failing.queued = false;
                // Still backing off: it keeps no place in the queue, `failing` holds it.
                if failing.retry_at > now {
                    continue;
                }
            }
            if let Some(waiting) = self.rooms.remove(&path) {
                self.bytes -= waiting.bytes();
                weight += waiting.bytes();
                batch.push(waiting);
            }
        }
        batch
    }

    /// When the next failing room may be tried again, if one waits only for that.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.failing.iter().filter(|(path, _)| self.rooms.contains_key(*path)).map(|(_, f)| f.retry_at).min()
    }

    /// Whether every waiting room is backing off after a failure.
    pub(super) fn only_failing(&self) -> bool {
        self.rooms.keys().all(|path| self.failing.contains_key(path))
    }

    /// Puts a write back in front after its batch failed as a whole (Redis
    /// unreachable), merged with anything newer that arrived meanwhile.
    /// Requeue a batch last first to keep its order.
    pub(super) fn requeue(&mut self, failed: Waiting) {
        let waiting = match self.rooms.remove(failed.path()) {
            Some(newer) => {
                self.bytes -= newer.bytes();
                merge(failed, newer)
            }
            None => failed,
        };
        self.absorb(waiting, Place::Front);
    }

    /// Holds back a room whose own write failed, for longer each time;
    /// returns how many times in a row it failed.
    pub(super) fn fail(&mut self, failed: Waiting, now: Instant) -> u32 {
        let path = failed.path().to_owned();
        let failing = self.failing.entry(path).or_insert(Failing { failures: 0, retry_at: now, queued: false });
        failing.failures += 1;
        let backoff = Duration::from_millis(100).saturating_mul(1 << failing.failures.min(10)).min(MOST_ROOM_BACKOFF);
        failing.retry_at = now + backoff;
        let failures = failing.failures;
        self.absorb(failed, Place::Back);
        failures
    }

    /// Holds back a room the store has not caught up with for a moment;
    /// false once it has waited long enough, and it is to go as it is.
    pub(super) fn defer(&mut self, waiting: Waiting, now: Instant) -> bool {
        let path = waiting.path().to_owned();
        let failing = self.failing.entry(path.clone()).or_insert(Failing { failures: 0, retry_at: now, queued: false });
        if failing.failures >= MOST_DEFERRALS {
            self.failing.remove(&path);
            return false;
        }
        failing.failures += 1;
        failing.retry_at = now + Duration::from_millis(20);
        self.absorb(waiting, Place::Back);
        true
    }

    /// Forgets a room's failures once its write went through.
    pub(super) fn succeeded(&mut self, path: &str) {
        self.failing.remove(path);
    }
}

/// Two waiting writes of one room merged, whichever came first: a write
/// put back after a failure is older than one that arrived meanwhile.
fn merge(a: Waiting, b: Waiting) -> Waiting {
    match (a, b) {
        (Waiting::Write(a), Waiting::Write(b)) => {
            // At one version, the write with its changes beats a rewrite without them.
            let a_first = a.version < b.version || (a.version == b.version && b.truncated <= a.truncated);
            let (mut older, newer) = if a_first { (a, b) } else { (b, a) };
            older.absorb(newer);
            Waiting::Write(older)
        }
        // Either side reduced to its path: the store holds the newest state.
        (a, b) => {
            let version = a.version().max(b.version());
            let partition = match (&a, &b) {
                (Waiting::Reload { partition, .. }, _) | (_, Waiting::Reload { partition, .. }) => *partition,
                (Waiting::Write(write), _) => write.partition,
            };
            Waiting::Reload { path: a.path().to_owned(), version, partition }
        }
    }
}

/// Drops a write's oldest change entries past the room's bounds, and marks
/// the hole they leave.
fn cap_changes(write: &mut RoomWrite, bounds: Bounds) {
    let mut bytes: usize = write.changes.iter().map(change_bytes).sum();
    let mut excess = write.changes.len().saturating_sub(bounds.changes_per_room);
    for change in &write.changes[..excess] {
        bytes -= change_bytes(change);
    }
    while excess < write.changes.len() && bytes > bounds.change_bytes_per_room {
        bytes -= change_bytes(&write.changes[excess]);
        excess += 1;
    }
    if excess > 0 {
        write.changes.drain(..excess);
        write.truncated = true;
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_write as write;
    use super::*;

    const BOUNDS: Bounds =
        Bounds { changes_per_room: 100, change_bytes_per_room: 1 << 20, backlog_bytes: 1 << 30, reloadable: true };

    fn versions(w: &Waiting) -> Vec<u64> {
        match w {
            Waiting::Write(w) => w.changes.iter().map(|c| c.version).collect(),
            Waiting::Reload { .. } => Vec::new(),
        }
    }

    fn room(name: &str, occurred_at: &[i64]) -> RoomWrite {
        let at = |millis: i64| Some(crate::proto::timestamp_from_millis(millis));
        let changes =
            occurred_at.iter().map(|&t| ChangeEntry { occurred_at: at(t), ..write(1, &[1]).changes[0].clone() });
        RoomWrite { path: format!("app/a/room/{name}"), changes: changes.collect(), ..write(1, &[]) }
    }

    fn paths(batch: Vec<Waiting>) -> Vec<String> {
        batch.iter().map(|w| w.path().trim_start_matches("app/a/room/").to_owned()).collect()
    }

    #[test]
    fn a_requeued_failure_keeps_the_newer_state_and_every_change_in_order() {
        let mut pending = Pending::new(BOUNDS);
        pending.absorb_all(vec![write(5, &[5])]);
        pending.requeue(Waiting::Write(write(4, &[3, 4])));
        let w = &pending.rooms["app/a/room/r"];
        assert!(matches!(w, Waiting::Write(w) if w.version == 5));
        assert_eq!(versions(w), vec![3, 4, 5]);
        assert_eq!(pending.take(10, usize::MAX, Instant::now()).len(), 1);
        assert_eq!(pending.bytes(), 0, "the byte count returns to zero");
    }

    #[test]
    fn rooms_go_in_the_order_they_started_waiting_and_a_commit_by_its_oldest_change() {
        let mut pending = Pending::new(BOUNDS);
        pending.absorb_all(vec![
            room("late", &[900]),
            room("early", &[100, 950]),
            room("middle", &[500]),
            room("reconcile", &[]),
        ]);
        // The next commit: a busy room written again keeps its place.
        pending.absorb_all(vec![room("newest", &[1010]), room("early", &[1000])]);
        let now = Instant::now();
        assert_eq!(paths(pending.take(3, usize::MAX, now)), ["reconcile", "early", "middle"]);
        assert_eq!(paths(pending.take(3, usize::MAX, now)), ["late", "newest"]);
        assert!(pending.is_empty());
    }

    #[test]
    fn a_failed_batch_goes_back_in_front_in_its_order() {
        let mut pending = Pending::new(BOUNDS);
        pending.absorb_all(vec![room("a", &[1]), room("b", &[2]), room("c", &[3])]);
        let now = Instant::now();
        let failed = pending.take(2, usize::MAX, now);
        pending.absorb_all(vec![room("d", &[4]), room("a", &[5])]);
        for write in failed.into_iter().rev() {
            pending.requeue(write);
        }
        assert_eq!(paths(pending.take(10, usize::MAX, now)), ["a", "b", "c", "d"]);
        assert!(pending.take(10, usize::MAX, now).is_empty(), "a path left in twice is skipped once its room is taken");
        assert_eq!(pending.bytes(), 0);
    }

    #[test]
    fn a_failing_room_backs_off_alone_while_the_others_go() {
        let mut pending = Pending::new(BOUNDS);
        pending.absorb_all(vec![room("bad", &[1]), room("good", &[2])]);
        let now = Instant::now();
        let mut batch = pending.take(10, usize::MAX, now);
        assert_eq!(paths(batch.clone()), ["bad", "good"]);
        assert_eq!(pending.fail(batch.remove(0), now), 1);
        pending.absorb_all(vec![room("next", &[3])]);
        assert_eq!(paths(pending.take(10, usize::MAX, now)), ["next"], "the failing room waits out its back-off");
        assert!(pending.only_failing());
        let retry = pending.next_retry().expect("the failing room waits");
        assert!(retry > now);
        assert_eq!(paths(pending.take(10, usize::MAX, retry)), ["bad"], "then it is tried again, first");
        let failed = pending.take(10, usize::MAX, retry);
        assert!(failed.is_empty());
        pending.succeeded("app/a/room/bad");
        assert!(pending.next_retry().is_none());
    }

    #[test]
    fn a_due_failing_room_stands_in_the_queue_once() {
        let mut pending = Pending::new(BOUNDS);
        pending.absorb_all(vec![room("bad", &[1])]);
        let now = Instant::now();
        let failed = pending.take(10, usize::MAX, now).pop().unwrap();
        pending.fail(failed, now);
        let due = pending.next_retry().unwrap();
        for _ in 0..100 {
            assert!(pending.take(0, usize::MAX, due).is_empty());
        }
        assert!(pending.order.len() <= 2, "the queue holds the room once, not {} times", pending.order.len());
        assert_eq!(paths(pending.take(10, usize::MAX, due)), ["bad"]);
    }

    #[test]
    fn a_room_the_store_has_not_caught_up_with_waits_a_bounded_while() {
        let mut pending = Pending::new(BOUNDS);
        let reload = || Waiting::Reload { path: "app/a/room/r".into(), version: 9, partition: 0 };
        let mut now = Instant::now();
        let mut deferrals = 0;
        while pending.defer(reload(), now) {
            deferrals += 1;
            assert!(pending.take(10, usize::MAX, now).is_empty(), "it waits out its moment");
            now = pending.next_retry().unwrap();
            assert_eq!(pending.take(10, usize::MAX, now), vec![reload()]);
        }
        assert_eq!(deferrals, MOST_DEFERRALS);
    }

    #[test]
    fn a_room_keeps_no_more_change_entries_than_its_bounds_and_marks_the_hole() {
        let mut pending = Pending::new(Bounds { changes_per_room: 3, ..BOUNDS });
        pending.absorb(Waiting::Write(write(5, &[1, 2, 3, 4, 5])), Place::Back);
        let w = &pending.rooms["app/a/room/r"];
        assert_eq!(versions(w), vec![3, 4, 5]);
        assert!(matches!(w, Waiting::Write(w) if w.truncated));
        let one = change_bytes(&write(1, &[1]).changes[0]);
        let mut pending = Pending::new(Bounds { change_bytes_per_room: 2 * one, ..BOUNDS });
        pending.absorb(Waiting::Write(write(5, &[1, 2, 3, 4, 5])), Place::Back);
        assert_eq!(versions(&pending.rooms["app/a/room/r"]), vec![4, 5], "capped by bytes too");
        let mut pending = Pending::new(BOUNDS);
        pending.absorb(Waiting::Write(write(5, &[1, 2, 3, 4, 5])), Place::Back);
        assert!(matches!(&pending.rooms["app/a/room/r"], Waiting::Write(w) if !w.truncated));
    }

    #[test]
    fn past_the_backlog_budget_a_room_waits_as_its_path_alone() {
        let small = write_bytes(&write(1, &[1]));
        let mut pending = Pending::new(Bounds { backlog_bytes: small + 10, ..BOUNDS });
        pending.absorb(Waiting::Write(write(1, &[1])), Place::Back);
        pending.absorb(Waiting::Write(RoomWrite { path: "app/a/room/q".into(), ..write(2, &[2]) }), Place::Back);
        assert!(matches!(&pending.rooms["app/a/room/r"], Waiting::Write(_)));
        assert_eq!(
            pending.rooms["app/a/room/q"],
            Waiting::Reload { path: "app/a/room/q".into(), version: 2, partition: 0 }
        );
        // A newer write to a reduced room stays reduced: the store has it.
        pending.absorb(Waiting::Write(RoomWrite { path: "app/a/room/q".into(), ..write(3, &[3]) }), Place::Back);
        assert_eq!(
            pending.rooms["app/a/room/q"],
            Waiting::Reload { path: "app/a/room/q".into(), version: 3, partition: 0 }
        );
        assert_eq!(pending.bytes(), small + 2 * "app/a/room/q".len() + 320, "a write and a path-only room");
        let mut unbounded = Pending::new(Bounds { backlog_bytes: 0, reloadable: false, ..BOUNDS });
        unbounded.absorb(Waiting::Write(write(1, &[1])), Place::Back);
        assert!(matches!(&unbounded.rooms["app/a/room/r"], Waiting::Write(_)), "without a store, states are kept");
    }

    #[test]
    fn a_batch_stops_once_it_weighs_its_byte_cap_but_takes_one_room_at_least() {
        let mut pending = Pending::new(Bounds {
            changes_per_room: 100,
            change_bytes_per_room: 1 << 20,
            backlog_bytes: 1 << 30,
            reloadable: false,
        });
        for version in 1..=4 {
            let mut write = write(version, &[version]);
            write.path = format!("app/a/room/r{version}");
            pending.absorb(Waiting::Write(write), Place::Back);
        }
        let one = Waiting::Write(write(1, &[1])).bytes();
        let now = Instant::now();
        assert_eq!(pending.take(10, 1, now).len(), 1, "one room even past the cap");
        assert_eq!(pending.take(10, 2 * one, now).len(), 2);
        assert_eq!(pending.take(10, usize::MAX, now).len(), 1);
    }
}
