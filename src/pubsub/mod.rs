//! NATS-like publish/subscribe on Kafka (see the README's "Pub/sub" section).
//!
//! A subject is a room path's canonical text (`app/a1/room/r1`), and it is
//! also the Kafka record key. Because the [`Publisher`] partitions keys the
//! way the Java client does, every record about one path lands on one
//! partition, in order, whoever produced it. A [`Pattern`] picks subjects
//! with NATS wildcards: `app/*/room/r9`, `app/a1/>`.
//!
//! Three ways to read:
//! - [`Subscriber`]: every matching record, fan-out. It reads all partitions
//!   itself (no consumer group, never commits), from a start point that is
//!   resolved to concrete offsets before `subscribe` returns, so nothing
//!   published afterwards is missed.
//! - [`QueueSubscriber`]: NATS queue groups. Members of one queue share a
//!   Kafka consumer group, so each record goes to one member, and progress
//!   is committed.
//! - [`Follower`]: a late joiner to room state. It reads the current state
//!   of matching rooms from Redis, then follows the broadcast topic of state
//!   changes, closing the window between the two and repairing gaps, so each
//!   room's versions arrive contiguously.
//!
//! Kafka filters nothing by key, so a subscriber receives a whole topic and
//! drops what its pattern does not match; put unrelated traffic on separate
//! topics.
//!
//! ```no_run
//! use omni::kafka::KafkaSettings;
//! use omni::path::Path;
//! use omni::pubsub::{Pattern, Publisher, StartAt, Subscriber};
//!
//! # async fn demo() -> Result<(), omni::pubsub::PubSubError> {
//! let settings = KafkaSettings::with_brokers("localhost:9094");
//! let mut sub = Subscriber::subscribe(&settings, "chat", Pattern::parse("app/a1/>")?, StartAt::Latest).await?;
//! let publisher = Publisher::new(&settings, "chat")?;
//! publisher.publish(&Path::room("a1", "r1").unwrap(), b"hello").await?;
//! if let Some(delivery) = sub.next().await {
//!     let delivery = delivery?;
//!     assert_eq!(delivery.subject, "app/a1/room/r1");
//! }
//! # Ok(())
//! # }
//! ```

mod follow;
mod pattern;
mod publisher;
mod subscriber;

pub use follow::{
    broadcast_change, change_record, ChangeFeed, FollowEvent, FollowedChange, Follower, DEFAULT_LOOKBACK,
};
pub use pattern::Pattern;
pub use publisher::{keep_alive_payload, NewLease, Publisher, CONTENT_TYPE_HEADER, KEEPALIVE_HEADER};
pub use subscriber::{Delivery, QueueSubscriber, StartAt, Subscriber};

/// Errors of the pub/sub layer.
#[derive(Debug, thiserror::Error)]
pub enum PubSubError {
    #[error("invalid pattern {pattern:?}: {reason}")]
    InvalidPattern { pattern: String, reason: String },
    #[error("invalid topic name {0:?} (1 to 249 of a-z, A-Z, 0-9, '.', '_', '-'; not '.' or '..')")]
    InvalidTopic(String),
    #[error("invalid queue name {0:?} (non-empty, no control characters)")]
    InvalidQueue(String),
    #[error("{0}")]
    UnsupportedStart(&'static str),
    /// A lease or keep-alive the job would refuse: the reason.
    #[error("{0}")]
    InvalidLease(String),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    View(#[from] crate::view::ViewError),
    #[error("undecodable record at {topic}/{partition}@{offset}: {reason}")]
    Decode { topic: String, partition: i32, offset: i64, reason: String },
    /// A [`ChangeFeed`]'s reader fell further behind than its buffer holds.
    #[error("fell {skipped} changes behind the shared broadcast feed")]
    Lagged { skipped: u64 },
    #[error("background task failed: {0}")]
    Task(String),
    /// A [`Follower`] room whose gap Redis has not let it bridge for a long
    /// while; the follower keeps trying, and the room's next event is the
    /// catch-up.
    #[error(
        "room {path} is at version {version} on the broadcast, but redis {} after {waited:?}; still waiting",
        .redis_version.map_or("has no usable state for it".to_owned(), |v| format!("is at version {v}"))
    )]
    RedisBehind { path: String, version: u64, redis_version: Option<u64>, waited: std::time::Duration },
}

/// Checks a topic name against Kafka's rules before it reaches librdkafka,
/// whose Rust wrapper panics on names with a NUL byte.
pub(crate) fn check_topic(topic: &str) -> Result<(), PubSubError> {
    let valid = (1..=249).contains(&topic.len())
        && topic != "."
        && topic != ".."
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(PubSubError::InvalidTopic(topic.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        for good in ["omni.broadcast", "a", "A_b-9", &"x".repeat(249)] {
            assert!(check_topic(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a b", "a/b", "a\0b", "é", &"x".repeat(250)] {
            assert!(matches!(check_topic(bad), Err(PubSubError::InvalidTopic(_))), "{bad:?}");
        }
    }
}
