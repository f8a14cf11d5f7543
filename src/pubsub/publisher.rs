//! Publishing to subjects: one Kafka record per message, keyed by the
//! subject's path so that every producer (omni, Java, Node) sends one path
//! to one partition and its messages stay in order.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{check_topic, PubSubError};
use crate::kafka::KafkaSettings;
use crate::path::Path;

/// The header carrying a message's content type, as subscribers read it.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// How long `publish` waits for room in librdkafka's local queue; delivery
/// itself is bounded by `delivery.timeout.ms`.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes messages to subjects, with an idempotent producer so retries
/// never duplicate or reorder a path's messages.
///
/// ```no_run
/// use omni::kafka::KafkaSettings;
/// use omni::path::Path;
/// use omni::pubsub::Publisher;
///
/// # async fn demo() -> Result<(), omni::pubsub::PubSubError> {
/// let publisher = Publisher::new(&KafkaSettings::with_brokers("localhost:9094"), "chat")?;
/// let room = Path::room("a1", "r1").unwrap();
/// let (partition, offset) = publisher.publish(&room, b"hello").await?;
/// publisher.publish_to("chat.json", &room, br#"{"text":"hi"}"#, Some("application/json")).await?;
/// # Ok(())
/// # }
/// ```
pub struct Publisher {
    producer: FutureProducer,
    default_topic: String,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("default_topic", &self.default_topic).finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher whose [`publish`](Publisher::publish) sends to `default_topic`.
    ///
    /// Connecting is lazy: a broker that is down shows up as errors from
    /// `publish` (after `delivery.timeout.ms`), not here. Publishing must run
    /// on a Tokio runtime.
    pub fn new(settings: &KafkaSettings, default_topic: impl Into<String>) -> Result<Publisher, PubSubError> {
        let default_topic = default_topic.into();
        check_topic(&default_topic)?;
        let producer = settings.producer_config().set("enable.idempotence", "true").create()?;
        Ok(Publisher { producer, default_topic })
    }

    /// The topic [`publish`](Publisher::publish) sends to.
    pub fn default_topic(&self) -> &str {
        &self.default_topic
    }

    /// Publishes `payload` on subject `path` to the default topic, returning
    /// the partition and offset once the broker has acknowledged it.
    pub async fn publish(&self, path: &Path, payload: &[u8]) -> Result<(i32, i64), PubSubError> {
        self.send(&self.default_topic, path, payload, &[]).await
    }

    /// Publishes to `topic`, optionally with a [`CONTENT_TYPE_HEADER`] header.
    pub async fn publish_to(
        &self,
        topic: &str,
        path: &Path,
        payload: &[u8],
        content_type: Option<&str>,
    ) -> Result<(i32, i64), PubSubError> {
        check_topic(topic)?;
        let headers: Vec<(&str, &[u8])> =
            content_type.map(|c| (CONTENT_TYPE_HEADER, c.as_bytes())).into_iter().collect();
        self.send(topic, path, payload, &headers).await
    }

    /// Publishes to `topic` with the given headers (omni's own input
    /// messages, a lease or a keep-alive, travel in headers).
    pub async fn publish_with_headers(
        &self,
        topic: &str,
        path: &Path,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<(i32, i64), PubSubError> {
        check_topic(topic)?;
        self.send(topic, path, payload, headers).await
    }

    async fn send(
        &self,
        topic: &str,
        path: &Path,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<(i32, i64), PubSubError> {
        let key = path.to_string();
        let mut record = FutureRecord::to(topic).key(key.as_bytes()).payload(payload);
        if !headers.is_empty() {
            let owned = headers
                .iter()
                .fold(OwnedHeaders::new(), |all, &(key, value)| all.insert(Header { key, value: Some(value) }));
            record = record.headers(owned);
        }
        match self.producer.send(record, QUEUE_TIMEOUT).await {
            Ok(delivery) => {
                tracing::trace!(topic, subject = %key, partition = delivery.partition, offset = delivery.offset, "published");
                Ok((delivery.partition, delivery.offset))
            }
            Err((error, _)) => {
                tracing::debug!(topic, subject = %key, %error, "publish failed");
                Err(error.into())
            }
        }
    }

    /// Waits up to `timeout` for every queued message to be delivered.
    ///
    /// This blocks the calling thread; from async code, call it through
    /// `tokio::task::block_in_place` or before shutting down.
    pub fn flush(&self, timeout: Duration) -> Result<(), PubSubError> {
        Ok(self.producer.flush(timeout)?)
    }
}
