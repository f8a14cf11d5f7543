//! Waiting for a producer's records without oversleeping.
//!
//! rust-rdkafka's `BaseProducer::flush` (and so `commit_transaction`, which
//! flushes first) serves delivery reports in 100 ms naps, so every commit
//! would cost at least 100 ms. [`drain`] returns as soon as the broker has
//! acknowledged everything, which keeps commits as short as the round trips.

use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, Producer, ProducerContext};

/// Serves delivery reports until nothing is in flight, or fails after `timeout`.
pub fn drain<C: ProducerContext>(
    producer: &BaseProducer<C>,
    timeout: Duration,
) -> Result<(), rdkafka::error::KafkaError> {
    let deadline = Instant::now() + timeout;
    loop {
        producer.poll(Duration::ZERO);
        if producer.in_flight_count() == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(rdkafka::error::KafkaError::Flush(rdkafka::types::RDKafkaErrorCode::MessageTimedOut));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}
