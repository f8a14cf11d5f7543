//! The processing job's runtime: the consume, fold and commit loop.
//!
//! [`run`] wires a topology to Kafka, the state store and Redis, and runs
//! until `shutdown` resolves: then it finishes the open transaction, hands
//! the last writes to Redis, and closes the store. All I/O lives here; the
//! folds in [`crate::modules`] stay pure.

mod clock;
mod context;
mod counters;
mod engine;
mod fencing;
mod output;
mod restore;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::Producer;

use crate::kafka::{ensure_topics, wait_for_topic, KafkaError, TopicSpec};
use crate::modules::{Registry, RegistryError, RoomFolder};
use crate::store::{RocksStore, StoreError};
use crate::topology::Topology;
use crate::view::{spawn_writer, KeyLayout, WriterOptions};

pub use output::{
    HEADER_ERROR_KIND, HEADER_ERROR_MESSAGE, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, HEADER_SOURCE_TOPIC,
};

use context::JobContext;
use engine::{Engine, Topics};
use fencing::FencingBudget;
use restore::Restores;

/// Why the job stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Modules(#[from] RegistryError),
    #[error("redis at start-up: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "producer {transactional_id} was fenced {fencings} times within ten minutes ({reason}); \
         does another instance run with the same instance id?"
    )]
    Fenced { transactional_id: String, fencings: usize, reason: String },
}

/// Liveness and readiness, read by the operations endpoint, summed over the
/// instance's processing threads.
#[derive(Debug, Default)]
pub struct Health {
    threads: AtomicUsize,
    joined: AtomicUsize,
    assigned: AtomicUsize,
    restoring: AtomicUsize,
    restore_total: AtomicU64,
    restore_done: AtomicU64,
}

/// One processing thread's share of [`Health`].
#[derive(Debug, Default)]
struct ThreadHealth {
    joined: bool,
    assigned: usize,
    restoring: usize,
}

impl Health {
    fn mark_joined(&self, thread: &mut ThreadHealth) {
        if !std::mem::replace(&mut thread.joined, true) {
            self.joined.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn set_partitions(&self, thread: &mut ThreadHealth, assigned: usize, restoring: usize) {
        self.assigned.fetch_add(assigned, Ordering::Relaxed);
        self.assigned.fetch_sub(std::mem::replace(&mut thread.assigned, assigned), Ordering::Relaxed);
        self.restoring.fetch_add(restoring, Ordering::Relaxed);
        self.restoring.fetch_sub(std::mem::replace(&mut thread.restoring, restoring), Ordering::Relaxed);
        metrics::gauge!("omni_assigned_partitions").set(self.assigned() as f64);
    }

    /// Ready once every processing thread joined the group and every assigned partition is restored.
    pub fn ready(&self) -> bool {
        let threads = self.threads.load(Ordering::Relaxed);
        threads > 0 && self.joined.load(Ordering::Relaxed) == threads && self.restoring.load(Ordering::Relaxed) == 0
    }

    pub fn assigned(&self) -> usize {
        self.assigned.load(Ordering::Relaxed)
    }

    /// Changelog records restored so far and to restore in all, since start-up.
    pub fn restore_progress(&self) -> (u64, u64) {
        (self.restore_done.load(Ordering::Relaxed), self.restore_total.load(Ordering::Relaxed))
    }

    fn restore_planned(&self, records: u64) {
        self.restore_total.fetch_add(records, Ordering::Relaxed);
    }

    fn restore_advanced(&self, records: u64) {
        self.restore_done.fetch_add(records, Ordering::Relaxed);
    }
}

/// Runs the job described by `topology` until `shutdown` resolves or an error stops it.
pub async fn run(
    topology: Topology,
    registry: Registry,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RuntimeError> {
    topology.validate().map_err(|e| RuntimeError::Invalid(e.to_string()))?;
    let folder = RoomFolder::new(registry.select(&topology.modules)?, topology.limits.clone());
    let topics = prepare_topics(&topology).await?;

    let redis = match topology.redis.url.as_str() {
        "" => None,
        url => Some(connect_redis(url).await?),
    };
    let (redis_writer, redis_task) = match redis {
        Some(client) => {
            let options = WriterOptions {
                keys: KeyLayout::new(&topology.redis.key_prefix),
                stream_max_len: topology.redis.stream_max_len,
                batch_rooms: 512,
                max_pending_changes: 50_000,
            };
            let (writer, task) = spawn_writer(client, options);
            (Some(writer), Some(task))
        }
        None => (None, None),
    };

    let store_dir = topology.store.dir.clone();
    let store_options = topology.store.memory;
    let store = tokio::task::spawn_blocking(move || RocksStore::open(&store_dir, store_options))
        .await
        .map_err(|e| RuntimeError::Invalid(format!("opening the store: {e}")))??;
    let instance_id = match topology.instance.id.as_str() {
        "" => uuid::Uuid::new_v4().to_string(),
        id => id.to_owned(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    health.threads.store(topology.instance.threads, Ordering::Relaxed);
    let mut spawned = Ok(());
    for thread in 0..topology.instance.threads {
        let member = Member { id: format!("{}-{instance_id}-{thread}", topology.application_id), thread };
        let (topology, folder, topics, store) = (topology.clone(), folder.clone(), topics.clone(), Arc::clone(&store));
        let (redis, health, stop, done) =
            (redis_writer.clone(), Arc::clone(&health), Arc::clone(&stop), done_tx.clone());
        spawned = std::thread::Builder::new()
            .name(format!("omni-processor-{thread}"))
            .spawn(move || {
                // A thread that died must still report, or the others would run on without it.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    processing_loop(topology, member, folder, topics, store, redis, health, &stop)
                }))
                .unwrap_or_else(|_| Err(RuntimeError::Invalid(format!("processor thread {thread} panicked"))));
                let _ = done.send(result);
            })
            .map(drop)
            .map_err(|e| RuntimeError::Invalid(format!("spawning processor thread {thread}: {e}")));
        if spawned.is_err() {
            break;
        }
    }
    // Only the threads hold writer handles now: the writer stops once they all did.
    drop((redis_writer, done_tx));

    // The first thread to stop, on an error or not, stops the others.
    tokio::pin!(shutdown);
    let first = match spawned {
        Err(e) => Some(Err(e)),
        Ok(()) => tokio::select! {
            result = done_rx.recv() => result,
            () = &mut shutdown => {
                tracing::info!("shutting down: finishing the open transactions");
                None
            }
        },
    };
    stop.store(true, Ordering::Relaxed);
    let mut result = first.unwrap_or(Ok(()));
    while let Some(thread_result) = done_rx.recv().await {
        if result.is_ok() {
            result = thread_result;
        }
    }

    if let Some(task) = redis_task {
        // The writer drains what it holds once the threads dropped their handles.
        if tokio::time::timeout(Duration::from_secs(10), task).await.is_err() {
            tracing::warn!("redis writes still pending at exit; the next start reconciles them");
        }
    }
    result
}

/// One processing thread's identity in the consumer group and towards the
/// transaction coordinator. Stable across restarts for a configured
/// instance id, so a restarted thread fences its previous self at once.
struct Member {
    /// `<application_id>-<instance id>-<thread>`: the transactional id, and
    /// the `group.instance.id` under static membership.
    id: String,
    thread: usize,
}

/// Opens a Redis client and checks it once: bad credentials fail the start,
/// while an unreachable server only delays writes until it is back.
async fn connect_redis(url: &str) -> Result<redis::Client, RuntimeError> {
    let client = redis::Client::open(url)?;
    let probe = tokio::time::timeout(Duration::from_secs(5), async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    })
    .await;
    match probe {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) if is_auth_error(&e) => Err(e.into()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "redis is not reachable yet; processing continues and writes wait for it");
            Ok(client)
        }
        Err(_) => {
            tracing::warn!("redis did not answer within 5 s; processing continues and writes wait for it");
            Ok(client)
        }
    }
}

fn is_auth_error(e: &redis::RedisError) -> bool {
    let text = e.to_string();
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || text.contains("WRONGPASS")
        || text.contains("NOPERM")
        || text.contains("NOAUTH")
}

/// Records between two rounds of restore checks, delivery reports and usage metrics.
const HOUSEKEEPING_EVERY: u32 = 64;

/// Input prefetched per instance, in KiB, shared by its processing threads.
pub const PREFETCH_KIB: usize = 2048;

/// How long `init_transactions` may take, at start-up and after a fencing.
const INIT_TRANSACTIONS_TIMEOUT: Duration = Duration::from_secs(60);

/// How long start-up waits for a topic to be served.
const TOPIC_WAIT: Duration = Duration::from_secs(30);

/// Creates missing topics: the input with the configured partition count,
/// the outputs and the changelog with as many partitions as the input, so a
/// room's records share a partition number everywhere.
async fn prepare_topics(topology: &Topology) -> Result<Topics, RuntimeError> {
    let settings = &topology.kafka;
    let input = topology.input_topic().to_owned();
    if topology.create_topics {
        ensure_topics(settings, &[TopicSpec { name: input.clone(), partitions: topology.partitions, configs: vec![] }])
            .await?;
    }
    // A topic created moments ago may not have leaders yet.
    let partitions = wait_for_topic(settings, &input, TOPIC_WAIT)
        .await?
        .ok_or_else(|| RuntimeError::Invalid(format!("input topic {input} does not exist")))?;
    let topics = Topics {
        input,
        changelog: topology.changelog_topic(),
        broadcast: topology.broadcast_topic.clone(),
        dead_letter: topology.dead_letter_topic.clone(),
    };
    // A room at every tag limit, its JSON escaped, can pass the broker's 1 MiB default.
    let large_records = vec![("max.message.bytes", "8388608".to_owned())];
    let changelog_configs = vec![
        ("cleanup.policy", "compact".to_owned()),
        ("max.message.bytes", "8388608".to_owned()),
        ("min.compaction.lag.ms", "0".to_owned()),
    ];
    if topology.create_topics {
        ensure_topics(
            settings,
            &[
                TopicSpec { name: topics.changelog.clone(), partitions, configs: changelog_configs },
                TopicSpec { name: topics.broadcast.clone(), partitions, configs: large_records.clone() },
                TopicSpec { name: topics.dead_letter.clone(), partitions, configs: large_records },
            ],
        )
        .await?;
    }
    for topic in [&topics.changelog, &topics.broadcast] {
        let count = wait_for_topic(settings, topic, TOPIC_WAIT).await?.unwrap_or(0);
        if count != partitions {
            return Err(RuntimeError::Invalid(format!(
                "topic {topic} has {count} partitions but the input has {partitions}; they must match so rooms stay co-partitioned"
            )));
        }
    }
    Ok(topics)
}

#[allow(clippy::too_many_arguments)]
fn processing_loop(
    topology: Topology,
    member: Member,
    folder: RoomFolder,
    topics: Topics,
    store: Arc<RocksStore>,
    redis: Option<crate::view::RedisWriter>,
    health: Arc<Health>,
    stop: &AtomicBool,
) -> Result<(), RuntimeError> {
    let new_producer = || {
        output::create_producer(
            topology.kafka.producer_config(),
            &topics.changelog,
            topology.exactly_once.then_some(member.id.as_str()),
            Duration::from_millis(topology.instance.transaction_timeout_ms),
        )
    };
    let producer = new_producer()?;

    let (restore_tx, restore_rx) = mpsc::channel();
    let store: Arc<dyn crate::store::StateStore> = store;
    let restores = Restores::new(
        topology.kafka.clone(),
        format!("{}-restore", topology.application_id),
        topics.changelog.clone(),
        Arc::clone(&store),
        Arc::clone(&health),
        redis.clone().map(|writer| (folder.clone(), writer)),
        restore_tx,
    )?;
    let engine = Engine::new(
        folder,
        Arc::clone(&store),
        producer,
        redis,
        topics.clone(),
        topology.exactly_once,
        topology.commit_interval(),
        Arc::clone(&health),
        restores,
        restore_rx,
    );
    let engine = Arc::new(Mutex::new(engine));
    let context = JobContext { engine: Arc::clone(&engine), input: topics.input.clone() };

    let mut config = topology.kafka.client_config();
    config
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", "5000");
    // Memory stays flat however far behind the job is; the instance's
    // threads share one budget.
    crate::kafka::bound_prefetch(&mut config, (PREFETCH_KIB / topology.instance.threads).max(512));
    for (key, value) in &topology.kafka.properties {
        config.set(key, value);
    }
    config
        .set("group.id", &topology.application_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "cooperative-sticky");
    if topology.instance.static_membership {
        config.set("group.instance.id", &member.id);
    }
    let consumer: BaseConsumer<JobContext> = config.create_with_context(context)?;
    consumer.subscribe(&[&topics.input])?;
    // The group join goes on in the background meanwhile: assignments only
    // reach the engine through the first poll, after this.
    if topology.exactly_once {
        // Also aborts whatever a previous incarnation left open.
        context::lock(&engine).producer.init_transactions(INIT_TRANSACTIONS_TIMEOUT)?;
    }
    tracing::info!(
        thread = member.thread,
        transactional_id = topology.exactly_once.then_some(member.id.as_str()),
        exactly_once = topology.exactly_once,
        "producer ready"
    );
    tracing::info!(input = %topics.input, group = %topology.application_id, "processing");

    let run = || {
        let mut timeout = Duration::from_millis(100);
        let mut since_housekeeping = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let polled = consumer.poll(timeout);
            let idle = polled.is_none();
            let mut engine = context::lock(&engine);
            if let Some(failure) = engine.failure.take() {
                return Err(failure);
            }
            match polled {
                Some(Ok(message)) => match engine.process(&message) {
                    // A record Kafka would not take poisons the transaction
                    // (librdkafka then refuses every send until it is aborted):
                    // abort, rewind, and read the input again.
                    Err(RuntimeError::Client(e)) if topology.exactly_once => {
                        tracing::warn!(error = %e, "produce failed; aborting the transaction and rewinding");
                        engine.abort(&consumer, &[])?;
                    }
                    other => other?,
                },
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                None => {}
            }
            // Housekeeping every few records, not every one: on the hot path
            // each of these is a clock read or a call into librdkafka.
            since_housekeeping += 1;
            if idle || since_housekeeping >= HOUSEKEEPING_EVERY {
                since_housekeeping = 0;
                engine.finish_restores(&consumer)?;
                crate::kafka::serve_ready(&engine.producer);
                engine.report_store_usage();
            }
            let now = Instant::now();
            if engine.commit_due(now) {
                engine.commit(&consumer)?;
            }
            timeout = engine.poll_timeout(now);
        }
        let mut engine = context::lock(&engine);
        engine.stopping = true;
        engine.commit(&consumer)
    };
    // A fenced producer is rebuilt in place, as Kafka Streams does, unless
    // fencings come so often that another instance must hold the same id.
    let mut fencings = FencingBudget::default();
    let result = loop {
        let (error, fencing) = match run() {
            Err(error @ RuntimeError::Client(_)) if topology.exactly_once => {
                match context::lock(&engine).producer_fencing() {
                    Some(fencing) => (error, fencing),
                    None => break Err(error),
                }
            }
            other => break other,
        };
        let fencings = fencings.record(Instant::now());
        if fencings > FencingBudget::MOST {
            break Err(RuntimeError::Fenced { transactional_id: member.id.clone(), fencings, reason: fencing });
        }
        tracing::warn!(%error, %fencing, transactional_id = %member.id, "producer fenced; rebuilding it and restoring the partitions");
        let rebuilt = new_producer().and_then(|producer| {
            producer.init_transactions(INIT_TRANSACTIONS_TIMEOUT)?;
            context::lock(&engine).replace_producer(producer, &consumer)
        });
        if let Err(error) = rebuilt {
            break Err(error);
        }
        metrics::counter!("omni_producer_rebuilds_total").increment(1);
        tracing::info!(transactional_id = %member.id, "producer rebuilt; processing goes on");
    };
    if result.is_ok() {
        // Leave the group now, serving the revoke it triggers, so partitions
        // move to the other instances without waiting for a session timeout.
        consumer.unsubscribe();
        for _ in 0..40 {
            consumer.poll(Duration::from_millis(50));
            if consumer.assignment().map_or(true, |a| a.count() == 0) {
                break;
            }
        }
    }
    {
        let mut engine = context::lock(&engine);
        if result.is_err() {
            // Whatever the open transaction holds must not commit now: the
            // revoke that closing the consumer triggers would otherwise commit
            // part of it, without its changelog or offsets.
            engine.closing = true;
            if let Err(e) = engine.abort_open() {
                tracing::warn!(error = %e, "could not abort the open transaction; it times out instead");
            }
        }
        engine.shutdown();
    }
    drop(consumer);
    result
}
