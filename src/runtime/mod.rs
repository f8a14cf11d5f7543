//! The processing job's runtime: the consume, fold and commit loop.
//!
//! [`run`] wires a topology to Kafka, the state store and Redis, and runs
//! until `shutdown` resolves: then it finishes the open transaction, hands
//! the last writes to Redis, and closes the store. All I/O lives here; the
//! folds in [`crate::modules`] stay pure.

mod backpressure;
mod changelog;
mod clock;
mod context;
mod counters;
mod dead_letters;
mod engine;
mod fencing;
mod health;
mod lag;
mod offsets;
mod output;
mod progress;
mod reconcile;
mod restore;
mod standby;
mod thread;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::kafka::{ensure_topics_with, max_message_bytes, wait_for_topic, KafkaError, TopicSpec};
use crate::modules::{Registry, RegistryError, RoomFolder};
use crate::store::{RocksStore, StoreError};
use crate::topology::Topology;
use crate::view::{spawn_writer, KeyLayout, RedisTarget, WriterOptions};

pub use output::{
    HEADER_ERROR_KIND, HEADER_ERROR_MESSAGE, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, HEADER_SOURCE_TOPIC,
};

pub use health::Health;
pub use progress::{Stall, STALL_AFTER};
pub use standby::member_instance;

use changelog::{Changelog, Claims};
use engine::Topics;
use health::ThreadHealth;
use reconcile::{Rewriter, StoreRooms};
use standby::Standby;
use thread::{Member, Shared, StreamThread};

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
    #[error("a record of the transaction was not delivered; it must be aborted")]
    TransactionFailed,
    #[error(
        "producer {transactional_id} was fenced {fencings} times within ten minutes ({reason}); \
         does another instance run with the same instance id?"
    )]
    Fenced { transactional_id: String, fencings: usize, reason: String },
}

/// Caps glibc's malloc arenas at two. RocksDB and librdkafka allocate
/// through glibc from many threads of their own, and glibc gives each
/// thread an arena of its own (up to eight per core) that keeps freed memory:
/// the memory bench measured 20-40 MiB of peak RSS in them. Rust's own heap
/// is mimalloc's and does not care. Called before those threads start.
fn bound_c_heap_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of glibc's allocator; any value is
    // valid for M_ARENA_MAX, and a refusal (0) leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
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
    bound_c_heap_arenas();
    let folder = RoomFolder::new(registry.select(&topology.modules)?, topology.limits.clone());
    let topics = prepare_topics(&topology).await?;

    let redis = match topology.redis.url.as_str() {
        "" => None,
        url => Some(connect_redis(url).await?),
    };
    let store_dir = topology.store.dir.clone();
    let store_options = topology.store.memory;
    let store = tokio::task::spawn_blocking(move || RocksStore::open(&store_dir, store_options))
        .await
        .map_err(|e| RuntimeError::Invalid(format!("opening the store: {e}")))??;
    let (redis_writer, redis_task) = match redis {
        Some(client) => {
            let limits = &topology.limits;
            let options = WriterOptions {
                keys: KeyLayout::new(&topology.redis.key_prefix),
                stream_max_len: topology.redis.stream_max_len,
                batch_rooms: 512,
                backlog_bytes: limits.redis_backlog_bytes,
                write_bytes: limits.redis_write_bytes,
                closed_stream_retention: Duration::from_secs(limits.closed_stream_retention_secs),
            };
            let stored = StoreRooms { store: store.clone(), folder: folder.clone() };
            let (writer, task) = spawn_writer(client, options, Some(Arc::new(stored)));
            health.watch_redis(writer.status());
            (Some(writer), Some(task))
        }
        None => (None, None),
    };
    let rewriter = redis_writer.as_ref().map(|writer| Rewriter {
        store: store.clone(),
        folder: folder.clone(),
        writer: writer.clone(),
    });

    let instance_id = match topology.instance.id.as_str() {
        "" => uuid::Uuid::new_v4().to_string(),
        id => id.to_owned(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let claims = Arc::new(Claims::default());
    let standby = spawn_standby(&topology, &topics, &instance_id, &store, &claims, &stop)?;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    health.threads.store(topology.instance.threads, Ordering::Relaxed);
    let mut spawned = Ok(());
    for thread in 0..topology.instance.threads {
        let member = Member { id: format!("{}-{instance_id}-{thread}", topology.application_id), thread };
        let shared = Shared {
            topology: topology.clone(),
            folder: folder.clone(),
            topics: topics.clone(),
            store: Arc::clone(&store),
            redis: redis_writer.clone(),
            rewriter: rewriter.clone(),
            health: Arc::clone(&health),
            claims: Arc::clone(&claims),
        };
        let (stop, done) = (Arc::clone(&stop), done_tx.clone());
        spawned = std::thread::Builder::new()
            .name(format!("omni-processor-{thread}"))
            .spawn(move || {
                // A thread that died must still report, or the others would run on without it.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    StreamThread::start(shared, member, &stop)?.run()
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
    drop((redis_writer, rewriter, done_tx));

    let watchdog = tokio::spawn(watch_for_stalls(Arc::clone(&health)));
    let lag_watcher = {
        let (settings, group, input) = (topology.kafka.clone(), topology.application_id.clone(), topics.input.clone());
        let (health, stop) = (Arc::clone(&health), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("omni-lag".into())
            .spawn(move || lag::watch(&settings, &group, &input, &health.positions, &stop))
            .map_err(|e| RuntimeError::Invalid(format!("spawning the lag watcher: {e}")))?
    };
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

    watchdog.abort();
    let _ = tokio::task::spawn_blocking(move || (lag_watcher.join(), standby.map(|s| s.join()))).await;
    if let Some(task) = redis_task {
        // The writer drains what it holds once the threads dropped their handles.
        if tokio::time::timeout(Duration::from_secs(10), task).await.is_err() {
            tracing::warn!("redis writes still pending at exit; the next start reconciles them");
        }
    }
    result
}

/// Starts following the partitions this instance stands by for, when
/// `instance.standby_replicas` asks for copies.
fn spawn_standby(
    topology: &Topology,
    topics: &Topics,
    instance_id: &str,
    store: &Arc<RocksStore>,
    claims: &Arc<Claims>,
    stop: &Arc<AtomicBool>,
) -> Result<Option<std::thread::JoinHandle<()>>, RuntimeError> {
    let replicas = topology.instance.standby_replicas;
    if replicas == 0 {
        return Ok(None);
    }
    let changelog = Changelog {
        settings: topology.kafka.clone(),
        topic: topics.changelog.clone(),
        store: store.clone(),
        claims: Arc::clone(claims),
    };
    let standby = Standby::new(
        changelog,
        topology.application_id.clone(),
        topics.input.clone(),
        format!("{}-{instance_id}", topology.application_id),
        replicas,
    )?;
    let stop = Arc::clone(stop);
    std::thread::Builder::new()
        .name("omni-standby".into())
        .spawn(move || standby.run(&stop))
        .map(Some)
        .map_err(|e| RuntimeError::Invalid(format!("spawning the standby thread: {e}")))
}

/// Logs a processing thread that is stuck in one step, once per stall.
async fn watch_for_stalls(health: Arc<Health>) {
    let mut reported = None;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let stall = health.stall();
        if let Some(stall) = &stall {
            if reported.as_ref().map(|r: &Stall| (r.thread, r.stage)) != Some((stall.thread, stall.stage)) {
                tracing::error!(
                    thread = stall.thread,
                    stage = stall.stage,
                    seconds = stall.for_secs,
                    "a processing thread has made no progress; /healthz now fails"
                );
            }
        } else if reported.is_some() {
            tracing::info!("the stalled processing thread made progress again");
        }
        reported = stall;
    }
}

/// Opens a Redis client and checks it once: bad credentials fail the start,
/// while an unreachable server only delays writes until it is back.
async fn connect_redis(url: &str) -> Result<RedisTarget, RuntimeError> {
    let client = RedisTarget::open(url)?;
    let probe = tokio::time::timeout(Duration::from_secs(5), async {
        let mut conn = client.connect().await?;
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

/// Input prefetched per instance, in KiB, shared by its processing threads.
pub const PREFETCH_KIB: usize = 2048;

/// How long start-up waits for a topic to be served.
const TOPIC_WAIT: Duration = Duration::from_secs(30);

/// Creates missing topics: the input with the configured partition count,
/// the outputs and the changelog with as many partitions as the input, so a
/// room's records share a partition number everywhere.
async fn prepare_topics(topology: &Topology) -> Result<Topics, RuntimeError> {
    let settings = &topology.kafka;
    let input = topology.input_topic().to_owned();
    if topology.create_topics {
        let input = TopicSpec { name: input.clone(), partitions: topology.partitions, configs: vec![] };
        ensure_topics_with(settings, &topology.topics, &[input]).await?;
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
        batch_bytes: output::batch_bytes(usize::MAX),
        dead_letter_record_bytes: topology.limits.max_record_bytes,
    };
    // A room at every tag limit, its JSON escaped, can pass the broker's 1 MiB default.
    let large_records = vec![("max.message.bytes", "8388608".to_owned())];
    let mut changelog_configs = topology.topics.changelog_configs();
    changelog_configs.push(("max.message.bytes", "8388608".to_owned()));
    if topology.create_topics {
        ensure_topics_with(
            settings,
            &topology.topics,
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
    // Only the demo runs without exactly-once, on librdkafka's mock cluster,
    // which serves no DescribeConfigs: the check would time out its start.
    let (smallest, dead_letter_takes) = match topology.exactly_once {
        true => check_record_sizes(topology, &topics).await?,
        false => (usize::MAX, usize::MAX),
    };
    Ok(Topics {
        batch_bytes: output::batch_bytes(smallest),
        dead_letter_record_bytes: output::dead_letter_record_bytes(dead_letter_takes),
        ..topics
    })
}

/// Refuses to start when an output topic cannot take the largest record
/// the limits allow: every such record would be refused by the broker and
/// dead-lettered, which a configuration mistake should not cause. Returns
/// the smallest `max.message.bytes` among them, and the dead-letter topic's.
async fn check_record_sizes(topology: &Topology, topics: &Topics) -> Result<(usize, usize), RuntimeError> {
    let largest = output::largest_records(&topology.limits);
    let wanted = [
        (topics.changelog.as_str(), largest.changelog, "limits.max_room_state_bytes"),
        (topics.broadcast.as_str(), largest.broadcast, "limits.max_room_state_bytes and limits.max_record_bytes"),
        (topics.dead_letter.as_str(), largest.dead_letter, "limits.max_record_bytes"),
    ];
    let names: Vec<&str> = wanted.iter().map(|(topic, ..)| *topic).collect();
    let sizes = max_message_bytes(&topology.kafka, &names).await?;
    let smallest = sizes.iter().map(|(_, takes)| *takes).min().unwrap_or(usize::MAX);
    let dead_letter_takes = sizes.last().map_or(usize::MAX, |(_, takes)| *takes);
    for ((topic, needed, limits), (_, takes)) in wanted.iter().zip(sizes) {
        if takes < *needed {
            return Err(RuntimeError::Invalid(format!(
                "topic {topic} takes records of at most {takes} bytes (max.message.bytes), but {limits} allow records of {needed} bytes: raise the topic's max.message.bytes or lower the limits"
            )));
        }
    }
    Ok((smallest, dead_letter_takes))
}
