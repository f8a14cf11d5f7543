//! The ceiling: a stateless job that copies the input to an output topic
//! with the same consumer, producer settings, transactions and commit
//! interval as omni, but no fold, store or Redis.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// Copies `total` records from `input` to `output`; returns events per second.
pub fn run(
    brokers: &str,
    input: &str,
    output: &str,
    total: u64,
    commit_interval: Duration,
    id: &str,
) -> anyhow::Result<f64> {
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{id}-passthrough"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "cooperative-sticky");
    omni::kafka::bound_prefetch(&mut config, omni::runtime::PREFETCH_KIB);
    let consumer: BaseConsumer = config.create()?;
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("transactional.id", format!("{id}-passthrough"))
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("batch.size", "262144")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.kbytes", "65536")
        .create()?;
    producer.init_transactions(Duration::from_secs(30))?;
    let started = Instant::now();
    consumer.subscribe(&[input])?;
    let mut copied = 0u64;
    let mut offsets: std::collections::BTreeMap<i32, i64> = Default::default();
    let mut open_since: Option<Instant> = None;
    while copied < total || open_since.is_some() {
        if copied < total {
            if let Some(message) = consumer.poll(Duration::from_millis(5)) {
                let message = message?;
                if open_since.is_none() {
                    producer.begin_transaction()?;
                    open_since = Some(Instant::now());
                }
                let mut record = BaseRecord::to(output).partition(message.partition());
                if let Some(key) = message.key() {
                    record = record.key(key);
                }
                if let Some(value) = message.payload() {
                    record = record.payload(value);
                }
                omni::kafka::send(&producer, record)?;
                offsets.insert(message.partition(), message.offset() + 1);
                copied += 1;
            }
        }
        omni::kafka::serve_ready(&producer);
        let due = open_since.is_some_and(|since| since.elapsed() >= commit_interval || copied >= total);
        if due {
            let mut list = TopicPartitionList::new();
            for (partition, next) in &offsets {
                list.add_partition_offset(input, *partition, Offset::Offset(*next))?;
            }
            omni::kafka::commit_transaction(&producer, &consumer, &list, Duration::from_secs(30))?;
            open_since = None;
        }
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
