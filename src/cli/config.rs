//! The configuration flags commands share, and how each command gets its
//! effective configuration: the topology file (`--topology`, else
//! `OMNI_TOPOLOGY`, else `topologies/room-state.toml`), then `OMNI_*`
//! environment variables, then the command's flags, validated once, the
//! same way for every command ([`omni::topology::Topology::load_layered`]).
//! Secrets are masked whenever the configuration is shown.

use std::path::PathBuf;

use omni::kafka::SECRET_PROPERTIES;
use omni::modules::Registry;
use omni::topology::{topology_file, Layers, Topology};

/// The topology file a command reads.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TopologyArg {
    /// Topology file (TOML) to take the configuration from: topics, modules, Kafka
    /// (brokers and [kafka.properties]), Redis (URL and key prefix). OMNI_* variables
    /// override its values, and flags override those [default: topologies/room-state.toml]
    #[arg(long, env = "OMNI_TOPOLOGY", value_name = "FILE")]
    pub topology: Option<PathBuf>,
}

/// Where Kafka is, for commands that use it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, host:port[,host:port...]; overrides the topology's [kafka] brokers.
    #[arg(long, env = "OMNI_BROKERS", value_name = "HOST:PORT,...")]
    pub brokers: Option<String>,
}

/// Where Redis is, for commands that use it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RedisUrlArg {
    /// Redis URL, redis://[user[:password]@]host:port[/db] (rediss:// for TLS); overrides the
    /// topology's [redis] url. A password is better given in OMNI_REDIS_PASSWORD.
    #[arg(long, env = "OMNI_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,
}

/// Whose keys in Redis, for commands that read or write room state there.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyPrefixArg {
    /// Prefix of the job's Redis keys (<prefix>:room:{<path>}); overrides the topology's
    /// [redis] key_prefix.
    #[arg(long, env = "OMNI_KEY_PREFIX", value_name = "PREFIX")]
    pub key_prefix: Option<String>,
}

/// Flags of `omni run` that override the topology file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// RocksDB state directory; overrides [store] dir.
    #[arg(long, env = "OMNI_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Stable instance id (suffix of the transactional ids); overrides [instance] id.
    #[arg(long, env = "OMNI_INSTANCE_ID", value_name = "ID")]
    pub instance_id: Option<String>,
    /// Address of /metrics, /healthz and /readyz (port 0 picks one); overrides [http] listen.
    #[arg(long, env = "OMNI_HTTP_LISTEN", value_name = "HOST:PORT")]
    pub http_listen: Option<String>,
    /// Commit interval in milliseconds; overrides commit_interval_ms.
    #[arg(long, env = "OMNI_COMMIT_INTERVAL_MS", value_name = "MS")]
    pub commit_interval_ms: Option<u64>,
    /// Processing threads (Kafka Streams' num.stream.threads); overrides [instance] threads.
    #[arg(long, env = "OMNI_THREADS", value_name = "N")]
    pub threads: Option<usize>,
}

/// The flags a command has, as layers over the environment's.
#[derive(Debug, Default)]
pub struct Flags<'a> {
    pub kafka: Option<&'a KafkaArgs>,
    pub redis_url: Option<&'a RedisUrlArg>,
    pub key_prefix: Option<&'a KeyPrefixArg>,
    pub overrides: Option<&'a Overrides>,
}

/// The effective configuration of a command: the topology file, the
/// environment, then `flags`, validated against the built-in modules.
pub fn load(topology: &TopologyArg, flags: Flags<'_>) -> anyhow::Result<Topology> {
    let file = topology_file(topology.topology.as_deref())?;
    let mut layers = Layers::from_env()?;
    let some = |value: &Option<String>| value.clone().filter(|v| !v.is_empty());
    if let Some(kafka) = flags.kafka {
        layers.brokers = some(&kafka.brokers).or(layers.brokers);
    }
    if let Some(redis) = flags.redis_url {
        layers.redis_url = some(&redis.redis_url).or(layers.redis_url);
    }
    if let Some(prefix) = flags.key_prefix {
        layers.key_prefix = some(&prefix.key_prefix).or(layers.key_prefix);
    }
    if let Some(o) = flags.overrides {
        layers.state_dir = o.state_dir.clone().or(layers.state_dir);
        layers.instance_id = some(&o.instance_id).or(layers.instance_id);
        layers.http_listen = some(&o.http_listen).or(layers.http_listen);
        layers.commit_interval_ms = o.commit_interval_ms.or(layers.commit_interval_ms);
        layers.threads = o.threads.or(layers.threads);
    }
    Ok(Topology::load_layered(&file, &layers, &Registry::with_builtins())?)
}

/// The password in a URL's userinfo replaced by `***`.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None if !userinfo.is_empty() && scheme.starts_with("redis") => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The configuration as TOML, with every secret masked.
pub fn masked_toml(topology: &Topology) -> anyhow::Result<String> {
    let mut shown = topology.clone();
    shown.redis.url = mask_url(&shown.redis.url);
    for key in SECRET_PROPERTIES {
        if let Some(value) = shown.kafka.properties.get_mut(key) {
            *value = "***".into();
        }
    }
    Ok(toml::to_string_pretty(&shown)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password_when_shown() {
        assert_eq!(mask_url("redis://omniuser:s3cr3t-pw@127.0.0.1:6379"), "redis://omniuser:***@127.0.0.1:6379");
        assert_eq!(mask_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(mask_url("redis://pw@h:1"), "redis://***@h:1");
        assert_eq!(mask_url("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn print_config_masks_every_secret() {
        let mut t = Topology::with_defaults("a", &["tags"]);
        t.redis.url = "redis://u:topsecret@h:1".into();
        t.kafka.properties.insert("sasl.password".into(), "kafkasecret".into());
        let shown = masked_toml(&t).unwrap();
        assert!(!shown.contains("topsecret") && !shown.contains("kafkasecret"), "{shown}");
        assert!(shown.contains("***"));
    }
}
