//! The one broadcast consumer of an `omni serve` process, shared by every
//! `Watch`: it decodes each change once, keeps the last minute of them (bounded
//! in bytes) for watchers that join, and fans them out through bounded rings
//! (Tokio broadcast channels), so ten thousand watchers cost one Kafka
//! consumer and one decode per change. Watchers of one room (a pattern with
//! no wildcard, the common case) share a small ring of that room's own, so a
//! change wakes only the watchers it concerns; wildcard watchers share one
//! ring of every change and filter it.
//!
//! A joining watcher takes the replay and a receiver under one lock, so no
//! change falls between them; its follower then drops what its Redis snapshot
//! already covers. A watcher that falls `watch_buffer` changes behind the ring
//! loses its place: its feed reports [`PubSubError::Lagged`] and the watch ends.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use prost::Message as _;
use tokio::sync::{broadcast, watch};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use crate::kafka::KafkaSettings;
use crate::proto::omni::StateChange;
use crate::pubsub::{change_record, ChangeFeed, Pattern, PubSubError, StartAt, Subscriber};
use crate::view::ChangeRecord;

/// A decoded broadcast change, shared by every watcher it matches.
#[derive(Debug)]
struct Shared {
    change: ChangeRecord,
    /// The broadcast record's size, which the follower's bounds count.
    bytes: usize,
    /// The record's timestamp, for the replay's age bound.
    at_millis: i64,
}

/// Recent changes, for watchers that join.
#[derive(Debug, Default)]
struct Replay {
    changes: VecDeque<Arc<Shared>>,
    bytes: usize,
}

/// Slots of one room's ring. A ring allocates its slots up front, so this
/// stays small (about 16 KiB a watched room); a room's changes arrive at most
/// a commit's worth at a time.
const ROOM_RING: usize = 256;

/// Rooms with a ring before the rings nobody watches any more are dropped.
const ROOM_RINGS_BEFORE_CLEANUP: usize = 1024;

/// What the pump and joining watchers share under one lock.
#[derive(Debug, Default)]
struct Fanout {
    replay: Replay,
    /// The ring of each room watched on its own.
    rooms: HashMap<String, broadcast::Sender<Arc<Shared>>>,
    /// Room rings after the last cleanup.
    rooms_after_cleanup: usize,
}

/// Bounds of the hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    pub broadcast_topic: String,
    /// Changes a watcher may fall behind.
    pub buffer: usize,
    pub lookback: Duration,
    pub lookback_bytes: usize,
}

/// The shared consumer's output: a replay and a ring of live changes.
#[derive(Debug)]
pub struct Hub {
    fanout: Mutex<Fanout>,
    /// Every change, for wildcard watchers.
    ring: broadcast::Sender<Arc<Shared>>,
    options: HubOptions,
    /// True once the consumer's start offsets are fixed.
    ready: watch::Sender<bool>,
}

impl Hub {
    /// Starts the shared consumer in the background; it reads from `lookback`
    /// ago so the replay holds recent changes from the start.
    pub fn start(settings: KafkaSettings, options: HubOptions) -> Arc<Hub> {
        let (ring, _) = broadcast::channel(options.buffer.max(1));
        let (ready, _) = watch::channel(false);
        let hub = Arc::new(Hub { fanout: Mutex::new(Fanout::default()), ring, options, ready });
        tokio::spawn(Arc::clone(&hub).consume(settings));
        hub
    }

    /// Whether the consumer is subscribed (start offsets fixed).
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the consumer is subscribed.
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        // The sender lives as long as the hub, so this only ends when ready.
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// A watcher's feed: the replayed changes matching `pattern`, then every
    /// live one, until the watcher falls too far behind.
    pub fn feed(&self, pattern: &Pattern) -> ChangeFeed {
        let (backlog, receiver) = {
            let mut fanout = self.lock();
            let receiver = if pattern.is_literal() {
                fanout.room_ring(&pattern.to_string()).subscribe()
            } else {
                self.ring.subscribe()
            };
            let backlog: Vec<Arc<Shared>> =
                fanout.replay.changes.iter().filter(|s| pattern.matches(&s.change.path)).cloned().collect();
            (backlog, receiver)
        };
        let live_pattern = pattern.clone();
        let live = BroadcastStream::new(receiver).filter_map(move |received| {
            let item = match received {
                Ok(shared) if live_pattern.matches(&shared.change.path) => Some(Ok(shared)),
                Ok(_) => None,
                Err(BroadcastStreamRecvError::Lagged(skipped)) => Some(Err(PubSubError::Lagged { skipped })),
            };
            std::future::ready(item)
        });
        let stream = futures::stream::iter(backlog.into_iter().map(Ok))
            .chain(live)
            .map(|item| item.map(|shared| (shared.change.clone(), shared.bytes)));
        // One lag ends the feed: the follower's place is lost.
        let mut lagged = false;
        Box::pin(stream.take_while(move |item| {
            let go_on = !lagged;
            lagged |= matches!(item, Err(PubSubError::Lagged { .. }));
            std::future::ready(go_on)
        }))
    }

    /// Watchers receiving from the rings now.
    pub fn watchers(&self) -> usize {
        let rooms: usize = self.lock().rooms.values().map(broadcast::Sender::receiver_count).sum();
        self.ring.receiver_count() + rooms
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fanout> {
        self.fanout.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn consume(self: Arc<Hub>, settings: KafkaSettings) {
        let topic = self.options.broadcast_topic.clone();
        let every = Pattern::parse(">").expect("`>` is a valid pattern");
        let since = chrono::Utc::now().timestamp_millis().saturating_sub(self.lookback_millis());
        // Waits for the topic (and the cluster) as long as it takes, logging in the subscriber.
        let mut subscriber = loop {
            match Subscriber::subscribe(&settings, &topic, every.clone(), StartAt::Timestamp(since)).await {
                Ok(subscriber) => break subscriber,
                Err(error) => {
                    tracing::warn!(%error, topic, "the shared broadcast consumer cannot subscribe; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        self.ready.send_replace(true);
        tracing::info!(topic, "shared broadcast consumer started");
        let mut failing = false;
        while let Some(delivery) = subscriber.next().await {
            let delivery = match delivery {
                Ok(delivery) => delivery,
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, topic, "the shared broadcast consumer failed to read; going on");
                    }
                    failing = true;
                    continue;
                }
            };
            failing = false;
            let decoded = StateChange::decode(delivery.payload.as_slice())
                .map_err(|e| e.to_string())
                .and_then(|change| change_record(change).map_err(|e| e.to_string()));
            match decoded {
                Ok(mut change) => {
                    if change.path.is_empty() {
                        change.path.clone_from(&delivery.subject);
                    }
                    let at_millis = delivery.timestamp_millis.unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
                    self.publish(Arc::new(Shared { change, bytes: delivery.payload.len(), at_millis }));
                }
                Err(reason) => tracing::warn!(
                    topic,
                    partition = delivery.partition,
                    offset = delivery.offset,
                    reason,
                    "skipping an undecodable broadcast record"
                ),
            }
        }
        tracing::error!(topic, "the shared broadcast consumer ended");
    }

    fn lookback_millis(&self) -> i64 {
        i64::try_from(self.options.lookback.as_millis()).unwrap_or(i64::MAX)
    }

    /// Adds a change to the replay and sends it to every watcher, under the
    /// replay's lock so a joining watcher sees it exactly once.
    fn publish(&self, shared: Arc<Shared>) {
        let oldest_kept = chrono::Utc::now().timestamp_millis().saturating_sub(self.lookback_millis());
        let mut fanout = self.lock();
        if let Some(room) = fanout.rooms.get(&shared.change.path) {
            if room.send(Arc::clone(&shared)).is_err() {
                // Nobody watches the room any more.
                fanout.rooms.remove(&shared.change.path);
            }
        }
        let replay = &mut fanout.replay;
        replay.bytes += shared.bytes;
        replay.changes.push_back(Arc::clone(&shared));
        while let Some(front) = replay.changes.front() {
            if replay.bytes <= self.options.lookback_bytes && front.at_millis >= oldest_kept {
                break;
            }
            replay.bytes -= front.bytes;
            replay.changes.pop_front();
        }
        // No receiver is not an error: nobody is watching.
        let _ = self.ring.send(shared);
    }
}

impl Fanout {
    /// The ring of one room, made on its first watcher. Rings nobody watches
    /// any more go once the map has doubled since the last cleanup.
    fn room_ring(&mut self, path: &str) -> &broadcast::Sender<Arc<Shared>> {
        if self.rooms.len() >= ROOM_RINGS_BEFORE_CLEANUP && self.rooms.len() >= 2 * self.rooms_after_cleanup {
            self.rooms.retain(|_, ring| ring.receiver_count() > 0);
            self.rooms_after_cleanup = self.rooms.len();
        }
        self.rooms.entry(path.to_owned()).or_insert_with(|| broadcast::channel(ROOM_RING).0)
    }
}
