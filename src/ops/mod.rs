//! The operations side of a running job: the endpoint serving Prometheus
//! metrics, liveness and readiness, and [`runner`], which runs a job with
//! that endpoint, so a binary of one's own (with modules of its own) keeps
//! everything `omni run` offers operators.

pub mod runner;

mod process;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::runtime::Health;

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
                .expect("static buckets are valid")
                .install_recorder()
                .expect("the metrics recorder is installed once")
        })
        .clone()
}

/// What start-up is waiting for, shown by `/readyz` until the job takes over.
#[derive(Debug, Default)]
pub struct StartUp {
    waiting_for: Mutex<Option<String>>,
}

impl StartUp {
    /// Says what start-up waits for (`None` once it waits for nothing).
    pub fn waiting_for(&self, reason: Option<String>) {
        *self.waiting_for.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = reason;
    }

    fn reason(&self) -> Option<String> {
        self.waiting_for.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

#[derive(Clone)]
struct Endpoint {
    metrics: PrometheusHandle,
    health: Arc<Health>,
    start_up: Arc<StartUp>,
}

/// Binds the endpoint and serves it in the background; returns the bound address.
pub async fn serve(listen: &str, health: Arc<Health>, start_up: Arc<StartUp>) -> std::io::Result<SocketAddr> {
    let endpoint = Endpoint { metrics: metrics_handle(), health, start_up };
    describe_metrics();
    let app = Router::new()
        .route("/metrics", get(|State(e): State<Endpoint>| async move { scrape(&e) }))
        .route(
            "/healthz",
            get(|State(e): State<Endpoint>| async move {
                match e.health.stall() {
                    None => (StatusCode::OK, "ok\n".to_owned()),
                    Some(stall) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "stalled: processing thread {} has been {} for {} s\n",
                            stall.thread, stall.stage, stall.for_secs
                        ),
                    ),
                }
            }),
        )
        .route(
            "/readyz/redis",
            get(|State(e): State<Endpoint>| async move {
                match e.health.redis_trouble() {
                    None if e.health.writes_redis() => (StatusCode::OK, "redis: ok\n".to_owned()),
                    None => (StatusCode::OK, "redis: not configured\n".to_owned()),
                    Some(trouble) => (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", redis_trouble(&trouble))),
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(e): State<Endpoint>| async move {
                if e.health.ready() {
                    // Redis trouble does not stop processing (writes wait for it), so
                    // the job stays ready; the body says so, and /readyz/redis fails.
                    let redis =
                        e.health.redis_trouble().map(|t| format!("; {}", redis_trouble(&t))).unwrap_or_default();
                    (StatusCode::OK, format!("ready: {} partitions{redis}\n", e.health.assigned()))
                } else if let Some(reason) = e.start_up.reason() {
                    (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n"))
                } else if let Some(stall) = e.health.stall() {
                    let why = format!(
                        "not ready: processing thread {} has been {} for {} s\n",
                        stall.thread, stall.stage, stall.for_secs
                    );
                    (StatusCode::SERVICE_UNAVAILABLE, why)
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready: joining the group or restoring\n".to_owned())
                }
            }),
        )
        .with_state(endpoint);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding the HTTP endpoint on {listen}: {e}")))?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP endpoint stopped");
        }
    });
    Ok(addr)
}

/// Renders `/metrics`, refreshing first what is sampled rather than counted:
/// the process figures and readiness (so an alert can see a not-ready
/// instance, which Prometheus cannot tell from `/readyz`).
fn scrape(endpoint: &Endpoint) -> String {
    process::record();
    metrics::gauge!("omni_ready").set(if endpoint.health.ready() { 1.0 } else { 0.0 });
    endpoint.metrics.render()
}

fn redis_trouble(trouble: &crate::view::RedisTrouble) -> String {
    format!(
        "redis: writes failing for {} s, {} rooms waiting: {}",
        trouble.for_secs, trouble.backlog_rooms, trouble.error
    )
}

/// Shows a progress bar on the terminal while partitions restore from their changelogs.
pub async fn restore_progress_bar(health: Arc<Health>) {
    let mut bar: Option<indicatif::ProgressBar> = None;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let (done, total) = health.restore_progress();
        match &bar {
            None if done < total => {
                let b = indicatif::ProgressBar::new(total);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "restoring {bar:40} {pos}/{len} records ({per_sec}, {eta})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b.set_position(done);
                bar = Some(b);
            }
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
                if done >= total {
                    b.finish_and_clear();
                    bar = None;
                }
            }
            None => {}
        }
    }
}

/// Registers help texts, and zeroes the unlabeled series so they show
/// before their first event (a labeled one shows with its first label: a
/// zero series without labels beside it would be a false one).
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    let counters = [
        ("omni_events_consumed_total", "Input records consumed.", false),
        ("omni_events_processed_total", "Events folded, per module.", true),
        ("omni_noops_total", "Events that changed nothing, per module.", true),
        ("omni_changes_emitted_total", "Effective changes broadcast, per module.", true),
        ("omni_dead_letters_total", "Records sent to the dead-letter topic, by error kind.", true),
        ("omni_dead_letters_dropped_total", "Refused records whose dead letter was refused too, dropped.", false),
        ("omni_transaction_aborts_total", "Aborted transactions.", false),
        ("omni_producer_rebuilds_total", "Producers rebuilt in place after a fencing.", false),
        ("omni_rebalances_total", "Partition assignments and revocations.", true),
        ("omni_redis_rooms_written_total", "Room writes applied to Redis.", false),
        ("omni_redis_write_errors_total", "Failed Redis pipelines and connection attempts (retried).", false),
        ("omni_redis_room_failures_total", "Room writes Redis refused (each room retried alone).", false),
        ("omni_redis_resyncs_total", "Times Redis was found to have lost data and was rewritten.", false),
        ("omni_redis_stream_entries_dropped_total", "Change-stream entries dropped past a write budget.", false),
        ("omni_restored_records_total", "Changelog records restored into the store.", false),
        ("omni_restore_retries_total", "Restore attempts that failed and were retried.", false),
        ("omni_produce_errors_total", "Records Kafka did not accept, by kind (refused, transient).", true),
        ("omni_keepalives_total", "Lease keep-alives processed, by result (renewed, unknown_lease).", true),
        ("omni_timer_expiries_total", "Module timers fired (leases expired), per module.", true),
        ("omni_timer_failures_total", "Module timers dropped because their timer fold failed, per module.", true),
    ];
    for (name, help, labeled) in counters {
        describe_counter!(name, help);
        if !labeled {
            metrics::counter!(name).increment(0);
        }
    }
    let gauges = [
        ("omni_consumer_lag", "Records behind the end of each input partition.", true),
        ("omni_restore_remaining_records", "Changelog records left to restore, per partition.", true),
        ("omni_redis_backlog_rooms", "Rooms waiting to be written to Redis.", false),
        ("omni_redis_backlog_bytes", "Bytes of writes waiting for Redis.", false),
        ("omni_rocksdb_memory_bytes", "RocksDB block cache and memtable memory.", false),
        ("omni_rocksdb_disk_bytes", "RocksDB SST files on disk.", false),
        ("omni_assigned_partitions", "Input partitions assigned to this instance.", false),
        ("omni_ready", "1 when /readyz answers 200: joined, every partition restored, no thread stalled.", false),
        ("omni_timers_pending", "Module timers pending in the consumed partitions.", false),
        ("omni_leases_active", "Leases pending (kept alive or not yet expired) in the consumed partitions.", false),
    ];
    for (name, help, labeled) in gauges {
        describe_gauge!(name, help);
        if !labeled {
            metrics::gauge!(name).set(0.0);
        }
    }
    describe_histogram!("omni_commit_seconds", "Time to commit one transaction.");
    describe_histogram!("omni_transaction_seconds", "Time from a transaction's first record to its commit.");
    describe_histogram!("omni_redis_write_seconds", "Time of one Redis pipeline.");
    describe_histogram!("omni_timer_lag_seconds", "How long after its deadline a module timer fired.");
    describe_gauge!("omni_build_info", "Always 1; the version of omni in its label.");
    metrics::gauge!("omni_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    process::describe();
}
