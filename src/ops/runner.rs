//! Runs a processing job the way `omni run` does: the operations endpoint
//! (`/metrics`, `/healthz`, `/readyz`) first, then a wait for the Kafka
//! brokers that says, with back-off, which brokers cannot be reached, then
//! the job until a shutdown signal, and a close bounded in time.
//!
//! A binary of one's own, registering a module of its own, is a few lines:
//!
//! ```no_run
//! use omni::modules::Registry;
//! use omni::ops::runner;
//! use omni::topology::{topology_file, Layers, Topology};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let registry = Registry::with_builtins(); // .register(MyModule)
//!     let file = topology_file(None)?; // OMNI_TOPOLOGY, or topologies/room-state.toml
//!     let topology = Topology::load_layered(&file, &Layers::from_env()?, &registry)?;
//!     runner::run(topology, registry, runner::shutdown_signal()).await?;
//!     Ok(())
//! }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::StartUp;
use crate::kafka::KafkaSettings;
use crate::modules::Registry;
use crate::runtime::{Health, RuntimeError};
use crate::topology::Topology;

/// How long the job may take to stop once the shutdown signal came: it
/// finishes its open transaction and hands its last writes to Redis, which
/// takes milliseconds; past this, something hangs (a client's close), and
/// the runner gives up on it. Stopping there is safe: only committed state
/// was ever stored, and the next start picks up from the committed offsets.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long one check that the brokers answer may take.
const BROKER_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest wait between two checks of unreachable brokers.
const MOST_BROKER_BACKOFF: Duration = Duration::from_secs(60);

/// Why a job run by the runner stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("operations endpoint: {0}")]
    Endpoint(#[from] std::io::Error),
    #[error("processing job failed: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("the job did not stop within {} s of the shutdown signal; stopping without it", .0.as_secs())]
    StopTimedOut(Duration),
    #[error("the job's task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A job started by [`start`]: its endpoint's address and health, and its task.
#[derive(Debug)]
pub struct Job {
    /// Where `/metrics`, `/healthz` and `/readyz` answer.
    pub addr: SocketAddr,
    /// What `/healthz` and `/readyz` report.
    pub health: Arc<Health>,
    task: JoinHandle<Result<(), RuntimeError>>,
    signalled: watch::Receiver<bool>,
}

impl Job {
    /// Waits for the job to end: on its own (an error), or once the shutdown
    /// signal came, for at most [`SHUTDOWN_GRACE`] more.
    pub async fn wait(mut self) -> Result<(), RunError> {
        tokio::select! {
            result = &mut self.task => return Ok(result??),
            _ = self.signalled.wait_for(|signalled| *signalled) => {}
        }
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await {
            Ok(result) => Ok(result??),
            Err(_) => Err(RunError::StopTimedOut(SHUTDOWN_GRACE)),
        }
    }
}

/// Runs `topology` with its operations endpoint until `shutdown` resolves.
pub async fn run(
    topology: Topology,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    start(topology, registry, shutdown).await?.wait().await
}

/// Binds the operations endpoint (its address is logged), then starts the
/// job in the background once the brokers answer.
pub async fn start(
    topology: Topology,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Job, RunError> {
    let health = Arc::new(Health::default());
    let start_up = Arc::new(StartUp::default());
    let addr = super::serve(&topology.http.listen, Arc::clone(&health), Arc::clone(&start_up)).await?;
    tracing::info!(metrics = %format!("http://{addr}/metrics"), "operations endpoint listening on {addr}");
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        tokio::spawn(super::restore_progress_bar(Arc::clone(&health)));
    }
    let (signal, signalled) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = signal.send(true);
    });
    let stopped = {
        let mut signalled = signalled.clone();
        async move {
            let _ = signalled.wait_for(|signalled| *signalled).await;
        }
    };
    let task = tokio::spawn({
        let health = Arc::clone(&health);
        async move {
            tokio::pin!(stopped);
            tokio::select! {
                () = wait_for_brokers(&topology.kafka, &start_up) => {}
                () = &mut stopped => return Ok(()),
            }
            start_up.waiting_for(None);
            crate::runtime::run(topology, registry, health, stopped).await
        }
    });
    Ok(Job { addr, health, task, signalled })
}

/// Returns once the brokers answer a metadata request. Until then it warns,
/// naming the brokers, after each failed check (at most every
/// [`MOST_BROKER_BACKOFF`], doubling from a second), and `/readyz` says why.
pub async fn wait_for_brokers(settings: &KafkaSettings, start_up: &StartUp) {
    let mut backoff = Duration::from_secs(1);
    let mut failures = 0u32;
    loop {
        let probe = {
            let settings = settings.clone();
            tokio::task::spawn_blocking(move || probe_brokers(&settings, BROKER_PROBE_TIMEOUT)).await
        };
        let error = match probe {
            Ok(Ok(())) => {
                if failures > 0 {
                    tracing::info!(brokers = %settings.brokers, "Kafka brokers reachable again");
                }
                return;
            }
            Ok(Err(error)) => error,
            Err(join) => join.to_string(),
        };
        failures += 1;
        let reason = format!("Kafka brokers {} unreachable: {error}", settings.brokers);
        tracing::warn!(
            brokers = %settings.brokers,
            attempt = failures,
            retry_in_secs = backoff.as_secs(),
            "{reason}; retrying in {} s",
            backoff.as_secs()
        );
        start_up.waiting_for(Some(reason));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MOST_BROKER_BACKOFF);
    }
}

/// One metadata request to the cluster, within `timeout`: whether any broker
/// answers, with librdkafka's reason when none does.
pub fn probe_brokers(settings: &KafkaSettings, timeout: Duration) -> Result<(), String> {
    let consumer: BaseConsumer = settings.client_config().create().map_err(|e| e.to_string())?;
    consumer.fetch_metadata(None, timeout).map(drop).map_err(|e| e.to_string())
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits the process
/// at once (status 130).
pub async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("second signal: exiting now");
        // At once: `exit` would first run the C libraries' exit handlers,
        // which can wait on the very threads that are stuck.
        // SAFETY: `_exit` ends the process without touching its memory.
        unsafe { libc::_exit(130) }
    });
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
