//! What the writer writes: a room's committed state and the change
//! entries its stream has not seen yet, and how two writes of one room
//! waiting together become one.

use std::borrow::Cow;

use crate::modules::{RoomFolder, ROOM_MODULE};
use crate::proto::omni::RoomState;
use crate::proto::Timestamp;

/// One change, as written to a room's change stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEntry {
    pub version: u64,
    pub module: &'static str,
    pub state_json: String,
    pub cause_event_id: String,
    pub occurred_at: Option<Timestamp>,
    pub processed_at: Option<Timestamp>,
}

/// A room's committed state to publish in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomWrite {
    pub path: String,
    /// The input partition the room belongs to, where the store keeps it.
    pub partition: i32,
    pub version: u64,
    /// A closed room's hash is deleted; its stream stays.
    pub closed: bool,
    /// Module name → state JSON.
    pub modules: Vec<(String, String)>,
    pub updated_at: Option<Timestamp>,
    /// The changes since the previous write, oldest first. Empty for a rewrite from the store.
    pub changes: Vec<ChangeEntry>,
    /// Versions before the first change (every version, when the write
    /// carries none) may be missing: entries dropped past a bound, or a room
    /// rewritten from the store. The stream then gets a marker that sends
    /// readers back to the hash.
    pub truncated: bool,
}

impl RoomWrite {
    /// The Redis view of a committed room state, with the changes since the
    /// room's previous write.
    pub fn from_state(
        folder: &RoomFolder,
        path: &str,
        partition: i32,
        state: &RoomState,
        changes: Vec<ChangeEntry>,
    ) -> RoomWrite {
        RoomWrite {
            path: path.to_owned(),
            partition,
            version: state.version,
            closed: state.closed,
            modules: folder.module_states(state).map(|(name, json)| (name.to_owned(), json)).collect(),
            updated_at: state.updated_at,
            changes,
            truncated: false,
        }
    }

    /// A room rewritten from the store: its state, without the changes that led to it.
    pub fn rewrite(folder: &RoomFolder, path: &str, partition: i32, state: &RoomState) -> RoomWrite {
        RoomWrite { truncated: true, ..RoomWrite::from_state(folder, path, partition, state, Vec::new()) }
    }

    /// The newest version the stream may lack before `stream_changes`, or 0.
    pub(super) fn newest_missing(&self, stream_changes: &[ChangeEntry]) -> u64 {
        match (self.truncated, stream_changes.first()) {
            (false, _) => 0,
            (true, Some(first)) => first.version.saturating_sub(1),
            (true, None) => self.version,
        }
    }

    /// The changes for the room's stream. A closing write always ends with
    /// its close, even one that does not carry it (a reconcile from the
    /// store, or entries dropped past the budget): the stream must end at the
    /// close, or a replay of an older version could bring the room back.
    pub(super) fn stream_changes(&self) -> Cow<'_, [ChangeEntry]> {
        if !self.closed || self.changes.last().is_some_and(|c| c.version == self.version) {
            return Cow::Borrowed(&self.changes);
        }
        let mut changes = self.changes.clone();
        changes.push(ChangeEntry {
            version: self.version,
            module: ROOM_MODULE,
            state_json: "{}".to_owned(),
            cause_event_id: String::new(),
            occurred_at: self.updated_at,
            processed_at: self.updated_at,
        });
        Cow::Owned(changes)
    }

    /// When the event behind the oldest change this write carries occurred;
    /// `None` for a rewrite, which carries none.
    pub(super) fn first_occurred(&self) -> Option<(i64, i32)> {
        self.changes.first().and_then(|c| c.occurred_at.as_ref()).map(|t| (t.seconds, t.nanos))
    }

    /// Folds a newer write for the same room into this one. A hole before
    /// the newer write's changes leaves this one's changes on its far side:
    /// they are dropped, and the hole covers them.
    pub(super) fn absorb(&mut self, newer: RoomWrite) {
        let mut changes = std::mem::take(&mut self.changes);
        let truncated = self.truncated || newer.truncated;
        if newer.truncated {
            changes.clear();
        }
        changes.extend(newer.changes);
        if newer.version >= self.version {
            *self = RoomWrite { changes: Vec::new(), ..newer };
        }
        self.changes = changes;
        self.truncated = truncated;
    }
}

/// A write of room `app/a/room/r` at `version` carrying `changes`, for the writer's tests.
#[cfg(test)]
pub(crate) fn test_write(version: u64, changes: &[u64]) -> RoomWrite {
    RoomWrite {
        path: "app/a/room/r".into(),
        partition: 0,
        version,
        closed: false,
        modules: vec![("tags".into(), format!("{{\"v\":\"{version}\"}}"))],
        updated_at: None,
        changes: changes
            .iter()
            .map(|&v| ChangeEntry {
                version: v,
                module: "tags",
                state_json: "{}".into(),
                cause_event_id: String::new(),
                occurred_at: None,
                processed_at: None,
            })
            .collect(),
        truncated: false,
    }
}

#[cfg(test)]
mod tests {
    use super::test_write as write;
    use super::*;

    fn versions(w: &RoomWrite) -> Vec<u64> {
        w.changes.iter().map(|c| c.version).collect()
    }

    #[test]
    fn a_newer_write_takes_over_the_state_and_appends_its_changes() {
        let mut w = write(2, &[1, 2]);
        w.absorb(write(4, &[3, 4]));
        assert_eq!(w.version, 4);
        assert_eq!(w.modules, write(4, &[]).modules);
        assert_eq!(versions(&w), vec![1, 2, 3, 4]);
        assert!(!w.truncated);
    }

    #[test]
    fn a_hole_before_the_newer_changes_swallows_the_older_ones() {
        let mut w = write(2, &[1, 2]);
        w.absorb(RoomWrite { truncated: true, ..write(6, &[5, 6]) });
        assert_eq!(versions(&w), vec![5, 6]);
        assert!(w.truncated);
        assert_eq!(w.newest_missing(&w.stream_changes()), 4);
        let mut w = RoomWrite { truncated: true, ..write(2, &[2]) };
        w.absorb(write(3, &[3]));
        assert_eq!((versions(&w), w.truncated), (vec![2, 3], true), "an older hole stays in front");
        let rewrite = RoomWrite { truncated: true, ..write(9, &[]) };
        assert_eq!(rewrite.newest_missing(&rewrite.stream_changes()), 9);
        assert_eq!(write(9, &[9]).newest_missing(&write(9, &[9]).changes), 0);
    }

    #[test]
    fn a_closing_write_always_ends_its_stream_changes_with_the_close() {
        let reconcile = RoomWrite { closed: true, ..write(7, &[]) };
        let changes = reconcile.stream_changes();
        assert_eq!(changes.iter().map(|c| (c.version, c.module)).collect::<Vec<_>>(), vec![(7, ROOM_MODULE)]);
        let dropped = RoomWrite { closed: true, ..write(7, &[4, 5]) };
        assert_eq!(dropped.stream_changes().iter().map(|c| c.version).collect::<Vec<_>>(), vec![4, 5, 7]);
        let whole = RoomWrite { closed: true, ..write(7, &[6, 7]) };
        assert!(matches!(whole.stream_changes(), Cow::Borrowed(_)), "a close that carries its change is sent as is");
        assert!(matches!(write(7, &[]).stream_changes(), Cow::Borrowed(c) if c.is_empty()));
    }
}
