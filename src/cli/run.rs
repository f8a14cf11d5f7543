//! `omni run`: the processing job, with its operations endpoint, until SIGINT or SIGTERM.

use omni::modules::Registry;
use omni::ops::runner;

use super::config::{self, Flags, KafkaArgs, KeyPrefixArg, Overrides, RedisUrlArg, TopologyArg};
use super::exit;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub topology: TopologyArg,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub redis_url: RedisUrlArg,
    #[command(flatten)]
    pub key_prefix: KeyPrefixArg,
    #[command(flatten)]
    pub overrides: Overrides,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    pub print_config: bool,
}

pub async fn run(args: RunArgs) -> anyhow::Result<u8> {
    let flags = Flags {
        kafka: Some(&args.kafka),
        redis_url: Some(&args.redis_url),
        key_prefix: Some(&args.key_prefix),
        overrides: Some(&args.overrides),
    };
    let topology = config::load(&args.topology, flags)?;
    if args.print_config {
        print!("{}", config::masked_toml(&topology)?);
        return Ok(exit::OK);
    }
    runner::run(topology, Registry::with_builtins(), runner::shutdown_signal()).await?;
    Ok(exit::OK)
}
