//! Reading room state back from Redis: snapshots, the changes after a
//! version, and the rooms that exist. Used by `omni snapshot`, `omni watch`
//! and late joiners; any client in any language can do the same with the
//! layout documented in the README.

use std::collections::BTreeMap;

use redis::aio::ConnectionLike;
use redis::AsyncCommands;

use super::{KeyLayout, ViewConnection, ViewError, UPDATED_AT_FIELD, VERSION_FIELD};

/// A room's state as Redis holds it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RoomSnapshot {
    pub path: String,
    pub version: u64,
    /// Module name → state.
    #[serde(flatten)]
    pub modules: BTreeMap<String, serde_json::Value>,
    pub updated_at: String,
}

/// One change of a room's change stream. Stored without its path, which is
/// in the stream's key.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChangeRecord {
    #[serde(skip_deserializing)]
    pub path: String,
    pub version: u64,
    pub module: String,
    pub state: serde_json::Value,
    pub cause_event_id: String,
    pub occurred_at: String,
    pub processed_at: String,
}

fn malformed(key: &str, reason: impl Into<String>) -> ViewError {
    ViewError::Malformed { key: key.to_owned(), reason: reason.into() }
}

/// A room's state as Redis holds it, each module's state left as the JSON
/// text the writer stored: for callers that pass the text on (the Omni
/// service's `GetSnapshot`), so it is not parsed into values and printed again.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomSnapshotText {
    pub path: String,
    pub version: u64,
    /// Module name → state as JSON text (checked to be JSON).
    pub modules: BTreeMap<String, String>,
    pub updated_at: String,
}

/// The room's snapshot with module states as text, or `None` if Redis holds
/// no hash for it: one `HGETALL`. Each state is checked to be JSON without
/// building it (no allocation), so a malformed entry is still reported.
pub async fn snapshot_text<C: ConnectionLike + Send + Sync>(
    conn: &mut C,
    keys: &KeyLayout,
    path: &str,
) -> Result<Option<RoomSnapshotText>, ViewError> {
    let Some((key, snapshot)) = read_room_hash(conn, keys, path).await? else { return Ok(None) };
    for (field, text) in &snapshot.modules {
        serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| malformed_state(&key, field, e))?;
    }
    Ok(Some(snapshot))
}

/// The room's snapshot, or `None` if Redis holds no hash for it.
pub async fn snapshot<C: ConnectionLike + Send + Sync>(
    conn: &mut C,
    keys: &KeyLayout,
    path: &str,
) -> Result<Option<RoomSnapshot>, ViewError> {
    let Some((key, text)) = read_room_hash(conn, keys, path).await? else { return Ok(None) };
    let mut modules = BTreeMap::new();
    for (field, state) in text.modules {
        let state = serde_json::from_str(&state).map_err(|e| malformed_state(&key, &field, e))?;
        modules.insert(field, state);
    }
    Ok(Some(RoomSnapshot { path: text.path, version: text.version, modules, updated_at: text.updated_at }))
}

fn malformed_state(key: &str, field: &str, error: serde_json::Error) -> ViewError {
    malformed(key, format!("field {field}: {error}"))
}

/// The room hash's fields, its version parsed and module states unchecked, with the hash's key.
async fn read_room_hash<C: ConnectionLike + Send + Sync>(
    conn: &mut C,
    keys: &KeyLayout,
    path: &str,
) -> Result<Option<(String, RoomSnapshotText)>, ViewError> {
    let key = keys.room(path);
    let mut modules: BTreeMap<String, String> = conn.hgetall(&key).await?;
    if modules.is_empty() {
        return Ok(None);
    }
    let version = match modules.remove(VERSION_FIELD) {
        Some(value) => value.parse().map_err(|_| malformed(&key, format!("version {value:?}")))?,
        None => 0,
    };
    let updated_at = modules.remove(UPDATED_AT_FIELD).unwrap_or_default();
    Ok(Some((key, RoomSnapshotText { path: path.to_owned(), version, modules, updated_at })))
}

/// The changes with a version above `after`, oldest first, as far as the
/// trimmed stream still holds them. The caller checks the first version for a gap.
pub async fn changes_after<C: ConnectionLike + Send + Sync>(
    conn: &mut C,
    keys: &KeyLayout,
    path: &str,
    after: u64,
) -> Result<Vec<ChangeRecord>, ViewError> {
    let key = keys.changes(path);
    // An entry's id is the newest version in it, so entries from id after+1
    // on hold every newer change (and maybe a few older ones, skipped below).
    let reply: redis::streams::StreamRangeReply = conn.xrange(&key, format!("{}-0", after + 1), "+").await?;
    let mut records: Vec<ChangeRecord> = Vec::new();
    for entry in reply.ids {
        let text: String =
            entry.get("changes").ok_or_else(|| malformed(&key, format!("entry {} has no changes", entry.id)))?;
        let changes: Vec<ChangeRecord> =
            serde_json::from_str(&text).map_err(|e| malformed(&key, format!("entry {}: {e}", entry.id)))?;
        for change in changes {
            if change.version > records.last().map_or(after, |r| r.version) {
                records.push(ChangeRecord { path: path.to_owned(), ..change });
            }
        }
    }
    Ok(records)
}

/// Every room path that has a hash in Redis, found with SCAN (never KEYS),
/// on every master of a cluster.
pub async fn room_paths(conn: &mut ViewConnection, keys: &KeyLayout) -> Result<Vec<String>, ViewError> {
    let found = conn.scan_keys(&keys.scan_pattern()).await?;
    let mut paths: Vec<String> = found.iter().filter_map(|k| keys.path_of(k)).collect();
    paths.sort();
    paths.dedup();
    Ok(paths)
}
