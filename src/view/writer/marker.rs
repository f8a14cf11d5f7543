//! The writer's markers, how it tells that Redis lost data: keys only this
//! writer writes, advanced by a script after every flush's room writes.
//! Redis and its persistence keep a prefix of what they ran, so a marker that
//! still holds the last value vouches for every write before it; one that
//! holds an older value (or none, once set) means Redis lost data.
//!
//! One server needs one marker. A Redis Cluster needs one per master, since
//! each master can lose data on its own (see [`super::slots`]): the markers
//! are placed in each master's first slot, and placed again at every check.

use std::time::{Duration, Instant};

use crate::view::KeyLayout;

/// How long a marker outlives its writer.
const MARKER_TTL_SECS: u64 = 24 * 3600;

/// How often an idle writer checks that Redis still holds its markers.
pub(super) const MARKER_CHECK: Duration = Duration::from_secs(1);

/// One marker: a key only this writer writes, advanced on every flush.
struct Marker {
    key: String,
    next: u64,
    /// The values Redis may hold if it kept its data: the last one
    /// confirmed, and any sent since whose reply was lost.
    accepted: Vec<String>,
}

impl Marker {
    fn new(key: String) -> Marker {
        Marker { key, next: 1, accepted: Vec::new() }
    }

    fn command(&mut self, script: &redis::Script) -> (redis::Cmd, String) {
        let value = self.next.to_string();
        self.next += 1;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(1).arg(&self.key).arg(&value).arg(MARKER_TTL_SECS);
        for accepted in &self.accepted {
            cmd.arg(accepted);
        }
        (cmd, value)
    }

    /// Takes the marker's reply; true when it shows that Redis lost data.
    fn answered(&mut self, value: String, held: bool) -> bool {
        let judged = !self.accepted.is_empty();
        self.accepted = vec![value];
        judged && !held
    }

    /// The reply was lost: Redis may hold the value sent or the one before.
    fn unanswered(&mut self, value: String) {
        if self.accepted.len() < 16 {
            self.accepted.push(value);
        }
    }
}

/// What the markers' replies showed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Verdict {
    /// A marker no longer holds what it should: Redis lost data.
    pub lost: bool,
    /// A marker's script was not loaded, so it did not run.
    pub missing_script: bool,
}

/// The writer's markers: one, or one per master of a Redis Cluster.
pub(super) struct Markers {
    keys: KeyLayout,
    /// Names this writer's markers.
    writer_id: String,
    markers: Vec<Marker>,
    /// Whether the markers go one per master (placed once the masters are known).
    cluster: bool,
    /// When the markers were last advanced (and, on a cluster, placed).
    pub(super) checked: Instant,
}

impl Markers {
    pub(super) fn new(keys: &KeyLayout, cluster: bool) -> Markers {
        let writer_id = uuid::Uuid::new_v4().simple().to_string();
        let markers = if cluster { Vec::new() } else { vec![Marker::new(keys.writer_marker(&writer_id))] };
        Markers { keys: keys.clone(), writer_id, markers, cluster, checked: Instant::now() }
    }

    /// Whether the next flush should place the cluster's markers afresh.
    pub(super) fn placement_due(&self) -> bool {
        self.cluster && (self.markers.is_empty() || self.checked.elapsed() >= MARKER_CHECK)
    }

    /// Places one marker in each of `slots` (each master's first): markers
    /// that stay in their slot are kept (a replica that took over must still
    /// hold its master's marker), others start afresh.
    pub(super) fn place(&mut self, slots: Vec<u16>) {
        let mut kept = Vec::with_capacity(slots.len());
        for slot in slots {
            let key = self.keys.writer_marker_in_slot(&self.writer_id, slot);
            let at = self.markers.iter().position(|m| m.key == key);
            kept.push(at.map_or_else(|| Marker::new(key), |at| self.markers.swap_remove(at)));
        }
        self.markers = kept;
    }

    /// The commands advancing every marker, and the values they set.
    pub(super) fn commands(&mut self, script: &redis::Script) -> (Vec<redis::Cmd>, Vec<String>) {
        self.checked = Instant::now();
        self.markers.iter_mut().map(|marker| marker.command(script)).unzip()
    }

    /// Takes the markers' replies, in the order of [`commands`](Markers::commands).
    pub(super) fn answered(&mut self, values: Vec<String>, replies: Vec<redis::RedisResult<redis::Value>>) -> Verdict {
        let mut verdict = Verdict::default();
        for ((marker, value), reply) in self.markers.iter_mut().zip(values).zip(replies) {
            match reply {
                Ok(reply) => verdict.lost |= marker.answered(value, matches!(reply, redis::Value::Int(1))),
                // Not run at all: Redis holds what it held before.
                Err(e) if super::flush::is_no_script(&e) => verdict.missing_script = true,
                Err(_) => marker.unanswered(value),
            }
        }
        verdict
    }

    /// The flush failed as a whole: Redis may hold the values sent or the ones before.
    pub(super) fn unanswered(&mut self, values: Vec<String>) {
        for (marker, value) in self.markers.iter_mut().zip(values) {
            marker.unanswered(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_judges_only_once_it_knows_what_redis_should_hold() {
        let mut marker = Marker::new(KeyLayout::default().writer_marker("w"));
        assert!(!marker.answered("1".into(), false), "the first answer sets the marker");
        assert!(!marker.answered("2".into(), true));
        marker.unanswered("3".into());
        assert_eq!(marker.accepted, vec!["2".to_owned(), "3".to_owned()], "a lost reply leaves both possible");
        assert!(marker.answered("4".into(), false), "a marker Redis no longer holds is a loss");
        assert!(marker.key.starts_with("omni:writer:"));
    }

    #[test]
    fn cluster_markers_stay_in_their_slot_and_follow_new_masters() {
        let mut markers = Markers::new(&KeyLayout::default(), true);
        assert!(markers.placement_due(), "a cluster's markers wait for its masters");
        assert!(markers.commands(&redis::Script::new("return 1")).0.is_empty());
        markers.place(vec![0, 5461, 10923]);
        let (_, values) = markers.commands(&redis::Script::new("return 1"));
        let verdict = markers.answered(values, vec![Ok(redis::Value::Int(1)); 3]);
        assert_eq!(verdict, Verdict::default());
        markers.place(vec![0, 5461, 12000]);
        assert_eq!(markers.markers.len(), 3);
        assert_eq!(markers.markers[0].accepted, vec!["1".to_owned()], "a marker in a slot it had is kept");
        assert!(markers.markers[2].accepted.is_empty(), "a marker in a new slot starts afresh");
        let (_, values) = markers.commands(&redis::Script::new("return 1"));
        let verdict = markers
            .answered(values, vec![Ok(redis::Value::Int(0)), Ok(redis::Value::Int(1)), Ok(redis::Value::Int(0))]);
        assert!(verdict.lost, "the master that no longer holds its marker lost data");
        assert!(!Markers::new(&KeyLayout::default(), false).placement_due());
    }
}
