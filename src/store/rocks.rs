//! The RocksDB state store: one database per process, one column family per
//! input partition, a room's canonical path as the key and its encoded
//! [`RoomState`] as the value. The changelog offset sits in the same column
//! family under a key no path can take, so a single write batch moves state
//! and offset together. So does the list of rooms with timers: one key per
//! such room, its path behind a byte no path starts with.

use std::path::Path as FsPath;
use std::sync::Arc;

use prost::Message;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBWithThreadMode, MultiThreaded, Options, WriteBatch,
    WriteBufferManager,
};

use super::{PartitionWrite, StateStore, StoreError, StoreUsage};
use crate::proto::omni::{RoomState, RoomTimers};

/// Paths start with a tag name, never with a NUL byte.
const CHANGELOG_OFFSET_KEY: &[u8] = b"\0changelog-offset";

/// The prefix of the keys listing rooms with timers (then the room's path).
const TIMER_ROOM_PREFIX: u8 = 1;

fn timer_room_key(room: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(room.len() + 1);
    key.push(TIMER_ROOM_PREFIX);
    key.extend_from_slice(room);
    key
}

/// Whether an encoded room state holds timers, decoding only its timers.
fn has_timers(state: &[u8]) -> bool {
    RoomTimers::decode(state).is_ok_and(|t| !t.timers.is_empty())
}

type Db = DBWithThreadMode<MultiThreaded>;

/// Process-wide RocksDB memory bounds.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreOptions {
    /// Shared block cache for every partition, in MiB.
    pub block_cache_mib: usize,
    /// Budget for all memtables together, in MiB (charged to the block cache).
    pub write_buffer_mib: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { block_cache_mib: 48, write_buffer_mib: 32 }
    }
}

pub struct RocksStore {
    db: Db,
    /// Without a write-ahead log, as Kafka Streams runs RocksDB: the changelog
    /// is the log. A crash loses the newest memtable writes of a partition,
    /// its rooms and its changelog offset together, and the restore from
    /// that offset brings them back; a clean close flushes them.
    write_options: rocksdb::WriteOptions,
    cache: Cache,
    cf_options: Options,
}

fn backend(e: rocksdb::Error) -> StoreError {
    StoreError::Backend(e.into_string())
}

fn cf_name(partition: i32) -> String {
    format!("partition-{partition}")
}

impl RocksStore {
    /// Opens (or creates) the store in `dir`, reopening every partition it held.
    pub fn open(dir: &FsPath, options: StoreOptions) -> Result<Arc<RocksStore>, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Backend(format!("creating {}: {e}", dir.display())))?;
        let cache = Cache::new_lru_cache(options.block_cache_mib << 20);
        // No stall: a manager that stalls writes once memtables pass their
        // budget can stall them for good when the flushes it waits for
        // cannot free enough (one column family per partition, each with a
        // memtable of its own), and the processing thread then blocks
        // inside RocksDB forever. Without the stall, passing the budget
        // only makes memtables flush early; the memory they take is charged
        // to the block cache, which stays bounded.
        let write_buffers = WriteBufferManager::new_write_buffer_manager_with_cache(
            options.write_buffer_mib << 20,
            false,
            cache.clone(),
        );
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_cache_index_and_filter_blocks(true);
        table.set_bloom_filter(10.0, false);
        let mut cf_options = Options::default();
        cf_options.set_block_based_table_factory(&table);
        cf_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        cf_options.set_write_buffer_size((options.write_buffer_mib << 20).clamp(1 << 20, 16 << 20));

        let mut db_options = cf_options.clone();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_write_buffer_manager(&write_buffers);
        db_options.set_max_background_jobs(2);

        let existing = Db::list_cf(&db_options, dir).unwrap_or_default();
        let cfs = existing.into_iter().map(|name| ColumnFamilyDescriptor::new(name, cf_options.clone()));
        let db = Db::open_cf_descriptors(&db_options, dir, cfs).map_err(backend)?;
        let mut write_options = rocksdb::WriteOptions::default();
        write_options.disable_wal(true);
        Ok(Arc::new(RocksStore { db, write_options, cache, cf_options }))
    }

    fn cf(&self, partition: i32) -> Result<Arc<rocksdb::BoundColumnFamily<'_>>, StoreError> {
        let name = cf_name(partition);
        if let Some(cf) = self.db.cf_handle(&name) {
            return Ok(cf);
        }
        self.db.create_cf(&name, &self.cf_options).map_err(backend)?;
        self.db
            .cf_handle(&name)
            .ok_or_else(|| StoreError::Backend(format!("column family {name} vanished after creation")))
    }
}

impl StateStore for RocksStore {
    fn get(&self, partition: i32, room: &str) -> Result<Option<RoomState>, StoreError> {
        let cf = self.cf(partition)?;
        let Some(bytes) = self.db.get_pinned_cf(&cf, room.as_bytes()).map_err(backend)? else {
            return Ok(None);
        };
        RoomState::decode(bytes.as_ref()).map(Some).map_err(|e| StoreError::Corrupt(room.to_owned(), e))
    }

    fn write(&self, partition: i32, write: PartitionWrite) -> Result<(), StoreError> {
        let cf = self.cf(partition)?;
        let mut batch = WriteBatch::default();
        for (room, state) in &write.rooms {
            batch.put_cf(&cf, room, state);
            if has_timers(state) {
                batch.put_cf(&cf, timer_room_key(room), []);
            }
        }
        for room in &write.timers_cleared {
            batch.delete_cf(&cf, timer_room_key(room));
        }
        if let Some(offset) = write.changelog_offset {
            batch.put_cf(&cf, CHANGELOG_OFFSET_KEY, offset.to_be_bytes());
        }
        self.db.write_opt(batch, &self.write_options).map_err(backend)
    }

    fn changelog_offset(&self, partition: i32) -> Result<Option<i64>, StoreError> {
        let cf = self.cf(partition)?;
        let value = self.db.get_pinned_cf(&cf, CHANGELOG_OFFSET_KEY).map_err(backend)?;
        Ok(value.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map(i64::from_be_bytes))
    }

    fn clear(&self, partition: i32) -> Result<(), StoreError> {
        let name = cf_name(partition);
        if self.db.cf_handle(&name).is_some() {
            self.db.drop_cf(&name).map_err(backend)?;
        }
        Ok(())
    }

    fn visit_rooms(&self, partition: i32, visit: &mut dyn FnMut(String, RoomState) -> bool) -> Result<(), StoreError> {
        let cf = self.cf(partition)?;
        for item in self.db.iterator_cf(&cf, rocksdb::IteratorMode::Start) {
            let (key, value) = item.map_err(backend)?;
            if key.first().is_some_and(|&b| b <= TIMER_ROOM_PREFIX) {
                continue;
            }
            let room = String::from_utf8_lossy(&key).into_owned();
            let state = RoomState::decode(value.as_ref()).map_err(|e| StoreError::Corrupt(room.clone(), e))?;
            if !visit(room, state) {
                break;
            }
        }
        Ok(())
    }

    fn timer_rooms(&self, partition: i32) -> Result<Vec<(String, RoomState)>, StoreError> {
        let cf = self.cf(partition)?;
        let mut rooms = Vec::new();
        let mut stale = WriteBatch::default();
        let start = [TIMER_ROOM_PREFIX];
        for item in self.db.iterator_cf(&cf, rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward)) {
            let (key, _) = item.map_err(backend)?;
            let Some((&TIMER_ROOM_PREFIX, room)) = key.split_first() else { break };
            let room = String::from_utf8_lossy(room).into_owned();
            match self.get(partition, &room)? {
                Some(state) if !state.timers.is_empty() => rooms.push((room, state)),
                _ => stale.delete_cf(&cf, &key),
            }
        }
        self.db.write_opt(stale, &self.write_options).map_err(backend)?;
        Ok(rooms)
    }

    fn usage(&self) -> StoreUsage {
        let prop = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        StoreUsage {
            memory_bytes: self.cache.get_usage() as u64 + prop("rocksdb.cur-size-all-mem-tables"),
            disk_bytes: prop("rocksdb.total-sst-files-size"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(version: u64, tags: &str) -> RoomState {
        RoomState {
            version,
            modules: [("tags".to_owned(), tags.to_owned())].into(),
            updated_at: None,
            closed: false,
            timers: Vec::new(),
        }
    }

    fn encoded(room: &str, state: RoomState) -> (Vec<u8>, Vec<u8>) {
        (room.as_bytes().to_vec(), state.encode_to_vec())
    }

    #[test]
    fn state_and_offset_survive_a_reopen_per_partition() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
            assert_eq!(store.changelog_offset(3).unwrap(), None);
            store
                .write(
                    3,
                    PartitionWrite {
                        rooms: vec![encoded("app/a/room/r", room(2, "{}"))],
                        changelog_offset: Some(17),
                        ..PartitionWrite::default()
                    },
                )
                .unwrap();
            store
                .write(
                    5,
                    PartitionWrite {
                        rooms: vec![encoded("app/a/room/q", room(9, "{}"))],
                        changelog_offset: None,
                        ..PartitionWrite::default()
                    },
                )
                .unwrap();
        }
        let store = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(store.get(3, "app/a/room/r").unwrap(), Some(room(2, "{}")));
        assert_eq!(store.get(5, "app/a/room/r").unwrap(), None, "partitions are separate");
        assert_eq!(store.changelog_offset(3).unwrap(), Some(17));
        assert_eq!(store.changelog_offset(5).unwrap(), None);
        let rooms = store.rooms(3).unwrap();
        assert_eq!(rooms, vec![("app/a/room/r".to_owned(), room(2, "{}"))], "the offset key is not a room");
        store.clear(3).unwrap();
        assert_eq!(store.get(3, "app/a/room/r").unwrap(), None);
        assert_eq!(store.changelog_offset(3).unwrap(), None);
        assert_eq!(store.get(5, "app/a/room/q").unwrap(), Some(room(9, "{}")), "other partitions stay");
    }

    #[test]
    fn rooms_with_timers_are_listed_without_a_scan_and_stale_entries_leave_the_list() {
        use crate::proto::omni::Timer;
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        let timed = |version| RoomState {
            timers: vec![Timer { module: "m".into(), name: "t".into(), deadline_ms: 5, ..Timer::default() }],
            ..room(version, "{}")
        };
        let rooms = vec![
            encoded("app/a/room/t1", timed(1)),
            encoded("app/a/room/t2", timed(1)),
            encoded("app/a/room/p", room(1, "{}")),
        ];
        store.write(0, PartitionWrite { rooms, ..PartitionWrite::default() }).unwrap();
        let names = |rooms: Vec<(String, RoomState)>| rooms.into_iter().map(|(path, _)| path).collect::<Vec<_>>();
        assert_eq!(names(store.timer_rooms(0).unwrap()), ["app/a/room/t1", "app/a/room/t2"]);
        assert_eq!(store.rooms(0).unwrap().len(), 3, "the list is not rooms");
        // The engine says when a room's timers are gone...
        let write = PartitionWrite {
            rooms: vec![encoded("app/a/room/t1", room(2, "{}"))],
            timers_cleared: vec![b"app/a/room/t1".to_vec()],
            ..PartitionWrite::default()
        };
        store.write(0, write).unwrap();
        // ...a restore does not, and the listing drops the stale entry itself.
        store
            .write(
                0,
                PartitionWrite { rooms: vec![encoded("app/a/room/t2", room(2, "{}"))], ..PartitionWrite::default() },
            )
            .unwrap();
        assert!(store.timer_rooms(0).unwrap().is_empty());
        let cf = store.cf(0).unwrap();
        assert!(store.db.get_cf(&cf, timer_room_key(b"app/a/room/t2")).unwrap().is_none(), "stale entry deleted");
    }

    #[test]
    fn a_corrupt_entry_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        let cf = store.cf(0).unwrap();
        store.db.put_cf(&cf, b"app/a/room/r", [0xff, 0xff, 0xff]).unwrap();
        drop(cf);
        assert!(matches!(store.get(0, "app/a/room/r"), Err(StoreError::Corrupt(..))));
    }
}
