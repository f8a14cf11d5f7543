//! `omni serve`: the Omni service for the job a topology file describes.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use super::config::{self, Connect, Overrides};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Topology whose topics, Redis, limits and `[service]` section to use.
    #[arg(long, default_value = "topologies/room-state.toml")]
    pub topology: PathBuf,
    /// Address for gRPC, JSON and the operations endpoints (overrides `service.listen`).
    #[arg(long, env = "OMNI_SERVICE_LISTEN")]
    pub listen: Option<String>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Serves until `stop` resolves (the first SIGINT or SIGTERM).
pub async fn run(
    args: ServeArgs,
    connect: &Connect,
    metrics: Arc<dyn Fn() -> String + Send + Sync>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut topology = config::effective(&args.topology, connect, &Overrides::default())?;
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
    let options = omni::serve::ServeOptions { topology, tokens, metrics };
    omni::serve::serve(options, listener, stop).await.context("omni serve failed")
}
