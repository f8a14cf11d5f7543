//! Module timers: a module's fold may set or cancel a timer for its room (a
//! deadline and a small payload), and when the deadline passes the runtime
//! calls the module's timer fold, inside the open transaction, whose change
//! is emitted like any other. Timers are data in the room's state
//! ([`Timer`]), so they follow the room through the changelog; this file
//! only applies what a fold asked for to that data, as a pure function.
//!
//! A timer with a lease id is a lease: keep-alives naming the id push its
//! deadline back by its TTL, in memory only (no changelog record), which
//! is why the runtime re-arms a restored lease at restore time + TTL.

use super::{RejectKind, Rejection};
use crate::proto::omni::{Lease, Timer};

/// Most bytes a timer's name, lease id and payload take together: timers
/// ride along in every changelog record of their room.
pub const MAX_TIMER_BYTES: usize = 1024;

/// Most timers one room holds, all modules together: with
/// [`MAX_TIMER_BYTES`] each, they stay well within the changelog record's
/// headroom over `max_room_state_bytes`.
pub const MAX_TIMERS_PER_ROOM: usize = 8;

/// Longest lease id, in bytes.
pub const MAX_LEASE_ID_BYTES: usize = 128;

/// Shortest timer delay or lease TTL, in milliseconds.
pub const MIN_TTL_MS: i64 = 100;

/// Longest timer delay or lease TTL, in milliseconds (seven days).
pub const MAX_TTL_MS: i64 = 7 * 24 * 3600 * 1000;

/// What a fold asks of its module's timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerOp {
    /// Sets the module's timer `name`, replacing one of that name.
    Set(TimerSpec),
    /// Cancels the module's timer `name`, if set.
    Cancel { name: String },
}

/// A timer to set, due `after_ms` from when its event is processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerSpec {
    pub name: String,
    pub after_ms: i64,
    /// Non-empty makes it a lease that keep-alives naming this id renew.
    pub lease_id: String,
    pub payload: String,
}

impl TimerOp {
    /// A lease: the timer `name`, due one TTL from now, renewed by keep-alives of `lease`.
    pub fn lease(name: &str, lease: &Lease, payload: impl Into<String>) -> TimerOp {
        TimerOp::Set(TimerSpec {
            name: name.to_owned(),
            after_ms: lease.ttl_ms,
            lease_id: lease.lease_id.clone(),
            payload: payload.into(),
        })
    }

    pub fn cancel(name: &str) -> TimerOp {
        TimerOp::Cancel { name: name.to_owned() }
    }
}

/// Checks a lease an input record carries.
pub fn check_lease(lease: &Lease) -> Result<(), Rejection> {
    check_lease_id(&lease.lease_id)?;
    check_ttl(lease.ttl_ms)
}

/// Checks a lease id, as a lease or a keep-alive names it.
pub fn check_lease_id(lease_id: &str) -> Result<(), Rejection> {
    if lease_id.is_empty() || lease_id.len() > MAX_LEASE_ID_BYTES {
        return Err(Rejection::new(
            RejectKind::InvalidEvent,
            format!("a lease id must be 1 to {MAX_LEASE_ID_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn check_ttl(ttl_ms: i64) -> Result<(), Rejection> {
    if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl_ms) {
        return Err(Rejection::new(
            RejectKind::InvalidEvent,
            format!("a timer's delay must be {MIN_TTL_MS} ms to {MAX_TTL_MS} ms, not {ttl_ms} ms"),
        ));
    }
    Ok(())
}

/// Applies `module`'s ops to a room's timers at `now_ms`; returns whether
/// the timers changed. On an error they may be half changed: the caller
/// applies them to a copy.
pub(crate) fn apply(timers: &mut Vec<Timer>, module: &str, ops: &[TimerOp], now_ms: i64) -> Result<bool, Rejection> {
    for op in ops {
        if let TimerOp::Set(spec) = op {
            check_ttl(spec.after_ms)?;
            if spec.name.len() + spec.lease_id.len() + spec.payload.len() > MAX_TIMER_BYTES {
                return Err(Rejection::new(
                    RejectKind::OverLimit,
                    format!("module {module}'s timer {:?} is over {MAX_TIMER_BYTES} bytes", spec.name),
                ));
            }
        }
    }
    let mut changed = false;
    for op in ops {
        let name = match op {
            TimerOp::Set(spec) => &spec.name,
            TimerOp::Cancel { name } => name,
        };
        let before = timers.len();
        timers.retain(|t| t.module != module || t.name != *name);
        changed |= timers.len() != before;
        if let TimerOp::Set(spec) = op {
            timers.push(Timer {
                module: module.to_owned(),
                name: spec.name.clone(),
                deadline_ms: now_ms + spec.after_ms,
                ttl_ms: spec.after_ms,
                lease_id: spec.lease_id.clone(),
                payload: spec.payload.clone(),
            });
            changed = true;
        }
    }
    if timers.len() > MAX_TIMERS_PER_ROOM {
        return Err(Rejection::new(
            RejectKind::OverLimit,
            format!("a room holds at most {MAX_TIMERS_PER_ROOM} timers; module {module} would set more"),
        ));
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str, ttl_ms: i64) -> Lease {
        Lease { lease_id: id.into(), ttl_ms }
    }

    #[test]
    fn a_set_replaces_the_timer_of_its_name_and_a_cancel_removes_it() {
        let mut timers = Vec::new();
        assert!(apply(&mut timers, "m", &[TimerOp::lease("lease", &lease("l1", 1000), "r1")], 5_000).unwrap());
        assert_eq!(timers.len(), 1);
        assert_eq!((timers[0].deadline_ms, timers[0].ttl_ms, timers[0].lease_id.as_str()), (6_000, 1000, "l1"));
        assert!(apply(&mut timers, "m", &[TimerOp::lease("lease", &lease("l2", 2000), "r2")], 7_000).unwrap());
        assert_eq!(timers.len(), 1);
        assert_eq!((timers[0].deadline_ms, timers[0].lease_id.as_str()), (9_000, "l2"));
        assert!(!apply(&mut timers, "other", &[TimerOp::cancel("lease")], 7_000).unwrap(), "another module's name");
        assert!(apply(&mut timers, "m", &[TimerOp::cancel("lease")], 7_000).unwrap());
        assert!(timers.is_empty());
        assert!(!apply(&mut timers, "m", &[TimerOp::cancel("lease")], 7_000).unwrap(), "nothing to cancel");
    }

    mod folded {
        use super::lease;
        use crate::modules::room::test_events::*;
        use crate::modules::{Limits, LiveRoom, Registry, RoomFolder, HEARTBEAT_LOST, LEASE_TIMER};
        use crate::proto::omni::RoomState;

        fn folder() -> RoomFolder {
            let names = ["recording".to_owned(), "tags".to_owned()];
            RoomFolder::new(Registry::with_builtins().select(&names).unwrap(), Limits::default())
        }

        fn leased(f: &RoomFolder) -> LiveRoom {
            let mut room = LiveRoom::new(RoomState::default());
            let outcome = f.fold_live(&mut room, &start("r1", "u1"), Some(&lease("l1", 3000)), 1_000).unwrap();
            assert!(outcome.timers_changed && outcome.changes.len() == 1);
            room
        }

        #[test]
        fn a_due_lease_folds_into_one_change_one_version_up_and_is_gone() {
            let f = folder();
            let mut room = leased(&f);
            assert_eq!(room.state().timers[0].deadline_ms, 4_000);
            let fired = f.fire(&mut room, "recording", LEASE_TIMER, 4_500).unwrap().unwrap();
            assert_eq!((fired.timer.lease_id.as_str(), fired.timer.deadline_ms), ("l1", 4_500));
            let change = fired.change.unwrap();
            assert_eq!((change.version, change.module), (2, "recording"));
            assert!(change.state_json.contains(HEARTBEAT_LOST));
            assert_eq!(room.state().version, 2);
            assert!(room.state().timers.is_empty());
            assert_eq!(f.fire(&mut room, "recording", LEASE_TIMER, 5_000).unwrap(), None, "fires once");
        }

        #[test]
        fn a_lease_whose_recording_already_stopped_fires_as_a_no_op() {
            let f = folder();
            let mut room = leased(&f);
            // A keep-alive is not an event: only a stop cancels. Here the timer is left to test the fold.
            room = LiveRoom::new(RoomState { timers: room.state().timers.clone(), ..RoomState::default() });
            let fired = f.fire(&mut room, "recording", LEASE_TIMER, 4_000).unwrap().unwrap();
            assert_eq!(fired.change, None);
            assert!(room.state().timers.is_empty() && room.state().version == 0);
        }

        #[test]
        fn a_stop_and_a_close_cancel_the_lease_and_a_rejected_event_keeps_it() {
            let f = folder();
            let mut room = leased(&f);
            let outcome = f.fold_live(&mut room, &stop("", "done"), None, 2_000).unwrap();
            assert!(outcome.timers_changed && room.state().timers.is_empty());
            let mut room = leased(&f);
            let outcome = f.fold_live(&mut room, &close(), None, 2_000).unwrap();
            assert!(outcome.closed && outcome.timers_changed && room.state().timers.is_empty());
            let mut room = leased(&f);
            assert!(f.fold_live(&mut room, &start("", "u"), Some(&lease("l2", 3000)), 2_000).is_err());
            assert_eq!(room.state().timers[0].lease_id, "l1", "the refused start set no lease");
            let outcome = f.fold_live(&mut room, &tag_set("k", "v"), None, 2_000).unwrap();
            assert!(!outcome.timers_changed, "other events leave the lease alone");
        }
    }

    #[test]
    fn bad_timers_and_leases_are_refused_whole() {
        let mut timers = Vec::new();
        let ops = [TimerOp::lease("a", &lease("l1", 1000), ""), TimerOp::lease("b", &lease("l2", 10), "")];
        assert_eq!(apply(&mut timers, "m", &ops, 0).unwrap_err().kind, RejectKind::InvalidEvent);
        assert!(timers.is_empty(), "the first op is not applied either");
        let big = TimerOp::lease("a", &lease("l", 1000), "x".repeat(MAX_TIMER_BYTES));
        assert_eq!(apply(&mut timers, "m", &[big], 0).unwrap_err().kind, RejectKind::OverLimit);
        let many: Vec<TimerOp> =
            (0..=MAX_TIMERS_PER_ROOM).map(|i| TimerOp::lease(&format!("t{i}"), &lease("l", 1000), "")).collect();
        assert_eq!(apply(&mut timers, "m", &many, 0).unwrap_err().kind, RejectKind::OverLimit);
        assert!(check_lease(&lease("l", 1000)).is_ok());
        assert!(check_lease(&lease("", 1000)).is_err());
        assert!(check_lease(&lease("l", 0)).is_err());
        assert!(check_lease(&lease(&"l".repeat(MAX_LEASE_ID_BYTES + 1), 1000)).is_err());
    }
}
