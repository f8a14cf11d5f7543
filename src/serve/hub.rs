//! The one broadcast consumer of an `omni serve` process, shared by every
//! `Watch`: it keeps the last minute of broadcast records (bounded in bytes)
//! for watchers that join, and hands each change to the watchers it
//! concerns, so ten thousand watchers cost one Kafka consumer and at most
//! one decode per change (none for a change no watcher takes). It runs on a
//! thread of its own, beside the service's runtime.
//!
//! Each watcher has an inbox of its own, empty (and costing nothing) while
//! the watcher keeps up. Watchers of one room (a pattern with no wildcard,
//! the common case) are found by the room's path, so a change wakes only
//! them; wildcard watchers are few and each checks its pattern. An inbox is
//! bounded by `watch_buffer` changes and `watch_buffer_bytes` bytes of
//! broadcast records: a watcher past either loses its place, its queued
//! changes are freed at once, and its feed reports [`PubSubError::Lagged`]
//! so the watch ends.
//!
//! A joining watcher takes the replay and registers its inbox under one
//! lock, so no change falls between them; its follower then drops what its
//! Redis snapshot already covers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tokio::sync::{watch, Notify};

use super::convert::WireChange;
use super::trace::{DeliveryTrace, Mark};
use crate::kafka::KafkaSettings;
use crate::pubsub::{ChangeFeed, Delivery, Pattern, PubSubError, StartAt, Subscriber};

/// A decoded broadcast change, shared by every watcher it reaches.
#[derive(Debug)]
struct Shared {
    change: WireChange,
    /// The broadcast record's size, which the inboxes and the follower's bounds count.
    bytes: usize,
    /// When the shared consumer received a live change (not a replayed one).
    received: Option<Instant>,
}

/// A broadcast record kept for watchers that join. Kept as the record's
/// bytes, which are several times smaller than the decoded change, and
/// decoded (again, if a watcher took it live) only for a joiner it matches;
/// an undecodable one is skipped then.
#[derive(Debug)]
struct Recent {
    path: String,
    payload: Vec<u8>,
    at_millis: i64,
}

/// What a kept record costs beyond its payload and path (the entry and the
/// two allocations' headers), so the replay's bound is in real bytes.
const RECENT_OVERHEAD: usize = 80;

impl Recent {
    fn cost(&self) -> usize {
        self.payload.len() + self.path.len() + RECENT_OVERHEAD
    }
}

/// Recent broadcast records, for watchers that join.
#[derive(Debug, Default)]
struct Replay {
    records: VecDeque<Recent>,
    bytes: usize,
}

/// A watcher's queue of changes it has not taken yet.
#[derive(Debug, Default)]
struct Queue {
    changes: VecDeque<Arc<Shared>>,
    bytes: usize,
    /// Set once the watcher fell behind: the changes it lost.
    lagged: Option<u64>,
}

/// One watcher's inbox: the pump pushes, the watcher's feed takes.
#[derive(Debug)]
struct Inbox {
    queue: Mutex<Queue>,
    /// Wakes the feed; a push with nobody waiting leaves a permit.
    arrived: Notify,
    max_changes: usize,
    max_bytes: usize,
    /// `omni_service_watch_inbox_seconds`, looked up once rather than per change.
    waited: metrics::Histogram,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, shared: &Arc<Shared>) {
        {
            let mut queue = self.lock();
            if let Some(lost) = &mut queue.lagged {
                *lost += 1;
                return;
            }
            let full = queue.changes.len() >= self.max_changes
                || (!queue.changes.is_empty() && queue.bytes + shared.bytes > self.max_bytes);
            if full {
                // The watch ends: free what it held now, not when its client goes.
                queue.lagged = Some(queue.changes.len() as u64 + 1);
                queue.changes = VecDeque::new();
                queue.bytes = 0;
            } else {
                queue.bytes += shared.bytes;
                queue.changes.push_back(Arc::clone(shared));
            }
        }
        self.arrived.notify_one();
    }

    /// The next change, or the lag that ended the feed.
    async fn take(&self) -> Result<Arc<Shared>, PubSubError> {
        loop {
            {
                let mut queue = self.lock();
                if let Some(skipped) = queue.lagged {
                    return Err(PubSubError::Lagged { skipped });
                }
                if let Some(shared) = queue.changes.pop_front() {
                    queue.bytes -= shared.bytes;
                    if let Some(received) = shared.received {
                        // The service's own share of a change's delivery: the
                        // wait for the watcher's stream to be polled.
                        self.waited.record(received.elapsed().as_secs_f64());
                    }
                    return Ok(shared);
                }
            }
            self.arrived.notified().await;
        }
    }
}

/// What the pump and joining watchers share under one lock.
#[derive(Debug, Default)]
struct Fanout {
    replay: Replay,
    /// The inboxes of each room watched on its own.
    rooms: HashMap<String, Vec<Arc<Inbox>>>,
    /// The inboxes of wildcard watchers, with their patterns.
    wildcards: Vec<(Pattern, Arc<Inbox>)>,
}

/// Bounds of the hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    pub broadcast_topic: String,
    /// Changes a watcher may fall behind.
    pub buffer: usize,
    /// Bytes of broadcast records a watcher may fall behind.
    pub buffer_bytes: usize,
    pub lookback: Duration,
    pub lookback_bytes: usize,
    /// Notes each live change's receipt, for `omni bench --service`.
    pub trace: Option<Arc<DeliveryTrace>>,
}

/// The shared consumer's output: a replay and every watcher's inbox.
#[derive(Debug)]
pub struct Hub {
    fanout: Mutex<Fanout>,
    options: HubOptions,
    /// True once the consumer has read the broadcast's last minute.
    ready: watch::Sender<bool>,
}

/// A watcher's place in the hub, given up when its feed is dropped.
struct Registration {
    hub: Arc<Hub>,
    room: Option<String>,
    inbox: Arc<Inbox>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut fanout = self.hub.lock();
        match &self.room {
            Some(room) => {
                if let Some(inboxes) = fanout.rooms.get_mut(room) {
                    inboxes.retain(|inbox| !Arc::ptr_eq(inbox, &self.inbox));
                    if inboxes.is_empty() {
                        fanout.rooms.remove(room);
                    }
                }
            }
            None => fanout.wildcards.retain(|(_, inbox)| !Arc::ptr_eq(inbox, &self.inbox)),
        }
    }
}

impl Hub {
    /// Starts the shared consumer in the background; it reads from `lookback`
    /// ago so the replay holds recent changes from the start. It runs on a
    /// thread of its own: on the service's runtime, a watcher it wakes would
    /// wait in that worker's next-task slot (which no other worker steals)
    /// until the consumer had handed on the commit's whole burst.
    pub fn start(settings: KafkaSettings, options: HubOptions) -> Result<Arc<Hub>, std::io::Error> {
        let (ready, _) = watch::channel(false);
        let hub = Arc::new(Hub { fanout: Mutex::new(Fanout::default()), options, ready });
        let consuming = Arc::clone(&hub);
        // The runtime is built (and dropped) on the thread itself: dropped on
        // the service's runtime, as a failed spawn would drop it, it panics.
        let (built_tx, built) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new().name("omni-serve-hub".into()).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => {
                    let _ = built_tx.send(Ok(()));
                    runtime.block_on(consuming.consume(settings));
                }
                Err(error) => {
                    let _ = built_tx.send(Err(error));
                }
            }
        })?;
        built.recv().map_err(|_| std::io::Error::other("the hub's thread ended before its runtime was built"))??;
        Ok(hub)
    }

    /// Whether the consumer has read the broadcast's last minute.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the consumer has read the broadcast's last minute.
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        // The sender lives as long as the hub, so this only ends when ready.
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// A watcher's feed: the replayed changes matching `pattern`, then every
    /// live one, until the watcher falls too far behind.
    pub fn feed(self: &Arc<Self>, pattern: &Pattern) -> ChangeFeed<WireChange> {
        let inbox = Arc::new(Inbox {
            queue: Mutex::default(),
            arrived: Notify::new(),
            max_changes: self.options.buffer.max(1),
            max_bytes: self.options.buffer_bytes,
            waited: metrics::histogram!("omni_service_watch_inbox_seconds"),
        });
        let room = pattern.is_literal().then(|| pattern.to_string());
        let kept: Vec<(Vec<u8>, String)> = {
            let mut fanout = self.lock();
            match &room {
                Some(room) => fanout.rooms.entry(room.clone()).or_default().push(Arc::clone(&inbox)),
                None => fanout.wildcards.push((pattern.clone(), Arc::clone(&inbox))),
            }
            let replay = fanout.replay.records.iter().filter(|recent| pattern.matches(&recent.path));
            replay.map(|recent| (recent.payload.clone(), recent.path.clone())).collect()
        };
        let backlog = kept.into_iter().filter_map(|(payload, path)| decode(&payload, &path).ok());
        let registration = Registration { hub: Arc::clone(self), room, inbox };
        let live = futures::stream::unfold(registration, |registration| async move {
            let taken = registration.inbox.take().await;
            Some((taken, registration))
        });
        let stream = futures::stream::iter(
            backlog.map(|(change, bytes)| Ok(Arc::new(Shared { change, bytes, received: None }))),
        )
        .chain(live)
        // A change only this watcher got is handed over rather than copied.
        .map(|item| {
            item.map(|shared| {
                Arc::try_unwrap(shared).map_or_else(|s| (s.change.clone(), s.bytes), |s| (s.change, s.bytes))
            })
        });
        // One lag ends the feed: the follower's place is lost.
        let mut lagged = false;
        Box::pin(stream.take_while(move |item| {
            let go_on = !lagged;
            lagged |= matches!(item, Err(PubSubError::Lagged { .. }));
            std::future::ready(go_on)
        }))
    }

    /// Watchers registered now.
    pub fn watchers(&self) -> usize {
        let fanout = self.lock();
        fanout.wildcards.len() + fanout.rooms.values().map(Vec::len).sum::<usize>()
    }

    fn lock(&self) -> MutexGuard<'_, Fanout> {
        self.fanout.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the broadcast for good. The hub is ready once it has read what
    /// the topic held when it subscribed (the last minute): a watcher that
    /// joins sooner would get that minute's changes late, and a load
    /// balancer must not send it one.
    async fn consume(self: Arc<Hub>, settings: KafkaSettings) {
        let topic = self.options.broadcast_topic.clone();
        let mut subscriber = self.subscribe(settings, &topic).await;
        let mut catching_up = Some(end_offsets(&subscriber, &topic).await);
        tracing::info!(topic, "shared broadcast consumer started; reading the last minute");
        let mut failing = false;
        // How fresh the feed is: from the job's produce (the record's
        // timestamp, before its transaction commits) to this consumer.
        let age = metrics::histogram!("omni_service_broadcast_age_seconds");
        loop {
            let next = match catching_up {
                // Checked on a timer too: the last records may be markers no delivery shows.
                Some(_) => tokio::time::timeout(CATCH_UP_CHECK, subscriber.next()).await.ok(),
                None => Some(subscriber.next().await),
            };
            match next {
                None => {}
                Some(None) => break,
                Some(Some(Ok(delivery))) => {
                    failing = false;
                    self.receive(delivery, &age);
                }
                Some(Some(Err(error))) => {
                    if !failing {
                        tracing::warn!(%error, topic, "the shared broadcast consumer failed to read; going on");
                    }
                    failing = true;
                }
            }
            // After the record is kept: a watcher let in next finds it in the replay.
            if let Some(ends) = &catching_up {
                if subscriber.reached(ends).unwrap_or(false) {
                    catching_up = None;
                    self.ready.send_replace(true);
                    tracing::info!(topic, "read the broadcast's last minute; ready");
                }
            }
        }
        tracing::error!(topic, "the shared broadcast consumer ended");
    }

    /// Subscribes to the whole broadcast from the lookback on, waiting for
    /// the topic (and the cluster) as long as it takes.
    async fn subscribe(&self, mut settings: KafkaSettings, topic: &str) -> Subscriber {
        // librdkafka prefetches up to 64 MiB by default, several times that in
        // memory for small records; the hub keeps up or its watchers lag anyway.
        settings.properties.entry("queued.max.messages.kbytes".into()).or_insert_with(|| PREFETCH_KIB.to_string());
        settings.properties.entry("fetch.queue.backoff.ms".into()).or_insert_with(|| "10".into());
        let every = Pattern::parse(">").expect("`>` is a valid pattern");
        let since = chrono::Utc::now().timestamp_millis().saturating_sub(self.lookback_millis());
        loop {
            match Subscriber::subscribe(&settings, topic, every.clone(), StartAt::Timestamp(since)).await {
                Ok(subscriber) => return subscriber,
                Err(error) => {
                    tracing::warn!(%error, topic, "the shared broadcast consumer cannot subscribe; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Keeps a broadcast record for joiners and hands its change to the
    /// watchers of its room and the wildcard watchers it matches.
    fn receive(&self, delivery: Delivery, age: &metrics::Histogram) {
        let received = Instant::now();
        let now_millis = chrono::Utc::now().timestamp_millis();
        let at_millis = delivery.timestamp_millis.unwrap_or(now_millis);
        age.record(now_millis.saturating_sub(at_millis).max(0) as f64 / 1000.0);
        let (partition, offset) = (delivery.partition, delivery.offset);
        // The record's key is its change's path (the wire contract): watchers are found by it.
        let recent = Recent { path: delivery.subject, payload: delivery.payload, at_millis };
        self.publish(recent, now_millis, |recent| match decode(&recent.payload, &recent.path) {
            Ok((change, bytes)) => {
                if let Some(trace) = &self.options.trace {
                    trace.note(Mark::Received, &change.0.path, change.0.version);
                }
                Some(Arc::new(Shared { change, bytes, received: Some(received) }))
            }
            Err(reason) => {
                tracing::warn!(
                    topic = self.options.broadcast_topic,
                    partition,
                    offset,
                    reason,
                    "skipping an undecodable broadcast record"
                );
                None
            }
        });
    }

    fn lookback_millis(&self) -> i64 {
        i64::try_from(self.options.lookback.as_millis()).unwrap_or(i64::MAX)
    }

    /// Adds a record to the replay and its change to every inbox it
    /// concerns, under the replay's lock so a joining watcher sees it exactly
    /// once. The record is decoded only when some watcher is there to take
    /// it: an instance whose watchers follow a few rooms does not decode the
    /// whole broadcast.
    fn publish(&self, recent: Recent, now_millis: i64, decode: impl FnOnce(&Recent) -> Option<Arc<Shared>>) {
        let oldest_kept = now_millis.saturating_sub(self.lookback_millis());
        let mut fanout = self.lock();
        let fanout = &mut *fanout;
        let room = fanout.rooms.get(&recent.path).map_or(&[][..], Vec::as_slice);
        let mut wildcards = fanout.wildcards.iter().filter(|(pattern, _)| pattern.matches(&recent.path)).peekable();
        if !room.is_empty() || wildcards.peek().is_some() {
            if let Some(shared) = decode(&recent) {
                room.iter().chain(wildcards.map(|(_, inbox)| inbox)).for_each(|inbox| inbox.push(&shared));
            }
        }
        let replay = &mut fanout.replay;
        replay.bytes += recent.cost();
        replay.records.push_back(recent);
        while let Some(front) = replay.records.front() {
            if replay.bytes <= self.options.lookback_bytes && front.at_millis >= oldest_kept {
                break;
            }
            replay.bytes -= front.cost();
            replay.records.pop_front();
        }
    }
}

/// The hub's prefetch bound, in KiB.
const PREFETCH_KIB: usize = 2048;

/// How often a hub still reading the last minute checks whether it got there.
const CATCH_UP_CHECK: Duration = Duration::from_millis(100);

/// Where the broadcast ends now, asked until the cluster answers.
async fn end_offsets(subscriber: &Subscriber, topic: &str) -> BTreeMap<i32, i64> {
    loop {
        match subscriber.end_offsets().await {
            Ok(ends) => return ends,
            Err(error) => {
                tracing::warn!(%error, topic, "cannot read where the broadcast ends; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// A broadcast record's change, with the record's size.
fn decode(payload: &[u8], subject: &str) -> Result<(WireChange, usize), String> {
    Ok((WireChange::decode(payload, subject)?, payload.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_change(path: &str, version: u64) -> crate::proto::omni::StateChange {
        crate::proto::omni::StateChange {
            path: path.into(),
            version,
            module: "tags".into(),
            state_json: "{}".into(),
            ..Default::default()
        }
    }

    fn change(version: u64, bytes: usize) -> Arc<Shared> {
        Arc::new(Shared { change: WireChange(state_change("app/a/room/r", version)), bytes, received: None })
    }

    fn inbox(max_changes: usize, max_bytes: usize) -> Inbox {
        Inbox {
            queue: Mutex::default(),
            arrived: Notify::new(),
            max_changes,
            max_bytes,
            waited: metrics::histogram!("omni_service_watch_inbox_seconds"),
        }
    }

    #[tokio::test]
    async fn an_inbox_hands_changes_on_in_order() {
        let inbox = inbox(4, 1 << 20);
        for version in 1..=3 {
            inbox.push(&change(version, 100));
        }
        for version in 1..=3 {
            assert_eq!(inbox.take().await.unwrap().change.0.version, version);
        }
        assert_eq!(inbox.lock().bytes, 0);
    }

    #[tokio::test]
    async fn an_inbox_past_its_bound_in_changes_frees_them_and_reports_the_lag() {
        let inbox = inbox(2, 1 << 20);
        for version in 1..=4 {
            inbox.push(&change(version, 10));
        }
        assert!(inbox.lock().changes.is_empty());
        assert!(matches!(inbox.take().await, Err(PubSubError::Lagged { skipped: 4 })));
    }

    #[tokio::test]
    async fn an_inbox_past_its_bound_in_bytes_reports_the_lag() {
        let inbox = inbox(1000, 250);
        inbox.push(&change(1, 100));
        inbox.push(&change(2, 100));
        assert_eq!(inbox.take().await.unwrap().change.0.version, 1);
        inbox.push(&change(3, 100));
        // 200 bytes held: the next one passes 250.
        inbox.push(&change(4, 100));
        assert!(matches!(inbox.take().await, Err(PubSubError::Lagged { .. })));
    }

    #[tokio::test]
    async fn a_waiting_inbox_wakes_on_a_push() {
        let inbox = Arc::new(inbox(4, 1 << 20));
        let taking = tokio::spawn({
            let inbox = Arc::clone(&inbox);
            async move { inbox.take().await.map(|shared| shared.change.0.version) }
        });
        tokio::task::yield_now().await;
        inbox.push(&change(7, 10));
        assert_eq!(taking.await.unwrap().unwrap(), 7);
    }

    fn hub() -> Arc<Hub> {
        let options = HubOptions {
            broadcast_topic: "broadcast".into(),
            buffer: 16,
            buffer_bytes: 1 << 20,
            lookback: Duration::from_secs(60),
            lookback_bytes: 1 << 20,
            trace: None,
        };
        Arc::new(Hub { fanout: Mutex::default(), options, ready: watch::channel(false).0 })
    }

    fn record(room: &str, version: u64) -> Recent {
        use prost::Message as _;
        let at_millis = chrono::Utc::now().timestamp_millis();
        Recent { path: room.into(), payload: state_change(room, version).encode_to_vec(), at_millis }
    }

    /// Publishes `recent` as `receive` does, counting the decodes.
    fn publish(hub: &Hub, recent: Recent, decodes: &mut usize) {
        let now = chrono::Utc::now().timestamp_millis();
        hub.publish(recent, now, |recent| {
            *decodes += 1;
            let (change, bytes) = decode(&recent.payload, &recent.path).ok()?;
            Some(Arc::new(Shared { change, bytes, received: None }))
        });
    }

    fn versions(items: Vec<Result<(WireChange, usize), PubSubError>>) -> Vec<u64> {
        items.into_iter().map(|item| item.unwrap().0 .0.version).collect()
    }

    #[tokio::test]
    async fn a_record_is_decoded_only_for_a_watcher_and_a_later_joiner_replays_it() {
        let hub = hub();
        let mut watched = hub.feed(&Pattern::parse("app/a/room/w").unwrap());
        let mut decodes = 0;
        publish(&hub, record("app/a/room/u", 1), &mut decodes);
        assert_eq!(decodes, 0, "a record no watcher takes is kept as bytes");
        publish(&hub, record("app/a/room/w", 1), &mut decodes);
        assert_eq!(decodes, 1);
        assert_eq!(versions(vec![watched.next().await.unwrap()]), [1]);

        let mut joiner = hub.feed(&Pattern::parse("app/a/room/u").unwrap());
        publish(&hub, record("app/a/room/u", 2), &mut decodes);
        assert_eq!(decodes, 2);
        assert_eq!(versions(vec![joiner.next().await.unwrap(), joiner.next().await.unwrap()]), [1, 2]);
    }

    #[tokio::test]
    async fn a_wildcard_watcher_gets_every_matching_record_once_decoded() {
        let hub = hub();
        let mut every = hub.feed(&Pattern::parse("app/a/room/*").unwrap());
        let mut one = hub.feed(&Pattern::parse("app/a/room/w").unwrap());
        let mut decodes = 0;
        publish(&hub, record("app/a/room/w", 1), &mut decodes);
        publish(&hub, record("app/b/room/w", 1), &mut decodes);
        publish(&hub, record("app/a/room/v", 1), &mut decodes);
        assert_eq!(decodes, 2, "one decode per watched record, however many watchers take it");
        let got: Vec<_> = vec![every.next().await.unwrap(), every.next().await.unwrap()];
        let paths: Vec<String> = got.into_iter().map(|item| item.unwrap().0 .0.path).collect();
        assert_eq!(paths, ["app/a/room/w", "app/a/room/v"]);
        assert_eq!(versions(vec![one.next().await.unwrap()]), [1]);
    }

    #[tokio::test]
    async fn an_undecodable_record_kept_for_joiners_is_skipped_by_them() {
        let hub = hub();
        let mut decodes = 0;
        let mut garbage = record("app/a/room/u", 1);
        garbage.payload = vec![0xff, 0xff, 0xff];
        publish(&hub, garbage, &mut decodes);
        publish(&hub, record("app/a/room/u", 2), &mut decodes);
        let mut joiner = hub.feed(&Pattern::parse("app/a/room/u").unwrap());
        assert_eq!(versions(vec![joiner.next().await.unwrap()]), [2]);
    }
}
