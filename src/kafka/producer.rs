//! Producing without oversleeping: serving delivery reports, sending through
//! a full local queue, waiting for acknowledgements, and committing a
//! transaction.
//!
//! rust-rdkafka's `BaseProducer::poll(Duration::ZERO)` serves one event, and
//! each event is the delivery report of one batch: a loop that polls once per
//! turn and then sleeps falls behind as soon as more batches complete per
//! turn than it serves, and its reports hold the local queue full. Its
//! `flush` (and so `commit_transaction`, which flushes first) serves reports
//! in 100 ms naps, so every commit would cost at least 100 ms. And a timed
//! `poll` spins through its last partial millisecond, as librdkafka waits in
//! whole ones. [`serve_ready`] serves every report that is ready, and
//! [`drain`] returns as soon as the broker has acknowledged everything, which
//! keeps commits as short as the round trips.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext, PurgeConfig};
use rdkafka::TopicPartitionList;

/// How long [`drain`] naps between turns of serving reports.
const DRAIN_NAP: Duration = Duration::from_micros(250);
/// How many times a retriable step of a transaction commit is tried.
const COMMIT_ATTEMPTS: usize = 5;
/// A commit slower than this is logged with the time of each of its steps.
const SLOW_COMMIT: Duration = Duration::from_secs(1);

/// Serves every event that is ready now, without waiting.
pub fn serve_ready<C: ProducerContext>(producer: &BaseProducer<C>) {
    // A served delivery report takes its messages out of the in-flight
    // count, so a count that stops falling means nothing more is ready.
    let mut in_flight = producer.in_flight_count();
    while in_flight > 0 {
        producer.poll(Duration::ZERO);
        let now = producer.in_flight_count();
        if now >= in_flight {
            return;
        }
        in_flight = now;
    }
}

/// Sends every batch that waits out `linger.ms` now, as a commit wants:
/// librdkafka skips the linger while a flush is under way, and wakes its
/// broker threads for it. Waits at most a millisecond for them.
pub fn send_lingering<C: ProducerContext>(producer: &BaseProducer<C>) {
    // rust-rdkafka's `flush` ends its flush before the broker threads wake
    // up (no linger skipped) whenever anything is still in flight.
    // SAFETY: the handle is the live producer's own; rd_kafka_flush is thread-safe.
    unsafe {
        rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), 1);
    }
}

/// Serves delivery reports until nothing is in flight, or fails after `timeout`.
pub fn drain<C: ProducerContext>(producer: &BaseProducer<C>, timeout: Duration) -> Result<(), KafkaError> {
    let deadline = Instant::now() + timeout;
    loop {
        serve_ready(producer);
        if producer.in_flight_count() == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::MessageTimedOut));
        }
        std::thread::sleep(DRAIN_NAP);
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
                serve_ready(producer);
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Commits the open transaction with the consumed `offsets`: sends what
/// lingers, adds the offsets with the group metadata (so a zombie is fenced)
/// while the records are still being acknowledged, so both round trips
/// overlap, waits for every acknowledgement and commits, retrying a
/// retriable commit. Each blocking call may take `timeout`.
pub fn commit_transaction<P: ProducerContext, C: ConsumerContext>(
    producer: &BaseProducer<P>,
    consumer: &BaseConsumer<C>,
    offsets: &TopicPartitionList,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let started = Instant::now();
    send_lingering(producer);
    if offsets.count() > 0 {
        let group = consumer.group_metadata().ok_or(KafkaError::Canceled)?;
        retried("sending the offsets", || producer.send_offsets_to_transaction(offsets, &group, timeout))?;
    }
    let offsets_sent = started.elapsed();
    drain(producer, timeout)?;
    let drained = started.elapsed();
    let result = retried("committing", || producer.commit_transaction(timeout));
    if started.elapsed() > SLOW_COMMIT {
        tracing::warn!(
            offsets_ms = offsets_sent.as_millis() as u64,
            drain_ms = (drained - offsets_sent).as_millis() as u64,
            commit_ms = (started.elapsed() - drained).as_millis() as u64,
            "slow transaction commit"
        );
    }
    result
}

/// Runs one step of a commit, again while it fails with a retriable error.
fn retried(step: &str, mut call: impl FnMut() -> Result<(), KafkaError>) -> Result<(), KafkaError> {
    let mut attempt = 1;
    loop {
        match call() {
            Err(e) if attempt < COMMIT_ATTEMPTS && is_retriable(&e) => {
                tracing::warn!(error = %e, attempt, step, "a step of the transaction commit failed; retrying");
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Aborts the open transaction while serving delivery reports. librdkafka's
/// abort waits for the records in flight to be acknowledged or to fail, and
/// their reports must be served meanwhile, or the abort times out ("the
/// event queue must be polled"). Queued records are purged first: the abort
/// would only drop them.
pub fn abort_transaction<C>(producer: &BaseProducer<C>, timeout: Duration) -> Result<(), KafkaError>
where
    C: ProducerContext + Sync,
{
    producer.purge(PurgeConfig::default().queue());
    let aborted = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let abort = scope.spawn(|| {
            let result = producer.abort_transaction(timeout);
            aborted.store(true, Ordering::Release);
            result
        });
        while !aborted.load(Ordering::Acquire) {
            serve_ready(producer);
            std::thread::sleep(DRAIN_NAP * 4);
        }
        abort.join().unwrap_or(Err(KafkaError::Canceled))
    })
}

/// Whether the broker refused a record for what it is (too large for the
/// topic, malformed), so sending it again would fail again.
pub fn refused_by_broker(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

fn is_retriable(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(t) => t.is_retriable(),
        KafkaError::Flush(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{DeliveryResult, ProducerContext};
    use rdkafka::ClientContext;

    use super::*;

    #[derive(Clone, Default)]
    struct Acked(Arc<AtomicUsize>);

    impl ClientContext for Acked {}

    impl ProducerContext for Acked {
        type DeliveryOpaque = ();
        fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
            if result.is_ok() {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    #[test]
    fn drain_serves_the_delivery_report_of_every_batch() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("drained", 16, 1).unwrap();
        let acked = Acked::default();
        let producer: BaseProducer<Acked> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("linger.ms", "50")
            .create_with_context(acked.clone())
            .unwrap();
        // One record per partition per round: every batch has its own report.
        for round in 0..5 {
            for partition in 0..16 {
                let payload = format!("{round}-{partition}");
                send(&producer, BaseRecord::to("drained").partition(partition).payload(payload.as_bytes())).unwrap();
            }
            send_lingering(&producer);
        }
        drain(&producer, Duration::from_secs(30)).unwrap();
        assert_eq!(producer.in_flight_count(), 0);
        assert_eq!(acked.0.load(Ordering::Relaxed), 80, "every record was acknowledged and its report served");
        serve_ready(&producer);
        assert_eq!(producer.in_flight_count(), 0, "serving with nothing in flight is a no-op");
    }
}
