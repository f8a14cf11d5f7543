//! The server streams: `Watch` (a follower over the shared broadcast hub)
//! and `Subscribe` (raw pub/sub records). A watch is polled directly by its
//! connection, so a client that does not read leaves its changes in its hub
//! inbox, falls behind and ends with `RESOURCE_EXHAUSTED`. A subscription
//! runs as a task feeding a small channel, so a client that does not read
//! pushes back on its Kafka consumer. Both end with `UNAVAILABLE` when the
//! service shuts down.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::convert::{redis_timeout, watch_event, WireChange};
use super::state::{Shared, StreamSlot};
use super::trace::{DeliveryTrace, Mark};
use crate::proto::omni::{self as pb, start};
use crate::pubsub::{FollowEvent, Follower, Pattern, PubSubError, StartAt, Subscriber};

pub type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Messages queued per stream before its task waits for the client.
const STREAM_QUEUE: usize = 16;

fn parse_pattern(text: &str) -> Result<Pattern, Status> {
    Pattern::parse(text).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn shutting_down() -> Status {
    Status::unavailable("omni serve is shutting down; reconnect")
}

/// Sends one item unless the client left or the service stops; false to end the stream.
async fn deliver<T>(tx: &mpsc::Sender<Result<T, Status>>, shared: &Shared, item: Result<T, Status>) -> bool {
    let mut shutdown = shared.shutdown.clone();
    tokio::select! {
        sent = tx.send(item) => sent.is_ok(),
        _ = shutdown.wait_for(|stop| *stop) => {
            let _ = tx.try_send(Err(shutting_down()));
            false
        }
    }
}

/// The active-watcher gauge, decremented when the watch ends however it ends.
struct Watching;

impl Watching {
    fn new() -> Watching {
        metrics::gauge!("omni_service_watchers").increment(1.0);
        Watching
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        metrics::gauge!("omni_service_watchers").decrement(1.0);
    }
}

pub async fn watch(
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    deadline: std::time::Duration,
    request: pb::WatchRequest,
) -> Result<EventStream<pb::WatchEvent>, Status> {
    let pattern = parse_pattern(&request.pattern)?;
    if shared.stopping() {
        return Err(shutting_down());
    }
    let slot = shared.open_stream(peer)?;
    if tokio::time::timeout(deadline, shared.hub.wait_ready()).await.is_err() {
        return Err(Status::unavailable(format!(
            "the broadcast topic {} is not readable yet",
            shared.topology.broadcast_topic
        )));
    }
    // Every watcher reads through the service's one multiplexed connection,
    // so ten thousand watchers are not ten thousand Redis clients.
    let start = async {
        let connection = shared.connection().await.ok();
        let feed = shared.hub.feed(&pattern);
        Follower::from_feed(feed, shared.redis_client.clone(), connection, shared.keys.clone(), pattern).await
    };
    let follower = tokio::time::timeout(deadline, start).await.map_err(|_| redis_timeout(deadline))?;
    let follower = follower.map_err(|e| Status::unavailable(e.to_string()))?;
    let shutdown = shared.shutdown.clone();
    let trace = shared.trace.clone();
    let watcher = Watcher { _slot: slot, _watching: Watching::new(), follower, shutdown, trace, ended: false };
    // The stream is the follower itself, polled by the connection as the
    // client reads (no task or queue of its own): a client that does not read
    // leaves its changes in its hub inbox, which bounds them.
    Ok(Box::pin(futures::stream::unfold(watcher, |mut watcher| async move {
        if watcher.ended {
            return None;
        }
        let event = watcher.next_event().await;
        watcher.ended = event.is_err();
        Some((event, watcher))
    })))
}

/// One `Watch` stream's state.
struct Watcher {
    _slot: StreamSlot,
    _watching: Watching,
    follower: Follower<WireChange>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    trace: Option<Arc<DeliveryTrace>>,
    /// The stream ended with an error status.
    ended: bool,
}

impl Watcher {
    /// The next event, or the status that ends the stream.
    async fn next_event(&mut self) -> Result<pb::WatchEvent, Status> {
        loop {
            let next = tokio::select! {
                next = self.follower.next() => next,
                _ = self.shutdown.wait_for(|stop| *stop) => return Err(shutting_down()),
            };
            return match next {
                Some(Ok(event)) => Ok(self.message(event)),
                Some(Err(PubSubError::Lagged { skipped })) => {
                    metrics::counter!("omni_service_watchers_dropped_total", "reason" => "lagged").increment(1);
                    tracing::info!(pattern = %self.follower.pattern(), skipped, "a watcher fell behind; ending its stream");
                    Err(Status::resource_exhausted(format!(
                        "this watcher fell further behind than its buffer holds (service.watch_buffer changes or \
                         service.watch_buffer_bytes bytes; {skipped} skipped); watch again, or resume each room \
                         with GetDeltas from its last version"
                    )))
                }
                Some(Err(error @ PubSubError::RedisBehind { .. })) => {
                    // The follower keeps waiting for Redis; the room's next event is its catch-up.
                    tracing::warn!(%error, "a watched room waits for redis");
                    continue;
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "a watcher's follower failed; going on");
                    continue;
                }
                None => Err(Status::unavailable("the shared broadcast feed ended; reconnect")),
            };
        }
    }
}

impl Watcher {
    fn message(&self, event: FollowEvent<WireChange>) -> pb::WatchEvent {
        if matches!(event, FollowEvent::Resynchronised(_)) {
            // A room's gap that its change stream could not fill.
            metrics::counter!("omni_service_watchers_resynchronised_total").increment(1);
        }
        let Some(trace) = &self.trace else { return watch_event(event) };
        let change = matches!(event, FollowEvent::Change(_)).then(|| (event.path().to_owned(), event.version()));
        let message = watch_event(event);
        if let Some((path, version)) = change {
            trace.note(Mark::Sent, &path, version);
        }
        message
    }
}

fn start_at(start: Option<pb::Start>) -> StartAt {
    match start.and_then(|s| s.at) {
        None | Some(start::At::Latest(_)) => StartAt::Latest,
        Some(start::At::Earliest(_)) => StartAt::Earliest,
        Some(start::At::TimestampMs(ms)) => StartAt::Timestamp(ms),
    }
}

pub async fn subscribe(
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    request: pb::SubscribeRequest,
) -> Result<EventStream<pb::SubscribeRecord>, Status> {
    if !shared.topology.service.pubsub_topics.contains(&request.topic) {
        return Err(Status::permission_denied(format!(
            "topic {:?} is not one of the service's pubsub_topics",
            request.topic
        )));
    }
    let pattern = parse_pattern(&request.pattern)?;
    if shared.stopping() {
        return Err(shutting_down());
    }
    let slot = shared.open_stream(peer)?;
    let wait = std::time::Duration::from_millis(shared.topology.service.publish_timeout_ms);
    let subscribing = Subscriber::subscribe(&shared.kafka, &request.topic, pattern, start_at(request.start));
    let subscriber = tokio::time::timeout(wait, subscribing)
        .await
        .map_err(|_| {
            Status::unavailable(format!("topic {} is not readable within {} ms", request.topic, wait.as_millis()))
        })?
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    tokio::spawn(relay(shared, slot, subscriber, tx));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

async fn relay(
    shared: Arc<Shared>,
    _slot: StreamSlot,
    mut subscriber: Subscriber,
    tx: mpsc::Sender<Result<pb::SubscribeRecord, Status>>,
) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let next = tokio::select! {
            next = subscriber.next() => next,
            _ = shutdown.wait_for(|stop| *stop) => {
                let _ = tx.try_send(Err(shutting_down()));
                return;
            }
            () = tx.closed() => return,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => {
                tracing::warn!(%error, "a subscription failed to read; going on");
                continue;
            }
            None => {
                let _ = deliver(&tx, &shared, Err(Status::unavailable("the subscription ended; reconnect"))).await;
                return;
            }
        };
        let record = pb::SubscribeRecord {
            path: delivery.subject,
            topic: delivery.topic,
            partition: delivery.partition,
            offset: delivery.offset,
            timestamp: delivery.timestamp_millis.map(crate::proto::timestamp_from_millis),
            payload: delivery.payload,
            content_type: delivery.content_type.unwrap_or_default(),
        };
        if !deliver(&tx, &shared, Ok(record)).await {
            return;
        }
    }
}
