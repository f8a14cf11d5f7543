//! The `recording` module: whether the room is being recorded, by whom and
//! since when. A start may carry a lease: unless kept alive, the recording
//! stops by itself one TTL after the last keep-alive (`heartbeat_lost`).

use serde::{Deserialize, Serialize};

use super::{Limits, Module, RejectKind, Rejection, TimerOp};
use crate::proto::omni::{Lease, Timer};
use crate::proto::tecate::room_event::Kind;
use crate::proto::tecate::RoomEvent;
use crate::proto::{rfc3339, timestamp_from_millis};

/// A room's recording state. After a stop it keeps the last recording's id,
/// when it stopped and why, so a late joiner can show "recording ended".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingState {
    pub active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

pub struct Recording;

/// The name of a recording's lease timer.
pub const LEASE_TIMER: &str = "lease";

/// The stop reason of a recording whose lease expired.
pub const HEARTBEAT_LOST: &str = "heartbeat_lost";

impl Recording {
    /// Whether a stop concerns the recording of `state`.
    fn stops(state: &RecordingState, stop_id: &str) -> bool {
        state.active && (stop_id.is_empty() || state.recording_id.as_deref() == Some(stop_id))
    }
}

impl Module for Recording {
    type State = RecordingState;

    fn name(&self) -> &'static str {
        "recording"
    }

    fn reacts_to(&self, event: &RoomEvent) -> bool {
        matches!(event.kind, Some(Kind::RecordingStarted(_) | Kind::RecordingStopped(_)))
    }

    fn fold(
        &self,
        state: &RecordingState,
        event: &RoomEvent,
        _limits: &Limits,
    ) -> Result<Option<RecordingState>, Rejection> {
        match &event.kind {
            Some(Kind::RecordingStarted(start)) => {
                if start.recording_id.is_empty() {
                    return Err(Rejection::new(
                        RejectKind::InvalidEvent,
                        "recording started with an empty recording id",
                    ));
                }
                if state.active && state.recording_id.as_deref() == Some(start.recording_id.as_str()) {
                    return Ok(None);
                }
                // A start while another recording is active replaces it: one change.
                Ok(Some(RecordingState {
                    active: true,
                    recording_id: Some(start.recording_id.clone()),
                    started_by: Some(start.started_by.clone()),
                    started_at: Some(rfc3339(event.occurred_at.as_ref())),
                    stopped_at: None,
                    reason: None,
                }))
            }
            Some(Kind::RecordingStopped(stop)) => {
                if !Recording::stops(state, &stop.recording_id) {
                    return Ok(None);
                }
                Ok(Some(RecordingState {
                    active: false,
                    stopped_at: Some(rfc3339(event.occurred_at.as_ref())),
                    reason: Some(stop.reason.clone()),
                    ..state.clone()
                }))
            }
            _ => Ok(None),
        }
    }

    /// A start sets its lease, or cancels the one before when it carries
    /// none; a stop of the recording cancels its lease.
    fn timers(&self, state: &RecordingState, event: &RoomEvent, lease: Option<&Lease>) -> Vec<TimerOp> {
        match (&event.kind, lease) {
            (Some(Kind::RecordingStarted(start)), Some(lease)) if !start.recording_id.is_empty() => {
                vec![TimerOp::lease(LEASE_TIMER, lease, start.recording_id.clone())]
            }
            (Some(Kind::RecordingStarted(_)), _) => vec![TimerOp::cancel(LEASE_TIMER)],
            (Some(Kind::RecordingStopped(stop)), _) if Recording::stops(state, &stop.recording_id) => {
                vec![TimerOp::cancel(LEASE_TIMER)]
            }
            _ => Vec::new(),
        }
    }

    /// An expired lease stops the recording it was taken for, if still active.
    fn on_timer(&self, state: &RecordingState, timer: &Timer) -> Option<RecordingState> {
        let leased = state.recording_id.as_deref() == Some(timer.payload.as_str());
        if timer.name != LEASE_TIMER || !state.active || !leased {
            return None;
        }
        Some(RecordingState {
            active: false,
            stopped_at: Some(rfc3339(Some(&timestamp_from_millis(timer.deadline_ms)))),
            reason: Some(HEARTBEAT_LOST.to_owned()),
            ..state.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::room::test_events::*;

    fn fold(state: &RecordingState, event: &RoomEvent) -> Option<RecordingState> {
        Recording.fold(state, event, &Limits::default()).unwrap()
    }

    #[test]
    fn start_when_inactive_activates_with_who_and_when() {
        let next = fold(&RecordingState::default(), &start("r1", "u7")).unwrap();
        assert_eq!(
            serde_json::to_string(&next).unwrap(),
            r#"{"active":true,"recording_id":"r1","started_by":"u7","started_at":"2026-11-27T10:00:00Z"}"#
        );
    }

    #[test]
    fn start_of_the_active_recording_is_a_no_op() {
        let active = fold(&RecordingState::default(), &start("r1", "u7")).unwrap();
        assert_eq!(fold(&active, &start("r1", "u7")), None);
        assert_eq!(fold(&active, &start("r1", "someone-else")), None);
    }

    #[test]
    fn start_of_another_recording_replaces_the_active_one() {
        let active = fold(&RecordingState::default(), &start("r1", "u7")).unwrap();
        let next = fold(&active, &start("r2", "u8")).unwrap();
        assert!(next.active);
        assert_eq!(next.recording_id.as_deref(), Some("r2"));
        assert_eq!(next.started_by.as_deref(), Some("u8"));
    }

    #[test]
    fn stop_of_the_active_or_an_empty_id_deactivates_and_keeps_history() {
        let active = fold(&RecordingState::default(), &start("r1", "u7")).unwrap();
        for id in ["r1", ""] {
            let next = fold(&active, &stop(id, "done")).unwrap();
            assert!(!next.active);
            assert_eq!(next.recording_id.as_deref(), Some("r1"));
            assert_eq!(next.reason.as_deref(), Some("done"));
            assert_eq!(next.stopped_at.as_deref(), Some("2026-11-27T10:00:00Z"));
        }
    }

    #[test]
    fn stop_when_inactive_or_of_another_id_is_a_no_op() {
        assert_eq!(fold(&RecordingState::default(), &stop("r1", "x")), None);
        let active = fold(&RecordingState::default(), &start("r1", "u7")).unwrap();
        assert_eq!(fold(&active, &stop("r2", "x")), None);
        let stopped = fold(&active, &stop("r1", "x")).unwrap();
        assert_eq!(fold(&stopped, &stop("r1", "again")), None);
    }

    #[test]
    fn start_with_an_empty_id_is_rejected() {
        let err = Recording.fold(&RecordingState::default(), &start("", "u"), &Limits::default()).unwrap_err();
        assert_eq!(err.kind, RejectKind::InvalidEvent);
    }

    fn lease(id: &str) -> Lease {
        Lease { lease_id: id.into(), ttl_ms: 3000 }
    }

    fn lease_timer(recording: &str, deadline_ms: i64) -> Timer {
        Timer {
            module: "recording".into(),
            name: LEASE_TIMER.into(),
            deadline_ms,
            ttl_ms: 3000,
            lease_id: "l1".into(),
            payload: recording.into(),
        }
    }

    #[test]
    fn a_leased_start_sets_its_lease_and_a_stop_or_a_plain_start_cancels_it() {
        let idle = RecordingState::default();
        let ops = Recording.timers(&idle, &start("r1", "u7"), Some(&lease("l1")));
        assert_eq!(ops, vec![TimerOp::lease(LEASE_TIMER, &lease("l1"), "r1")]);
        let active = fold(&idle, &start("r1", "u7")).unwrap();
        assert_eq!(Recording.timers(&active, &start("r2", "u7"), None), vec![TimerOp::cancel(LEASE_TIMER)]);
        assert_eq!(Recording.timers(&active, &stop("r1", "done"), None), vec![TimerOp::cancel(LEASE_TIMER)]);
        assert_eq!(Recording.timers(&active, &stop("", "done"), None), vec![TimerOp::cancel(LEASE_TIMER)]);
        assert!(Recording.timers(&active, &stop("r9", "done"), None).is_empty(), "another recording's stop");
        assert!(Recording.timers(&active, &tag_set("k", "v"), None).is_empty());
    }

    #[test]
    fn an_expired_lease_stops_its_recording_with_heartbeat_lost() {
        let active = fold(&RecordingState::default(), &start("r1", "u7")).unwrap();
        let stopped = Recording.on_timer(&active, &lease_timer("r1", 1_795_773_605_000)).unwrap();
        assert!(!stopped.active);
        assert_eq!(stopped.reason.as_deref(), Some(HEARTBEAT_LOST));
        assert_eq!(stopped.stopped_at.as_deref(), Some("2026-11-27T10:00:05Z"));
        assert_eq!(stopped.recording_id.as_deref(), Some("r1"));
        assert_eq!(Recording.on_timer(&active, &lease_timer("r0", 0)), None, "a lease of an earlier recording");
        assert_eq!(Recording.on_timer(&stopped, &lease_timer("r1", 0)), None, "already stopped");
    }

    #[test]
    fn other_events_are_no_ops() {
        assert_eq!(fold(&RecordingState::default(), &tag_set("k", "v")), None);
    }
}
