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

/// The room's snapshot, or `None` if Redis holds no hash for it.
pub async fn snapshot<C: ConnectionLike + Send + Sync>(
    conn: &mut C,
    keys: &KeyLayout,
    path: &str,
) -> Result<Option<RoomSnapshot>, ViewError> {
    let key = keys.room(path);
    let fields: BTreeMap<String, String> = conn.hgetall(&key).await?;
    if fields.is_empty() {
        return Ok(None);
    }
    let mut snapshot =
        RoomSnapshot { path: path.to_owned(), version: 0, modules: BTreeMap::new(), updated_at: String::new() };
    for (field, value) in fields {
        match field.as_str() {
            VERSION_FIELD => {
                snapshot.version = value.parse().map_err(|_| malformed(&key, format!("version {value:?}")))?
            }
            UPDATED_AT_FIELD => snapshot.updated_at = value,
            _ => {
                let state = serde_json::from_str(&value).map_err(|e| malformed(&key, format!("field {field}: {e}")))?;
                snapshot.modules.insert(field, state);
            }
        }
    }
    Ok(Some(snapshot))
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
