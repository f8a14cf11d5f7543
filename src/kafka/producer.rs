//! Producing without oversleeping: sending through a full local queue, and
//! waiting for acknowledgements.
//!
//! rust-rdkafka's `BaseProducer::flush` (and so `commit_transaction`, which
//! flushes first) serves delivery reports in 100 ms naps, so every commit
//! would cost at least 100 ms. [`drain`] returns as soon as the broker has
//! acknowledged everything, which keeps commits as short as the round trips.

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};

/// Serves delivery reports until nothing is in flight, or fails after `timeout`.
pub fn drain<C: ProducerContext>(producer: &BaseProducer<C>, timeout: Duration) -> Result<(), KafkaError> {
    let deadline = Instant::now() + timeout;
    loop {
        producer.poll(Duration::ZERO);
        if producer.in_flight_count() == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::MessageTimedOut));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Sends a record; while the local queue is full, serves delivery reports and tries again.
pub fn send<C: ProducerContext>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'_, [u8], [u8], C::DeliveryOpaque>,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                producer.poll(Duration::ZERO);
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}
