//! Publishing to subjects: one Kafka record per message, keyed by the
//! subject's path so that every producer (omni, Java, Node) sends one path
//! to one partition and its messages stay in order.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use prost::Message as _;

use super::{check_topic, PubSubError};
use crate::kafka::KafkaSettings;
use crate::modules::timers::{check_lease, check_lease_id};
use crate::modules::{KEEPALIVE_TYPE, LEASE_HEADER, TYPE_HEADER};
use crate::path::Path;
use crate::proto::omni::{KeepAlive, Lease};

/// The header carrying a message's content type, as subscribers read it.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// How long `publish` waits for room in librdkafka's local queue; delivery
/// itself is bounded by `delivery.timeout.ms`.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// A lease to take with a `recording_started` event: unless kept alive
/// within each TTL, the job stops the recording by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLease {
    /// What keep-alives name.
    pub id: String,
    /// The encoded `omni.v1.Lease`: the value of the event record's [`LEASE_HEADER`].
    pub header: Vec<u8>,
}

impl NewLease {
    /// A lease with a fresh (UUID) id and a TTL of `ttl_ms`.
    pub fn fresh(ttl_ms: i64) -> Result<NewLease, PubSubError> {
        NewLease::with_id(uuid::Uuid::new_v4().to_string(), ttl_ms)
    }

    /// A lease named `id`. Both are checked as the job checks them (an id of
    /// 1 to 128 bytes, a TTL of 100 ms to 7 days), so a bad one fails here
    /// rather than being refused by the job after it was sent.
    pub fn with_id(id: String, ttl_ms: i64) -> Result<NewLease, PubSubError> {
        let lease = Lease { lease_id: id, ttl_ms };
        check_lease(&lease).map_err(|rejection| PubSubError::InvalidLease(rejection.message))?;
        let header = lease.encode_to_vec();
        Ok(NewLease { id: lease.lease_id, header })
    }

    /// The record header that carries it.
    pub fn record_header(&self) -> (&'static str, &[u8]) {
        (LEASE_HEADER, &self.header)
    }
}

/// The value of a keep-alive record renewing `lease_ids` (each checked as
/// the job checks it); the record goes to the job's input topic, keyed by the
/// room's path, with the [`KEEPALIVE_HEADER`].
pub fn keep_alive_payload(lease_ids: &[String]) -> Result<Vec<u8>, PubSubError> {
    for id in lease_ids {
        check_lease_id(id)
            .map_err(|rejection| PubSubError::InvalidLease(format!("lease id {id:?}: {}", rejection.message)))?;
    }
    Ok(KeepAlive { lease_ids: lease_ids.to_vec() }.encode_to_vec())
}

/// The header that marks a record as a keep-alive.
pub const KEEPALIVE_HEADER: (&str, &[u8]) = (TYPE_HEADER, KEEPALIVE_TYPE.as_bytes());

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

    /// Publishes an encoded Tecate `recording_started` event for room `path`
    /// to `topic` (the job's input topic), taking `lease`.
    pub async fn publish_leased(
        &self,
        topic: &str,
        path: &Path,
        event: &[u8],
        lease: &NewLease,
    ) -> Result<(i32, i64), PubSubError> {
        self.publish_with_headers(topic, path, event, &[lease.record_header()]).await
    }

    /// Publishes one keep-alive record renewing the leases `lease_ids` of room
    /// `path`, to `topic` (the job's input topic), keyed by the room's path so
    /// it is ordered with the room's events. An id the room no longer holds
    /// is a harmless no-op for the job.
    pub async fn keep_alive(&self, topic: &str, path: &Path, lease_ids: &[String]) -> Result<(i32, i64), PubSubError> {
        let payload = keep_alive_payload(lease_ids)?;
        self.publish_with_headers(topic, path, &payload, &[KEEPALIVE_HEADER]).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_lease_carries_its_id_and_ttl_in_its_header() {
        let lease = NewLease::fresh(5_000).unwrap();
        assert_eq!(uuid::Uuid::parse_str(&lease.id).map(|u| u.get_version_num()), Ok(4));
        let (key, value) = lease.record_header();
        assert_eq!(key, LEASE_HEADER);
        assert_eq!(Lease::decode(value).unwrap(), Lease { lease_id: lease.id.clone(), ttl_ms: 5_000 });
        assert_ne!(NewLease::fresh(5_000).unwrap().id, lease.id);
        assert_eq!(NewLease::with_id("l1".into(), 100).unwrap().id, "l1");
    }

    #[test]
    fn a_lease_the_job_would_refuse_is_refused_here() {
        for ttl_ms in [0, 99, 7 * 24 * 3600 * 1000 + 1] {
            let refused = NewLease::fresh(ttl_ms).unwrap_err();
            assert!(
                matches!(&refused, PubSubError::InvalidLease(reason) if reason.contains(&ttl_ms.to_string())),
                "{refused}"
            );
        }
        assert!(NewLease::with_id(String::new(), 1_000).is_err());
        assert!(NewLease::with_id("x".repeat(129), 1_000).is_err());
    }

    #[test]
    fn a_keep_alive_names_its_leases_and_refuses_a_bad_id() {
        let ids = vec!["l1".to_owned(), "l2".to_owned()];
        assert_eq!(KeepAlive::decode(&keep_alive_payload(&ids).unwrap()[..]).unwrap().lease_ids, ids);
        let refused = keep_alive_payload(&["ok".to_owned(), String::new()]).unwrap_err();
        assert!(refused.to_string().starts_with("lease id \"\""), "{refused}");
        assert_eq!(KEEPALIVE_HEADER, (TYPE_HEADER, KEEPALIVE_TYPE.as_bytes()));
    }
}
