//! One processing thread, as Kafka Streams' `StreamThread`: a group member
//! with its own consumer and transactional producer, running
//! [`StreamThread::run_once`] until it is told to stop, and recovering from
//! what goes wrong on the way.
//!
//! Every failure gets one classification: a transaction that failed is
//! aborted and the input rewound to the committed offsets (a broker that
//! restarts, a request that timed out, a record the broker refused); a
//! fenced producer, or one whose aborts keep failing, is replaced by a new
//! one under the same transactional id; anything else (the store, a
//! misconfiguration, a fatal producer error that is not a fencing) ends the
//! job, since a retry would meet it again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::Producer;

use super::changelog::{Changelog, Claims};
use super::context::{self, JobContext};
use super::engine::{Engine, Topics};
use super::fencing::FencingBudget;
use super::health::Health;
use super::offsets::OffsetsReader;
use super::output::{self, JobProducer};
use super::progress::{Stage, ThreadProgress};
use super::reconcile::Rewriter;
use super::restore::Restores;
use super::RuntimeError;
use crate::modules::RoomFolder;
use crate::store::{RocksStore, StateStore};
use crate::topology::Topology;
use crate::view::RedisWriter;

/// Records between two rounds of restore checks, delivery reports and usage metrics.
const HOUSEKEEPING_EVERY: u32 = 64;

/// How long `init_transactions` may take, at start-up and after a fencing.
const INIT_TRANSACTIONS_TIMEOUT: Duration = Duration::from_secs(60);

/// Failed aborts in a row after which the producer is replaced instead.
const ABORTS_BEFORE_REBUILD: u32 = 3;

/// Longest pause between two recoveries that follow each other without a commit.
const MOST_BACKOFF: Duration = Duration::from_secs(5);

/// One processing thread's identity in the consumer group and towards the
/// transaction coordinator. Stable across restarts for a configured
/// instance id, so a restarted thread fences its previous self at once.
pub(super) struct Member {
    /// `<application_id>-<instance id>-<thread>`: the transactional id, and
    /// the `group.instance.id` under static membership.
    pub id: String,
    pub thread: usize,
}

/// What the instance shares with each of its processing threads.
pub(super) struct Shared {
    pub topology: Topology,
    pub folder: RoomFolder,
    pub topics: Topics,
    pub store: Arc<RocksStore>,
    pub redis: Option<RedisWriter>,
    /// Rewrites rooms from the store to Redis, when Redis is on.
    pub rewriter: Option<Rewriter>,
    pub health: Arc<Health>,
    /// The partitions this instance owns, kept from its standby.
    pub claims: Arc<Claims>,
}

pub(super) struct StreamThread<'a> {
    shared: Shared,
    member: Member,
    stop: &'a AtomicBool,
    consumer: BaseConsumer<JobContext>,
    engine: Arc<Mutex<Engine>>,
    progress: Arc<ThreadProgress>,
    fencings: FencingBudget,
    /// Pause before the next recovery; grows while recoveries follow each
    /// other with no commit between them (a broker that is down).
    backoff: Duration,
    /// Commits and traced refusals the engine had made at the last recovery.
    progress_at_recovery: (u64, u64),
    since_housekeeping: u32,
}

impl<'a> StreamThread<'a> {
    /// Builds the thread's producer, engine and consumer, and joins the group.
    pub(super) fn start(shared: Shared, member: Member, stop: &'a AtomicBool) -> Result<Self, RuntimeError> {
        let progress = Arc::new(ThreadProgress::new(member.thread));
        progress.enter(Stage::Polling);
        shared.health.watch(Arc::clone(&progress));
        let topology = &shared.topology;
        let producer = new_producer(&shared, &member)?;
        let (restore_tx, restore_rx) = mpsc::channel();
        let store: Arc<dyn StateStore> = shared.store.clone();
        let changelog = Changelog {
            settings: topology.kafka.clone(),
            topic: shared.topics.changelog.clone(),
            store: Arc::clone(&store),
            claims: Arc::clone(&shared.claims),
        };
        let offsets = OffsetsReader::new(&topology.kafka, &topology.application_id, &shared.topics.input)?;
        let restores = Restores::new(
            changelog,
            offsets,
            format!("{}-restore", topology.application_id),
            Arc::clone(&shared.health),
            shared.rewriter.clone(),
            restore_tx,
        )?;
        let engine = Engine::new(
            shared.folder.clone(),
            store,
            producer,
            shared.redis.clone(),
            shared.topics.clone(),
            topology.exactly_once,
            topology.commit_interval(),
            Arc::clone(&shared.health),
            restores,
            restore_rx,
            topology.limits.room_cache_bytes / topology.instance.threads,
            Arc::clone(&progress),
            shared.rewriter.clone(),
        );
        let engine = Arc::new(Mutex::new(engine));
        let context = JobContext {
            engine: Arc::clone(&engine),
            input: shared.topics.input.clone(),
            progress: Arc::clone(&progress),
        };
        let consumer: BaseConsumer<JobContext> = consumer_config(topology, &member).create_with_context(context)?;
        consumer.subscribe(&[&shared.topics.input])?;
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
        tracing::info!(input = %shared.topics.input, group = %topology.application_id, "processing");
        Ok(StreamThread {
            shared,
            member,
            stop,
            consumer,
            engine,
            progress,
            fencings: FencingBudget::default(),
            backoff: Duration::ZERO,
            progress_at_recovery: (0, 0),
            since_housekeeping: 0,
        })
    }

    /// Processes until told to stop or a failure that cannot be recovered
    /// from, then leaves the group and closes.
    pub(super) fn run(mut self) -> Result<(), RuntimeError> {
        let result = loop {
            match self.run_until_stopped() {
                Ok(()) => break Ok(()),
                Err(error) => {
                    if let Err(fatal) = self.recover(error) {
                        break Err(fatal);
                    }
                }
            }
        };
        self.close(result)
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        context::lock(&self.engine)
    }

    /// Runs the loop until a stop is asked for, then commits what is open.
    fn run_until_stopped(&mut self) -> Result<(), RuntimeError> {
        let mut timeout = Duration::from_millis(100);
        while !self.stop.load(Ordering::Relaxed) {
            timeout = self.run_once(timeout)?;
        }
        self.progress.enter(Stage::Stopping);
        let mut engine = self.engine();
        engine.stopping = true;
        engine.commit(&self.consumer)
    }

    /// One turn: poll a record and fold it, do the housekeeping that is due,
    /// and commit when the interval is up. Returns the next poll's timeout.
    fn run_once(&mut self, timeout: Duration) -> Result<Duration, RuntimeError> {
        self.progress.enter(Stage::Polling);
        let polled = self.consumer.poll(timeout);
        let idle = polled.is_none();
        let mut engine = context::lock(&self.engine);
        if let Some(failure) = engine.failure.take() {
            return Err(failure);
        }
        match polled {
            Some(Ok(message)) => {
                self.progress.enter(Stage::Processing);
                engine.process(&message)?;
            }
            Some(Err(e)) => {
                // A fatal consumer error (another member took this one's
                // static id, say) leaves a consumer that never gets records.
                if let Some((code, reason)) = self.consumer.client().fatal_error() {
                    return Err(RuntimeError::Invalid(format!("the consumer failed fatally ({code:?}): {reason}")));
                }
                tracing::warn!(error = %e, "consumer error");
            }
            None => {}
        }
        // Housekeeping every few records, not every one: on the hot path
        // each of these is a clock read or a call into librdkafka.
        self.since_housekeeping += 1;
        if idle || self.since_housekeeping >= HOUSEKEEPING_EVERY {
            self.since_housekeeping = 0;
            engine.check_delivery()?;
            engine.finish_restores(&self.consumer)?;
            if let Ok(positions) = self.consumer.position() {
                self.shared.health.positions.advanced(self.progress.thread(), &positions);
                engine.release_timers(&positions);
            }
            engine.fire_due_timers()?;
            engine.resync_if_redis_lost_data();
            engine.apply_backpressure(&self.consumer)?;
            crate::kafka::serve_ready(&engine.producer);
            engine.report_store_usage();
        }
        let now = Instant::now();
        if engine.commit_due(now) {
            engine.commit(&self.consumer)?;
        }
        Ok(engine.poll_timeout(now))
    }

    /// Recovers from a failure, or returns the error that ends the job.
    /// A broker that stays away keeps it here, retrying with back-off.
    fn recover(&mut self, mut error: RuntimeError) -> Result<(), RuntimeError> {
        let recoverable = matches!(error, RuntimeError::Client(_) | RuntimeError::TransactionFailed);
        if !recoverable || !self.shared.topology.exactly_once {
            return Err(error);
        }
        self.pause_between_recoveries();
        let mut failed_aborts = 0;
        let mut replace = false;
        loop {
            self.progress.enter(Stage::Recovering);
            if self.stop.load(Ordering::Relaxed) {
                self.drop_open_transaction();
                return Ok(());
            }
            if !replace {
                replace = self.producer_needs_replacing(&error, failed_aborts)?;
            }
            let attempt = if replace {
                self.rebuild_producer()
            } else {
                tracing::warn!(%error, "transaction failed; aborting it and rewinding to the committed offsets");
                let consumer = &self.consumer;
                context::lock(&self.engine).abort(consumer, &[])
            };
            match attempt {
                Ok(()) => return Ok(()),
                Err(next) if transient(&next) => {
                    tracing::warn!(error = %next, replace, "recovery failed; retrying");
                    failed_aborts += u32::from(!replace);
                    error = next;
                    self.pause_between_recoveries();
                }
                Err(next) => return Err(next),
            }
        }
    }

    /// Whether only a new producer can go on: a fenced one (within the
    /// fencing budget), or one whose aborts keep failing. A fatal producer
    /// error that is not a fencing ends the job.
    fn producer_needs_replacing(&mut self, error: &RuntimeError, failed_aborts: u32) -> Result<bool, RuntimeError> {
        let (fencing, fatal) = {
            let engine = self.engine();
            (engine.producer_fencing(), engine.producer.client().fatal_error())
        };
        if let Some(fencing) = fencing {
            let fencings = self.fencings.record(Instant::now());
            if fencings > FencingBudget::MOST {
                return Err(RuntimeError::Fenced {
                    transactional_id: self.member.id.clone(),
                    fencings,
                    reason: fencing,
                });
            }
            tracing::warn!(%error, %fencing, transactional_id = %self.member.id, "producer fenced; rebuilding it and restoring the partitions");
            return Ok(true);
        }
        if let Some((code, reason)) = fatal {
            tracing::error!(?code, %reason, "the producer failed fatally");
            return Err(RuntimeError::Invalid(format!("the producer failed fatally ({code:?}): {reason}")));
        }
        if failed_aborts >= ABORTS_BEFORE_REBUILD {
            tracing::warn!(%error, "aborts keep failing; replacing the producer");
            return Ok(true);
        }
        Ok(false)
    }

    /// Stopping mid-recovery: what is open can only be dropped, and the
    /// partitions' next owners read it again from the committed offsets.
    fn drop_open_transaction(&mut self) {
        let mut engine = self.engine();
        engine.closing = true;
        if let Err(e) = engine.abort_open() {
            tracing::warn!(error = %e, "could not abort the open transaction; it times out instead");
            // Forgotten all the same, or the last commit would try it again.
            engine.discard_open();
        }
    }

    /// Waits before a recovery that follows another with no progress
    /// between them (no commit, no refused record traced to its input),
    /// longer each time, so a broker that is down is not hammered.
    fn pause_between_recoveries(&mut self) {
        let progress = {
            let engine = self.engine();
            (engine.commits, engine.refusals.traced)
        };
        if progress != self.progress_at_recovery {
            self.progress_at_recovery = progress;
            self.backoff = Duration::ZERO;
        }
        let deadline = Instant::now() + self.backoff;
        while Instant::now() < deadline && !self.stop.load(Ordering::Relaxed) {
            self.progress.enter(Stage::Recovering);
            // Polling keeps the group membership alive; records it returns
            // are dropped, as the rewind that follows reads them again.
            let _ = self.consumer.poll(Duration::from_millis(100));
            if let Some(failure) = self.engine().failure.take() {
                tracing::warn!(error = %failure, "a rebalance failed while recovering");
            }
        }
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(100), MOST_BACKOFF);
    }

    /// Replaces the producer with a new one under the same transactional id
    /// (its initialisation aborts whatever the old one left open), and
    /// starts every partition over from its committed offset and changelog.
    fn rebuild_producer(&mut self) -> Result<(), RuntimeError> {
        let producer = new_producer(&self.shared, &self.member)?;
        producer.init_transactions(INIT_TRANSACTIONS_TIMEOUT)?;
        let consumer = &self.consumer;
        context::lock(&self.engine).replace_producer(producer, consumer)?;
        metrics::counter!("omni_producer_rebuilds_total").increment(1);
        tracing::info!(transactional_id = %self.member.id, "producer rebuilt; processing goes on");
        Ok(())
    }

    /// Leaves the group (after a clean run) and closes the engine.
    fn close(self, result: Result<(), RuntimeError>) -> Result<(), RuntimeError> {
        self.progress.enter(Stage::Stopping);
        if result.is_ok() {
            // Leave the group now, serving the revoke it triggers, so partitions
            // move to the other instances without waiting for a session timeout.
            self.consumer.unsubscribe();
            for _ in 0..40 {
                self.consumer.poll(Duration::from_millis(50));
                if self.consumer.assignment().map_or(true, |a| a.count() == 0) {
                    break;
                }
            }
        }
        {
            let mut engine = self.engine();
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
        drop(self.consumer);
        result
    }
}

/// Whether a failed recovery step is worth another try: anything a Kafka
/// client reports (a broker away, a timeout) but a refused authorisation,
/// which a retry would meet again.
fn transient(error: &RuntimeError) -> bool {
    use rdkafka::types::RDKafkaErrorCode;
    let RuntimeError::Client(e) = error else { return false };
    !matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
        )
    )
}

fn new_producer(shared: &Shared, member: &Member) -> Result<JobProducer, RuntimeError> {
    let topology = &shared.topology;
    output::create_producer(
        topology.kafka.producer_config(),
        &shared.topics.changelog,
        topology.exactly_once.then_some(member.id.as_str()),
        Duration::from_millis(topology.instance.transaction_timeout_ms),
        &topology.limits,
        shared.topics.batch_bytes,
    )
}

fn consumer_config(topology: &Topology, member: &Member) -> rdkafka::ClientConfig {
    let mut config = topology.kafka.client_config();
    config.set("session.timeout.ms", "10000").set("heartbeat.interval.ms", "1000");
    // Memory stays flat however far behind the job is; the instance's
    // threads share one budget.
    crate::kafka::bound_prefetch(&mut config, (super::PREFETCH_KIB / topology.instance.threads).max(512));
    for (key, value) in &topology.kafka.properties {
        config.set(key, value);
    }
    config
        // Names the member's instance in the group's description, where
        // standby replicas look for who owns what.
        .set("client.id", &member.id)
        .set("group.id", &topology.application_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "cooperative-sticky");
    if topology.instance.static_membership {
        config.set("group.instance.id", &member.id);
    }
    config
}
