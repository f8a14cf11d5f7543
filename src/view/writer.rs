//! Writes committed room state to Redis.
//!
//! The runtime hands over writes only after their Kafka transaction
//! committed. Writes to one room coalesce while they wait, so a hot room
//! costs one round trip per flush, and every flush is one pipeline. Each
//! room is written by a Lua compare-and-set that applies only a newer
//! version: replays, a lagging previous owner after a rebalance, and retries
//! are all harmless, and Redis never goes back to an older version. If Redis
//! is down, writes wait (coalesced) and are retried until it is back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use super::{KeyLayout, ViewError, UPDATED_AT_FIELD, VERSION_FIELD};

/// Compare-and-set of a room hash plus its change stream. The stream is
/// trimmed approximately (`MAXLEN ~`), which Redis does in whole nodes: it
/// keeps at least the configured number of entries at a fraction of the cost.
///
/// KEYS: room hash, change stream.
/// ARGV: version, closed (0/1), updated_at, stream max length, field count,
///       field/value pairs, then per change: version, module, state, cause,
///       occurred_at, processed_at.
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
local newest = current
local i = 6 + 2 * nfields
while i + 5 <= #ARGV do
  local v = tonumber(ARGV[i])
  if v > newest and v <= version then
    -- pcall: an id at or below the stream's last one is a replay; skip it.
    local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], ARGV[i] .. '-0',
      'version', ARGV[i], 'module', ARGV[i + 1], 'state', ARGV[i + 2],
      'cause_event_id', ARGV[i + 3], 'occurred_at', ARGV[i + 4], 'processed_at', ARGV[i + 5])
    if type(added) ~= 'table' or not added.err then newest = v end
  end
  i = i + 6
end
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1])
  if newest < version then
    -- The stream must end at the close, or a replay of an older version
    -- could bring the room back; a write without the close entry adds it.
    redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], ARGV[1] .. '-0',
      'version', ARGV[1], 'module', 'room', 'state', '{}',
      'cause_event_id', '', 'occurred_at', ARGV[3], 'processed_at', ARGV[3])
  end
else
  -- Every module's field is written each time, so nothing stale survives.
  redis.call('HSET', KEYS[1], 'version', ARGV[1], 'updated_at', ARGV[3], unpack(ARGV, 6, 5 + 2 * nfields))
end
return 1
"#;

/// One change, as written to a room's change stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEntry {
    pub version: u64,
    pub module: String,
    pub state_json: String,
    pub cause_event_id: String,
    pub occurred_at: String,
    pub processed_at: String,
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
    pub updated_at: String,
    /// The changes since the previous write, oldest first. Empty for a reconcile.
    pub changes: Vec<ChangeEntry>,
}

impl RoomWrite {
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
    /// Length cap of each room's change stream.
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
                for write in batch {
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
struct Pending {
    rooms: HashMap<String, RoomWrite>,
    changes: usize,
    max_changes_per_room: usize,
    max_changes: usize,
}

impl Pending {
    fn new(options: &WriterOptions) -> Pending {
        Pending {
            rooms: HashMap::new(),
            changes: 0,
            max_changes_per_room: options.stream_max_len,
            max_changes: options.max_pending_changes,
        }
    }

    fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    fn absorb_all(&mut self, writes: Vec<RoomWrite>) {
        for write in writes {
            self.absorb(write);
        }
    }

    fn absorb(&mut self, mut write: RoomWrite) {
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
                self.rooms.insert(write.path.clone(), write);
            }
        }
    }

    /// Up to `n` rooms' writes, taken out.
    fn take(&mut self, n: usize) -> Vec<RoomWrite> {
        let keys: Vec<String> = self.rooms.keys().take(n).cloned().collect();
        let batch: Vec<RoomWrite> = keys.iter().filter_map(|k| self.rooms.remove(k)).collect();
        self.changes -= batch.iter().map(|w| w.changes.len()).sum::<usize>();
        batch
    }

    /// Puts a failed write back in front of anything newer that arrived meanwhile.
    fn requeue(&mut self, mut failed: RoomWrite) {
        if let Some(newer) = self.rooms.remove(&failed.path) {
            self.changes -= newer.changes.len();
            failed.absorb(newer, self.max_changes_per_room);
        }
        self.absorb(failed);
    }
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
        cmd.arg(script.get_hash())
            .arg(2)
            .arg(options.keys.room(&write.path))
            .arg(options.keys.changes(&write.path))
            .arg(write.version)
            .arg(if write.closed { "1" } else { "0" })
            .arg(&write.updated_at)
            .arg(options.stream_max_len)
            .arg(write.modules.len());
        for (module, json) in &write.modules {
            debug_assert!(module != VERSION_FIELD && module != UPDATED_AT_FIELD);
            cmd.arg(module).arg(json);
        }
        for change in &write.changes {
            cmd.arg(change.version)
                .arg(&change.module)
                .arg(&change.state_json)
                .arg(&change.cause_event_id)
                .arg(&change.occurred_at)
                .arg(&change.processed_at);
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
            updated_at: String::new(),
            changes: changes
                .iter()
                .map(|&v| ChangeEntry {
                    version: v,
                    module: "tags".into(),
                    state_json: "{}".into(),
                    cause_event_id: String::new(),
                    occurred_at: String::new(),
                    processed_at: String::new(),
                })
                .collect(),
        }
    }

    fn versions(w: &RoomWrite) -> Vec<u64> {
        w.changes.iter().map(|c| c.version).collect()
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
        Pending { rooms: HashMap::new(), changes: 0, max_changes_per_room: 100, max_changes }
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

    #[test]
    fn past_the_budget_states_are_kept_and_change_entries_dropped() {
        let mut pending = pending(3);
        pending.absorb(write(2, &[1, 2]));
        pending.absorb(write(4, &[3, 4]));
        let w = &pending.rooms["app/a/room/r"];
        assert_eq!(w.version, 4, "the newest state is kept");
        assert_eq!(versions(w), vec![1, 2], "entries past the budget are dropped");
        assert_eq!(pending.changes, 2);
    }
}
