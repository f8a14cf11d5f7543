//! The `omni` command: runs the processing job, the embedded demo and the
//! benchmark, and gives a terminal to publish, watch and inspect room state.
//! Each subcommand lives in `src/cli/`; adding one is a variant below and a
//! line in [`dispatch`].

mod cli;

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use cli::exit;
use cli::logs::LogFormat;

/// The fold path allocates small strings per event; mimalloc serves those
/// markedly faster than glibc's allocator. Its v2 line (a Cargo feature)
/// hands freed memory back within milliseconds; v3 holds it for a second,
/// which cost some 50 MiB more peak RSS in `omni bench`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// omni: live-room state from Tecate events, on Kafka, RocksDB and Redis.
///
/// Every command reads one configuration: the topology file (--topology, else
/// OMNI_TOPOLOGY, else topologies/room-state.toml), then OMNI_* environment
/// variables (OMNI_BROKERS, OMNI_REDIS_URL, OMNI_KEY_PREFIX, ...), then its flags.
#[derive(Debug, Parser)]
#[command(name = "omni", version, after_help = exit::HELP)]
struct Cli {
    /// Log format on stderr: text (coloured only on a terminal) or JSON lines.
    #[arg(long, global = true, value_enum, default_value = "text", env = "OMNI_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the processing job described by a topology file.
    Run(cli::run::RunArgs),
    /// Run the job on embedded defaults: in-process Kafka, generated events, a live view.
    Demo(cli::demo::DemoArgs),
    /// Publish Tecate room events to the job's input topic.
    Publish(cli::publish::PublishArgs),
    /// Keep a lease alive (once, or --every 2s until Ctrl-C).
    Keepalive(cli::keepalive::KeepaliveArgs),
    /// Print matching rooms' snapshots, then every live change, as JSON lines.
    Watch(cli::view::WatchArgs),
    /// Serve omni over gRPC and JSON (the Omni service) for a topology's job.
    Serve(cli::serve::ServeArgs),
    /// Print a room's state from Redis (exit code 2 for a room Redis does not know).
    Snapshot(cli::view::SnapshotArgs),
    /// Check or draw topology files.
    Topology(cli::topology::TopologyArgs),
    /// Measure throughput, latency and restore speed against real Kafka and Redis.
    Bench(cli::bench::BenchArgs),
    /// Ask a running omni's /healthz (or /readyz): exit 0 when it answers 200 (container health checks).
    Health(cli::health::HealthArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version come this way too, printed to stdout.
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { exit::OK });
        }
    };
    cli::logs::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let code = match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::ERROR
        }
    };
    // A client that hangs in its close (a job past its shutdown grace) must
    // not hold the exit: leave blocking tasks behind.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    ExitCode::from(code)
}

async fn dispatch(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Run(args) => cli::run::run(args).await,
        Command::Demo(args) => cli::demo::run(args).await.map(|()| exit::OK),
        Command::Publish(args) => cli::publish::run(args).await.map(|()| exit::OK),
        Command::Keepalive(args) => cli::keepalive::run(args).await.map(|()| exit::OK),
        Command::Watch(args) => cli::view::watch_command(args).await.map(|()| exit::OK),
        Command::Serve(args) => {
            let metrics = omni::ops::metrics_handle();
            cli::serve::run(args, Arc::new(move || metrics.render()), omni::ops::runner::shutdown_signal())
                .await
                .map(|()| exit::OK)
        }
        Command::Snapshot(args) => cli::view::snapshot_command(args).await,
        Command::Topology(args) => cli::topology::run(args).map(|()| exit::OK),
        Command::Bench(args) => cli::bench::run(args).await.map(|()| exit::OK),
        Command::Health(args) => cli::health::run(args).await,
    }
}
