//! The `recording` module: whether the room is being recorded, by whom and since when.

use serde::{Deserialize, Serialize};

use super::{Limits, Module, RejectKind, Rejection};
use crate::proto::rfc3339;
use crate::proto::tecate::room_event::Kind;
use crate::proto::tecate::RoomEvent;

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
                let matches =
                    stop.recording_id.is_empty() || state.recording_id.as_deref() == Some(stop.recording_id.as_str());
                if !state.active || !matches {
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

    #[test]
    fn other_events_are_no_ops() {
        assert_eq!(fold(&RecordingState::default(), &tag_set("k", "v")), None);
    }
}
