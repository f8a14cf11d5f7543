//! The Lua scripts the writer runs, and how a room write becomes one
//! `EVALSHA` of them.

use std::fmt::Write as _;

use super::{ChangeEntry, RoomWrite, WriterOptions};
use crate::proto::rfc3339;

/// Compare-and-set of a room hash plus its change stream. A write adds at
/// most one entry of changes, holding every change it carries that the
/// stream does not have yet, so Redis runs one `XADD` per room and flush
/// rather than one per change. The stream is trimmed by id (`MINID`): ids are
/// versions, so it keeps the entries holding the last `stream_max_len`
/// versions, and its newest entry always survives.
///
/// A write that knows versions are missing before its changes (dropped past
/// a bound, or a room rewritten from the store) first adds a marker entry,
/// `changes` = `[]` and `resync` = `1`, at the newest missing version: a
/// reader that meets it re-reads the hash.
///
/// A closed room's hash is deleted and its stream expires after the
/// retention; a reopened room's stream is kept again.
///
/// Redis' Lua turns every argument into an interned string, hashing every
/// byte, so a write passes few arguments however many changes it carries:
/// the changes come as one ready JSON array, passed through whole, and the
/// index that slices it when part of it is already in the stream (a retried
/// write) is one string, only read then.
///
/// KEYS: room hash, change stream.
/// ARGV: version, closed (0/1), updated_at, lowest version to keep, newest
///       missing version (0 for none), closed stream retention in ms, field
///       count, field/value pairs; then, when the write carries changes: the
///       changes' JSON array, the versions of its first and last change, and
///       its index, `version:position,…` with the 1-based position of each
///       change's object in the array. A close always comes with its change,
///       so the stream ends at the close.
pub(super) const ROOM_CAS: &str = r#"
local version = tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current == 0 then
  -- A closed room has no hash; its last version is its stream's last id.
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #last > 0 then current = tonumber(string.match(last[1][1], '^(%d+)')) end
end
if version <= current then return 0 end
local hole = tonumber(ARGV[5])
local nfields = tonumber(ARGV[7])
local at = 8 + 2 * nfields
-- Changes that do not follow on from what Redis holds (it lost data) leave a hole too.
if ARGV[at] and tonumber(ARGV[at + 1]) - 1 > math.max(current, hole) then hole = tonumber(ARGV[at + 1]) - 1 end
if hole > current then
  redis.pcall('XADD', KEYS[2], 'MINID', ARGV[4], hole .. '-0', 'changes', '[]', 'resync', '1')
end
if ARGV[at] and tonumber(ARGV[at + 2]) > current then
  local entry = ARGV[at]
  if tonumber(ARGV[at + 1]) <= current then
    -- Changes are in version order: keep the first newer one and every later one.
    for v, position in string.gmatch(ARGV[at + 3], '(%d+):(%d+)') do
      if tonumber(v) > current then
        entry = '[' .. string.sub(entry, tonumber(position))
        break
      end
    end
  end
  -- pcall: an id at or below the stream's last one is a replay; skip it.
  redis.pcall('XADD', KEYS[2], 'MINID', ARGV[4], ARGV[at + 2] .. '-0', 'changes', entry)
end
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
else
  -- Every module's field is written each time, so nothing stale survives.
  redis.call('HSET', KEYS[1], 'version', ARGV[1], 'updated_at', ARGV[3], unpack(ARGV, 8, at - 1))
  redis.call('PERSIST', KEYS[2])
end
return 1
"#;

/// Advances the writer's marker and says whether Redis still held the value
/// the writer set last: a Redis that lost its data (FLUSHALL, a restart
/// without persistence) holds none, and one restored from an older snapshot
/// holds an older one.
///
/// KEYS: the marker. ARGV: the next value, its time to live in seconds,
/// then every value Redis may hold if it kept its data.
pub(super) const MARKER: &str = r#"
local seen = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
for i = 3, #ARGV do
  if seen == ARGV[i] then return 1 end
end
return 0
"#;

impl ChangeEntry {
    /// Appends the change as a JSON object of the stream's `changes` array.
    /// Built by hand so the state, already JSON, is embedded without a parse.
    fn append_json(&self, out: &mut Vec<u8>) {
        let string = |out: &mut Vec<u8>, text: &str| {
            serde_json::to_writer(out, text).expect("a string serialises to JSON");
        };
        out.extend_from_slice(format!("{{\"version\":{},\"module\":", self.version).as_bytes());
        string(out, self.module);
        out.extend_from_slice(b",\"state\":");
        out.extend_from_slice(self.state_json.as_bytes());
        out.extend_from_slice(b",\"cause_event_id\":");
        string(out, &self.cause_event_id);
        out.extend_from_slice(b",\"occurred_at\":");
        string(out, &rfc3339(self.occurred_at.as_ref()));
        out.extend_from_slice(b",\"processed_at\":");
        string(out, &rfc3339(self.processed_at.as_ref()));
        out.push(b'}');
    }
}

/// The JSON array of `changes` and the 1-based position of each change's object in it.
pub(super) fn changes_json(changes: &[ChangeEntry]) -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::with_capacity(changes.iter().map(|c| 160 + c.state_json.len()).sum());
    let mut positions = Vec::with_capacity(changes.len());
    out.push(b'[');
    for (i, change) in changes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        positions.push(out.len() + 1);
        change.append_json(&mut out);
    }
    out.push(b']');
    (out, positions)
}

/// The `EVALSHA` of [`ROOM_CAS`] that applies `write`.
pub(super) fn room_command(script: &redis::Script, options: &WriterOptions, write: &RoomWrite) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    let keep_from = write.version.saturating_sub((options.stream_max_len as u64).saturating_sub(1)).max(1);
    let stream_changes = write.stream_changes();
    cmd.arg(script.get_hash())
        .arg(2)
        .arg(options.keys.room(&write.path))
        .arg(options.keys.changes(&write.path))
        .arg(write.version)
        .arg(if write.closed { "1" } else { "0" })
        .arg(rfc3339(write.updated_at.as_ref()))
        .arg(keep_from)
        .arg(write.newest_missing(&stream_changes))
        .arg(options.closed_stream_retention.as_millis().max(1) as u64)
        .arg(write.modules.len());
    for (module, json) in &write.modules {
        cmd.arg(module).arg(json);
    }
    if let (Some(first), Some(last)) = (stream_changes.first(), stream_changes.last()) {
        let (changes, positions) = changes_json(&stream_changes);
        let mut index = String::with_capacity(stream_changes.len() * 12);
        for (change, position) in stream_changes.iter().zip(positions) {
            let separator = if index.is_empty() { "" } else { "," };
            let _ = write!(index, "{separator}{}:{position}", change.version);
        }
        cmd.arg(changes).arg(first.version).arg(last.version).arg(index);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Timestamp;

    #[test]
    fn changes_are_one_json_array_with_their_states_embedded() {
        let change = ChangeEntry {
            version: 7,
            module: "tags",
            state_json: r#"{"k":"v \"q\""}"#.into(),
            cause_event_id: "id with \"quotes\" and \\".into(),
            occurred_at: Some(Timestamp { seconds: 1_795_773_600, nanos: 0 }),
            processed_at: Some(Timestamp { seconds: 1_795_773_600, nanos: 5_000_000 }),
        };
        let (json, positions) = changes_json(&[change.clone(), ChangeEntry { version: 8, ..change }]);
        let parsed: Vec<serde_json::Value> = serde_json::from_slice(&json).unwrap();
        assert_eq!(positions[0], 2);
        assert!(json[positions[1] - 1..].starts_with(br#"{"version":8,"#), "positions are 1-based object starts");
        assert_eq!(
            parsed[0],
            serde_json::json!({
                "version": 7,
                "module": "tags",
                "state": {"k": "v \"q\""},
                "cause_event_id": "id with \"quotes\" and \\",
                "occurred_at": "2026-11-27T10:00:00Z",
                "processed_at": "2026-11-27T10:00:00.005Z",
            })
        );
    }
}
