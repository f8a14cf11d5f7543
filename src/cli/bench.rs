//! `omni bench`: the benchmark (filled in below).

use omni::kafka::KafkaSettings;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs, _kafka: KafkaSettings, _redis_url: String) -> anyhow::Result<()> {
    anyhow::bail!("omni bench: not yet implemented")
}
