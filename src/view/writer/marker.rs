//! The writer's marker, how it tells that Redis lost data: a key only this
//! writer writes, advanced by a script at the end of every pipeline. Redis
//! and its persistence keep a prefix of what they ran, so a marker that
//! still holds the last value vouches for every write before it; one that
//! holds an older value (or none, once set) means Redis lost data.

use std::time::Instant;

use crate::view::KeyLayout;

/// How long the marker outlives its writer.
const MARKER_TTL_SECS: u64 = 24 * 3600;

/// The writer's marker: a key only it writes, advanced on every flush.
pub(super) struct Marker {
    key: String,
    next: u64,
    /// The values Redis may hold if it kept its data: the last one
    /// confirmed, and any sent since whose reply was lost.
    accepted: Vec<String>,
    pub(super) checked: Instant,
}

impl Marker {
    pub(super) fn new(keys: &KeyLayout) -> Marker {
        let key = keys.writer_marker(&uuid::Uuid::new_v4().simple().to_string());
        Marker { key, next: 1, accepted: Vec::new(), checked: Instant::now() }
    }

    pub(super) fn command(&mut self, script: &redis::Script) -> (redis::Cmd, String) {
        let value = self.next.to_string();
        self.next += 1;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(1).arg(&self.key).arg(&value).arg(MARKER_TTL_SECS);
        for accepted in &self.accepted {
            cmd.arg(accepted);
        }
        self.checked = Instant::now();
        (cmd, value)
    }

    /// Takes the marker's reply; true when it shows that Redis lost data.
    pub(super) fn answered(&mut self, value: String, held: bool) -> bool {
        let judged = !self.accepted.is_empty();
        self.accepted = vec![value];
        judged && !held
    }

    /// The reply was lost: Redis may hold the value sent or the one before.
    pub(super) fn unanswered(&mut self, value: String) {
        if self.accepted.len() < 16 {
            self.accepted.push(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_judges_only_once_it_knows_what_redis_should_hold() {
        let mut marker = Marker::new(&KeyLayout::default());
        assert!(!marker.answered("1".into(), false), "the first answer sets the marker");
        assert!(!marker.answered("2".into(), true));
        marker.unanswered("3".into());
        assert_eq!(marker.accepted, vec!["2".to_owned(), "3".to_owned()], "a lost reply leaves both possible");
        assert!(marker.answered("4".into(), false), "a marker Redis no longer holds is a loss");
        assert!(marker.key.starts_with("omni:writer:"));
    }
}
