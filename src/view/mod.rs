//! The Redis view of room state: the one place that knows the Redis key
//! layout, for writing (the runtime's [`writer`]) and reading (snapshots,
//! change streams, late joiners).
//!
//! Layout, for a room with canonical path `P` and key prefix `omni`:
//! - `omni:room:{P}`: a hash with `version`, `updated_at`, and one field per
//!   module holding that module's state as JSON. Deleted when the room closes.
//! - `omni:room:{P}:changes`: a stream with one entry per room write, id
//!   `<newest version in it>-0`, whose `changes` field is a JSON array of
//!   that write's changes, oldest first. Trimmed by id to the entries holding the last
//!   `stream_max_len` versions. It outlives a close, so it also remembers a
//!   closed room's last version.
//!
//! The braces make both keys of a room hash to one Redis Cluster slot, so a
//! room's compare-and-set runs on one master whatever the cluster's shape.

mod connection;
mod read;
mod writer;

pub use connection::{key_slot, tag_for_slot, RedisTarget, ViewConnection};
pub use read::{changes_after, room_paths, snapshot, snapshot_text, ChangeRecord, RoomSnapshot, RoomSnapshotText};
pub use writer::{
    spawn_writer, ChangeEntry, RedisTrouble, RedisWriter, RoomWrite, StoredRooms, WriterOptions, WriterStatus,
};

/// Errors talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis holds a malformed entry for {key}: {reason}")]
    Malformed { key: String, reason: String },
}

/// The key layout under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    prefix: String,
}

impl Default for KeyLayout {
    fn default() -> Self {
        KeyLayout::new("omni")
    }
}

impl KeyLayout {
    pub fn new(prefix: &str) -> KeyLayout {
        KeyLayout { prefix: prefix.to_owned() }
    }

    /// The room hash key.
    pub fn room(&self, path: &str) -> String {
        format!("{}:room:{{{path}}}", self.prefix)
    }

    /// The room change stream key.
    pub fn changes(&self, path: &str) -> String {
        format!("{}:room:{{{path}}}:changes", self.prefix)
    }

    /// The key of a writer's marker, which tells it when Redis lost data.
    pub fn writer_marker(&self, writer: &str) -> String {
        format!("{}:writer:{writer}", self.prefix)
    }

    /// The key of a writer's marker on a Redis Cluster, in hash slot `slot`
    /// (one per master: see the writer).
    pub fn writer_marker_in_slot(&self, writer: &str, slot: u16) -> String {
        format!("{}:writer:{writer}:{{{}}}", self.prefix, connection::tag_for_slot(slot))
    }

    /// The path inside a room hash key, or `None` for other keys.
    pub fn path_of(&self, key: &str) -> Option<String> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":room:{")?;
        rest.strip_suffix('}').map(str::to_owned)
    }

    /// A SCAN pattern matching every room hash (and, harmlessly, change streams, which `path_of` drops).
    pub fn scan_pattern(&self) -> String {
        format!("{}:room:{{*}}", self.prefix)
    }
}

/// Hash fields that are not module states.
pub const VERSION_FIELD: &str = "version";
pub const UPDATED_AT_FIELD: &str = "updated_at";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_a_room_in_one_cluster_slot() {
        let keys = KeyLayout::default();
        assert_eq!(keys.room("app/a/room/r"), "omni:room:{app/a/room/r}");
        assert_eq!(keys.changes("app/a/room/r"), "omni:room:{app/a/room/r}:changes");
        assert_eq!(keys.path_of("omni:room:{app/a/room/r}").as_deref(), Some("app/a/room/r"));
        assert_eq!(keys.path_of("omni:room:{app/a/room/r}:changes"), None);
        assert_eq!(KeyLayout::new("x").room("p"), "x:room:{p}");
    }
}
