//! `omni serve`: the Omni service for the job a topology file describes.

use std::sync::Arc;

use anyhow::Context;

use super::config::{self, Flags, KafkaArgs, KeyPrefixArg, RedisUrlArg, TopologyArg};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The job's topology: its topics, Redis, limits and `[service]` section.
    #[command(flatten)]
    pub topology: TopologyArg,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub redis_url: RedisUrlArg,
    #[command(flatten)]
    pub key_prefix: KeyPrefixArg,
    /// Address for gRPC, JSON and the operations endpoints (overrides `service.listen`).
    #[arg(long, env = "OMNI_SERVICE_LISTEN")]
    pub listen: Option<String>,
    /// Write a line per live change the service receives and sends to a
    /// watcher, with the time, to FILE (for `omni bench --service`).
    #[arg(long, value_name = "FILE")]
    pub delivery_trace: Option<std::path::PathBuf>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Serves until `stop` resolves (the first SIGINT or SIGTERM).
pub async fn run(
    args: ServeArgs,
    metrics: Arc<dyn Fn() -> String + Send + Sync>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let flags = Flags {
        kafka: Some(&args.kafka),
        redis_url: Some(&args.redis_url),
        key_prefix: Some(&args.key_prefix),
        overrides: None,
    };
    let mut topology = config::load(&args.topology, flags)?;
    if let Some(listen) = args.listen {
        topology.service.listen = listen;
    }
    if args.print_config {
        print!("{}", config::masked_toml(&topology)?);
        return Ok(());
    }
    let from_env = std::env::var("OMNI_SERVICE_TOKENS").ok();
    let tokens = omni::serve::load_tokens(&topology, from_env.as_deref())?;
    let (listener, addr) = omni::serve::bind(&topology.service.listen).await?;
    tracing::info!(
        grpc = %addr,
        json = %format!("http://{addr}/v1/"),
        metrics = %format!("http://{addr}/metrics"),
        authentication = !tokens.is_empty(),
        "omni serve listening on {addr}"
    );
    let options = omni::serve::ServeOptions { topology, tokens, metrics, delivery_trace: args.delivery_trace };
    omni::serve::serve(options, listener, stop).await.context("omni serve failed")
}
