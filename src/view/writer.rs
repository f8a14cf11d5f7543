//! Writes committed room state to Redis.
//!
//! The runtime hands over writes only after their Kafka transaction
//! committed. Writes to one room coalesce while they wait, so a hot room
//! costs one round trip per flush, and every flush is one pipeline. Each
//! room is written by a Lua compare-and-set that applies only a newer
//! version: replays, a lagging previous owner after a rebalance, and retries
//! are all harmless, and Redis never goes back to an older version. If Redis
//! is down, writes wait (coalesced) and are retried until it is back.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use super::{KeyLayout, ViewError, UPDATED_AT_FIELD, VERSION_FIELD};
use crate::modules::{RoomFolder, ROOM_MODULE};
use crate::proto::omni::RoomState;
use crate::proto::{rfc3339, Timestamp};

/// Compare-and-set of a room hash plus its change stream. A write adds at
/// most one stream entry, holding every change it carries that the stream
/// does not have yet, so Redis runs one `XADD` per room and flush rather
/// than one per change. The stream is trimmed by id (`MINID`): ids are
/// versions, so it keeps the entries holding the last `stream_max_len`
/// versions, and its newest entry always survives.
///
/// Redis' Lua turns every argument into an interned string, hashing every
/// byte, so a write passes few arguments however many changes it carries:
/// the changes come as one ready JSON array, passed through whole, and the
/// index that slices it when part of it is already in the stream (a retried
/// write) is one string, only read then.
///
/// KEYS: room hash, change stream.
/// ARGV: version, closed (0/1), updated_at, lowest version to keep, field
///       count, field/value pairs; then, when the write carries changes: the
///       changes' JSON array, the versions of its first and last change, and
///       its index, `version:position,…` with the 1-based position of each
///       change's object in the array. A close always comes with its change,
///       so the stream ends at the close.
const ROOM_CAS: &str = r#"
local version = tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current == 0 then
  -- A closed room has no hash; its last version is its stream's last id.
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #last > 0 then current = tonumber(string.match(last[1][1], '^(%d+)')) end
end
if version <= current then return 0 end
local nfields = tonumber(ARGV[5])
local at = 6 + 2 * nfields
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
else
  -- Every module's field is written each time, so nothing stale survives.
  redis.call('HSET', KEYS[1], 'version', ARGV[1], 'updated_at', ARGV[3], unpack(ARGV, 6, at - 1))
end
return 1
"#;

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
fn changes_json(changes: &[ChangeEntry]) -> (Vec<u8>, Vec<usize>) {
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

/// A room's committed state to publish in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomWrite {
    pub path: String,
    pub version: u64,
    /// A closed room's hash is deleted; its stream stays.
    pub closed: bool,
    /// Module name → state JSON.
    pub modules: Vec<(String, String)>,
    pub updated_at: Option<Timestamp>,
    /// The changes since the previous write, oldest first. Empty for a reconcile.
    pub changes: Vec<ChangeEntry>,
}

impl RoomWrite {
    /// The Redis view of a committed room state, with the changes since the
    /// room's previous write (none for a reconcile from the store).
    pub fn from_state(folder: &RoomFolder, path: &str, state: &RoomState, changes: Vec<ChangeEntry>) -> RoomWrite {
        RoomWrite {
            path: path.to_owned(),
            version: state.version,
            closed: state.closed,
            modules: folder.module_states(state).map(|(name, json)| (name.to_owned(), json)).collect(),
            updated_at: state.updated_at,
            changes,
        }
    }

    /// The changes for the room's stream. A closing write always ends with
    /// its close, even one that does not carry it (a reconcile from the
    /// store, or entries dropped past the budget): the stream must end at the
    /// close, or a replay of an older version could bring the room back.
    fn stream_changes(&self) -> Cow<'_, [ChangeEntry]> {
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
    /// `None` for a reconcile, which carries none.
    fn first_occurred(&self) -> Option<(i64, i32)> {
        self.changes.first().and_then(|c| c.occurred_at.as_ref()).map(|t| (t.seconds, t.nanos))
    }

    /// Folds a newer write for the same room into this one.
    fn absorb(&mut self, newer: RoomWrite, max_changes: usize) {
        let mut changes = std::mem::take(&mut self.changes);
        changes.extend(newer.changes);
        if newer.version >= self.version {
            *self = RoomWrite { changes: Vec::new(), ..newer };
        }
        let excess = changes.len().saturating_sub(max_changes);
        changes.drain(..excess);
        self.changes = changes;
    }
}

/// Tuning of the writer.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub keys: KeyLayout,
    /// How many of a room's latest versions its change stream keeps (whole
    /// entries: an entry holding one of them is kept with all its changes).
    pub stream_max_len: usize,
    /// Most rooms per pipeline.
    pub batch_rooms: usize,
    /// Most change entries held for Redis at once (bounds memory when Redis lags).
    pub max_pending_changes: usize,
}

/// The runtime's handle to the writer task. Dropping every handle lets the
/// task finish what it holds and stop.
#[derive(Clone)]
pub struct RedisWriter {
    tx: mpsc::UnboundedSender<Vec<RoomWrite>>,
}

impl RedisWriter {
    /// Queues committed room writes; never blocks.
    pub fn send(&self, writes: Vec<RoomWrite>) {
        if !writes.is_empty() && self.tx.send(writes).is_err() {
            tracing::warn!("redis writer has stopped; dropping a write that the next reconcile will repair");
        }
    }
}

/// Starts the writer task on the current tokio runtime.
pub fn spawn_writer(client: redis::Client, options: WriterOptions) -> (RedisWriter, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(client, options, rx));
    (RedisWriter { tx }, task)
}

async fn run(client: redis::Client, options: WriterOptions, mut rx: mpsc::UnboundedReceiver<Vec<RoomWrite>>) {
    let script = redis::Script::new(ROOM_CAS);
    let mut pending = Pending::new(&options);
    let mut connection: Option<ConnectionManager> = None;
    let mut backoff = Duration::from_millis(50);
    let mut open = true;
    loop {
        if pending.is_empty() {
            if !open {
                return;
            }
            match rx.recv().await {
                Some(writes) => pending.absorb_all(writes),
                None => return,
            }
        }
        while let Ok(writes) = rx.try_recv() {
            pending.absorb_all(writes);
        }
        metrics::gauge!("omni_redis_backlog_rooms").set(pending.rooms.len() as f64);

        let conn = match &mut connection {
            Some(conn) => conn,
            None => match ConnectionManager::new(client.clone()).await {
                Ok(conn) => connection.insert(conn),
                Err(e) => {
                    tracing::warn!(error = %e, backlog = pending.rooms.len(), "redis unreachable; holding writes");
                    open = wait_or_closed(&mut rx, &mut pending, &mut backoff, open).await;
                    continue;
                }
            },
        };
        let batch = pending.take(options.batch_rooms);
        let started = Instant::now();
        match write_batch(conn, &script, &options, &batch).await {
            Ok(()) => {
                metrics::histogram!("omni_redis_write_seconds").record(started.elapsed().as_secs_f64());
                metrics::counter!("omni_redis_rooms_written_total").increment(batch.len() as u64);
                backoff = Duration::from_millis(50);
            }
            Err(e) => {
                tracing::warn!(error = %e, rooms = batch.len(), "redis write failed; will retry");
                metrics::counter!("omni_redis_write_errors_total").increment(1);
                for write in batch.into_iter().rev() {
                    pending.requeue(write);
                }
                open = wait_or_closed(&mut rx, &mut pending, &mut backoff, open).await;
            }
        }
    }
}

/// Backs off before a retry while still taking in new writes.
async fn wait_or_closed(
    rx: &mut mpsc::UnboundedReceiver<Vec<RoomWrite>>,
    pending: &mut Pending,
    backoff: &mut Duration,
    open: bool,
) -> bool {
    let sleep = tokio::time::sleep(*backoff);
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
    if !open {
        sleep.await;
        return false;
    }
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return true,
            msg = rx.recv() => match msg {
                Some(writes) => pending.absorb_all(writes),
                None => { sleep.await; return false; }
            },
        }
    }
}

/// Writes waiting for Redis, coalesced per room, with a bound on the change
/// entries they hold. Past the bound (Redis far behind or down), new change
/// entries are dropped while room states are still kept: Redis converges all
/// the same, and a late joiner that meets the hole re-snapshots.
///
/// Rooms go to Redis in the order they started waiting, and a room that is
/// written again while it waits keeps its place, so a busy room is never
/// starved. The rooms of one commit start waiting together; among them, the
/// room whose oldest change has the earliest event goes first, so the
/// changes that waited longest turn visible first, which keeps the tail of
/// the event-to-Redis latency near that of the broadcast. Event times come
/// from the event's producer (fold order would not do: the records that
/// queue up during a commit are folded in a burst, partition by partition);
/// a producer's skewed clock can only reorder the rooms of one commit, never
/// hold a room back past the next.
struct Pending {
    rooms: HashMap<String, RoomWrite>,
    /// Paths in the order their rooms started waiting. A requeue can leave a
    /// path in twice; `take` skips a path whose room was already taken.
    order: VecDeque<String>,
    changes: usize,
    max_changes_per_room: usize,
    max_changes: usize,
}

impl Pending {
    fn new(options: &WriterOptions) -> Pending {
        Pending {
            rooms: HashMap::new(),
            order: VecDeque::new(),
            changes: 0,
            max_changes_per_room: options.stream_max_len,
            max_changes: options.max_pending_changes,
        }
    }

    fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    /// Takes in one commit's writes.
    fn absorb_all(&mut self, mut writes: Vec<RoomWrite>) {
        writes.sort_by_key(RoomWrite::first_occurred);
        for write in writes {
            self.absorb(write, Place::Back);
        }
    }

    fn absorb(&mut self, mut write: RoomWrite, place: Place) {
        // Changes older than the stream keeps would be trimmed on arrival.
        let excess = write.changes.len().saturating_sub(self.max_changes_per_room);
        write.changes.drain(..excess);
        if self.changes + write.changes.len() > self.max_changes {
            metrics::counter!("omni_redis_stream_entries_dropped_total").increment(write.changes.len() as u64);
            write.changes.clear();
        }
        self.changes += write.changes.len();
        match self.rooms.get_mut(&write.path) {
            Some(existing) => {
                let before = existing.changes.len() + write.changes.len();
                existing.absorb(write, self.max_changes_per_room);
                self.changes -= before - existing.changes.len();
            }
            None => {
                match place {
                    Place::Back => self.order.push_back(write.path.clone()),
                    Place::Front => self.order.push_front(write.path.clone()),
                }
                self.rooms.insert(write.path.clone(), write);
            }
        }
    }

    /// The writes of the `n` rooms that have waited longest, taken out, longest first.
    fn take(&mut self, n: usize) -> Vec<RoomWrite> {
        let mut batch = Vec::with_capacity(n.min(self.rooms.len()));
        while batch.len() < n {
            let Some(path) = self.order.pop_front() else { break };
            if let Some(write) = self.rooms.remove(&path) {
                batch.push(write);
            }
        }
        self.changes -= batch.iter().map(|w| w.changes.len()).sum::<usize>();
        batch
    }

    /// Puts a failed write back in front, merged with anything newer that
    /// arrived meanwhile. Requeue a batch last first to keep its order.
    fn requeue(&mut self, mut failed: RoomWrite) {
        if let Some(newer) = self.rooms.remove(&failed.path) {
            self.changes -= newer.changes.len();
            failed.absorb(newer, self.max_changes_per_room);
        }
        self.absorb(failed, Place::Front);
    }
}

/// Where a room that was not waiting joins the queue.
#[derive(Clone, Copy)]
enum Place {
    Back,
    Front,
}

async fn write_batch(
    conn: &mut ConnectionManager,
    script: &redis::Script,
    options: &WriterOptions,
    batch: &[RoomWrite],
) -> Result<(), ViewError> {
    let mut pipe = redis::pipe();
    for write in batch {
        let mut cmd = redis::cmd("EVALSHA");
        let keep_from = write.version.saturating_sub((options.stream_max_len as u64).saturating_sub(1)).max(1);
        cmd.arg(script.get_hash())
            .arg(2)
            .arg(options.keys.room(&write.path))
            .arg(options.keys.changes(&write.path))
            .arg(write.version)
            .arg(if write.closed { "1" } else { "0" })
            .arg(rfc3339(write.updated_at.as_ref()))
            .arg(keep_from)
            .arg(write.modules.len());
        for (module, json) in &write.modules {
            debug_assert!(module != VERSION_FIELD && module != UPDATED_AT_FIELD);
            cmd.arg(module).arg(json);
        }
        let stream_changes = write.stream_changes();
        if let (Some(first), Some(last)) = (stream_changes.first(), stream_changes.last()) {
            let (changes, positions) = changes_json(&stream_changes);
            let mut index = String::with_capacity(stream_changes.len() * 12);
            for (change, position) in stream_changes.iter().zip(positions) {
                let separator = if index.is_empty() { "" } else { "," };
                let _ = write!(index, "{separator}{}:{position}", change.version);
            }
            cmd.arg(changes).arg(first.version).arg(last.version).arg(index);
        }
        pipe.add_command(cmd).ignore();
    }
    match pipe.query_async::<()>(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            Ok(pipe.query_async::<()>(conn).await?)
        }
        other => Ok(other?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(version: u64, changes: &[u64]) -> RoomWrite {
        RoomWrite {
            path: "app/a/room/r".into(),
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
        }
    }

    fn versions(w: &RoomWrite) -> Vec<u64> {
        w.changes.iter().map(|c| c.version).collect()
    }

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

    #[test]
    fn a_newer_write_takes_over_the_state_and_appends_its_changes() {
        let mut w = write(2, &[1, 2]);
        w.absorb(write(4, &[3, 4]), 100);
        assert_eq!(w.version, 4);
        assert_eq!(w.modules, write(4, &[]).modules);
        assert_eq!(versions(&w), vec![1, 2, 3, 4]);
    }

    #[test]
    fn the_pending_change_list_is_capped_to_the_newest() {
        let mut w = write(2, &[1, 2]);
        w.absorb(write(4, &[3, 4]), 3);
        assert_eq!(versions(&w), vec![2, 3, 4]);
    }

    fn pending(max_changes: usize) -> Pending {
        Pending { rooms: HashMap::new(), order: VecDeque::new(), changes: 0, max_changes_per_room: 100, max_changes }
    }

    #[test]
    fn a_requeued_failure_keeps_the_newer_state_and_every_change_in_order() {
        let mut pending = pending(1000);
        pending.absorb_all(vec![write(5, &[5])]);
        pending.requeue(write(4, &[3, 4]));
        let w = &pending.rooms["app/a/room/r"];
        assert_eq!(w.version, 5);
        assert_eq!(versions(w), vec![3, 4, 5]);
        assert_eq!(pending.changes, 3);
        assert_eq!(pending.take(10).len(), 1);
        assert_eq!(pending.changes, 0);
    }

    fn room(name: &str, occurred_at: &[i64]) -> RoomWrite {
        let at = |millis: i64| Some(crate::proto::timestamp_from_millis(millis));
        let changes =
            occurred_at.iter().map(|&t| ChangeEntry { occurred_at: at(t), ..write(1, &[1]).changes[0].clone() });
        RoomWrite { path: format!("app/a/room/{name}"), changes: changes.collect(), ..write(1, &[]) }
    }

    fn paths(batch: Vec<RoomWrite>) -> Vec<String> {
        batch.into_iter().map(|w| w.path.trim_start_matches("app/a/room/").to_owned()).collect()
    }

    #[test]
    fn rooms_go_in_the_order_they_started_waiting_and_a_commit_by_its_oldest_change() {
        let mut pending = pending(1000);
        pending.absorb_all(vec![
            room("late", &[900]),
            room("early", &[100, 950]),
            room("middle", &[500]),
            room("reconcile", &[]),
        ]);
        // The next commit: a busy room written again keeps its place.
        pending.absorb_all(vec![room("newest", &[1010]), room("early", &[1000])]);
        assert_eq!(paths(pending.take(3)), ["reconcile", "early", "middle"]);
        assert_eq!(paths(pending.take(3)), ["late", "newest"]);
        assert!(pending.is_empty());
    }

    #[test]
    fn a_failed_batch_goes_back_in_front_in_its_order() {
        let mut pending = pending(1000);
        pending.absorb_all(vec![room("a", &[1]), room("b", &[2]), room("c", &[3])]);
        let failed = pending.take(2);
        pending.absorb_all(vec![room("d", &[4]), room("a", &[5])]);
        for write in failed.into_iter().rev() {
            pending.requeue(write);
        }
        assert_eq!(paths(pending.take(10)), ["a", "b", "c", "d"]);
        assert_eq!(pending.changes, 0);
        assert!(pending.take(10).is_empty(), "a path left in twice is skipped once its room is taken");
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

    #[test]
    fn a_write_holds_no_more_changes_than_the_stream_keeps() {
        let mut pending = Pending { max_changes_per_room: 3, ..pending(1000) };
        pending.absorb(write(5, &[1, 2, 3, 4, 5]), Place::Back);
        assert_eq!(versions(&pending.rooms["app/a/room/r"]), vec![3, 4, 5]);
        assert_eq!(pending.changes, 3);
    }

    #[test]
    fn past_the_budget_states_are_kept_and_change_entries_dropped() {
        let mut pending = pending(3);
        pending.absorb(write(2, &[1, 2]), Place::Back);
        pending.absorb(write(4, &[3, 4]), Place::Back);
        let w = &pending.rooms["app/a/room/r"];
        assert_eq!(w.version, 4, "the newest state is kept");
        assert_eq!(versions(w), vec![1, 2], "entries past the budget are dropped");
        assert_eq!(pending.changes, 2);
    }
}
