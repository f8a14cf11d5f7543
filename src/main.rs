//! The `omni` command: runs the processing job, the embedded demo and the
//! benchmark, and gives a terminal to publish, watch and inspect room state.

mod cli;
mod ops;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use omni::kafka::KafkaSettings;
use omni::modules::Registry;
use omni::runtime::Health;
use omni::topology::{describe, Format};

use cli::config::{self, Connect, Overrides};

/// The fold path allocates small strings per event; mimalloc serves those
/// markedly faster than glibc's allocator. Its v2 line (a Cargo feature)
/// hands freed memory back within milliseconds; v3 holds it for a second,
/// which cost some 50 MiB more peak RSS in `omni bench`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// omni: live-room state from Tecate events, on Kafka, RocksDB and Redis.
///
/// Every command takes Kafka from OMNI_BROKERS (or --brokers) and Redis from
/// OMNI_REDIS_URL (or --redis-url).
#[derive(Debug, Parser)]
#[command(name = "omni", version)]
struct Cli {
    #[command(flatten)]
    connect: Connect,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text", env = "OMNI_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the processing job described by a topology file.
    Run {
        #[arg(long, default_value = "topologies/room-state.toml")]
        topology: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
        /// Print the effective configuration (secrets masked) and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Run the job on embedded defaults: in-process Kafka, generated events, a live view.
    Demo(cli::demo::DemoArgs),
    /// Publish Tecate room events to the job's input topic.
    Publish(cli::publish::PublishArgs),
    /// Keep a lease alive (once, or --every 2s until Ctrl-C).
    Keepalive(cli::keepalive::KeepaliveArgs),
    /// Print matching rooms' snapshots, then every live change, as JSON lines.
    Watch(cli::view::WatchArgs),
    /// Print a room's state from Redis (exit code 2 for an unknown room).
    Snapshot(cli::view::SnapshotArgs),
    /// Inspect topology files.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Measure throughput, latency and restore speed against real Kafka and Redis.
    Bench(cli::bench::BenchArgs),
    /// Ask a running omni's /healthz (or /readyz): exit 0 when it answers 200 (container health checks).
    Health(cli::health::HealthArgs),
}

#[derive(Debug, Subcommand)]
enum TopologyCommand {
    /// Draw sources → modules → state stores → sinks.
    Describe {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OMNI_LOG")
        .unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn kafka_settings(connect: &Connect) -> KafkaSettings {
    KafkaSettings::with_brokers(connect.brokers.clone().unwrap_or_else(|| "127.0.0.1:9092".into()))
}

fn redis_url(connect: &Connect) -> String {
    connect.redis_url.clone().unwrap_or_else(|| "redis://127.0.0.1:6379".into())
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run { topology, overrides, print_config } => {
            let topology = config::effective(&topology, &cli.connect, &overrides)?;
            if print_config {
                print!("{}", config::masked_toml(&topology)?);
                return Ok(0);
            }
            run_job(topology, Registry::with_builtins()).await?;
            Ok(0)
        }
        Command::Demo(args) => cli::demo::run(args).await.map(|()| 0),
        Command::Publish(args) => cli::publish::run(args, kafka_settings(&cli.connect)).await.map(|()| 0),
        Command::Keepalive(args) => cli::keepalive::run(args, kafka_settings(&cli.connect)).await.map(|()| 0),
        Command::Watch(args) => {
            cli::view::watch_command(args, kafka_settings(&cli.connect), &redis_url(&cli.connect)).await.map(|()| 0)
        }
        Command::Snapshot(args) => cli::view::snapshot_command(args, &redis_url(&cli.connect)).await,
        Command::Topology { command: TopologyCommand::Describe { file, format } } => {
            let topology = omni::topology::Topology::load(&file)?;
            print!("{}", describe(&topology, format));
            Ok(0)
        }
        Command::Health(args) => cli::health::run(args).await,
        Command::Bench(args) => {
            cli::bench::run(args, kafka_settings(&cli.connect), redis_url(&cli.connect)).await.map(|()| 0)
        }
    }
}

/// Runs the job with its operations endpoint until SIGINT or SIGTERM; a second signal exits at once.
pub async fn run_job(topology: omni::topology::Topology, registry: Registry) -> anyhow::Result<()> {
    let health = Arc::new(Health::default());
    let addr = ops::serve(&topology.http.listen, Arc::clone(&health)).await?;
    tracing::info!(metrics = %format!("http://{addr}/metrics"), "operations endpoint listening on {addr}");
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        tokio::spawn(ops::restore_progress_bar(Arc::clone(&health)));
    }
    omni::runtime::run(topology, registry, health, shutdown_signal()).await.context("processing job failed")
}

/// Resolves on the first SIGINT/SIGTERM, and exits the process on the second.
async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("second signal: exiting now");
        std::process::exit(130);
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
