//! The effective configuration of a command: the topology file, then
//! `OMNI_*` environment variables, then flags (each overriding the one
//! before), plus secrets read from the environment or files. Secrets are
//! masked whenever the configuration is shown.

use std::path::PathBuf;

use anyhow::Context;
use omni::kafka::SECRET_PROPERTIES;
use omni::topology::Topology;

/// Connection flags every command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Connect {
    /// Kafka bootstrap servers (host:port,...).
    #[arg(long, global = true, env = "OMNI_BROKERS")]
    pub brokers: Option<String>,
    /// Redis URL: redis://[user[:password]@]host:port[/db], or rediss:// for TLS.
    #[arg(long, global = true, env = "OMNI_REDIS_URL")]
    pub redis_url: Option<String>,
}

/// Flags that override the topology file for `omni run`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// RocksDB state directory.
    #[arg(long, env = "OMNI_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Stable instance id (transactional id suffix).
    #[arg(long, env = "OMNI_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "OMNI_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Commit interval in milliseconds.
    #[arg(long, env = "OMNI_COMMIT_INTERVAL_MS")]
    pub commit_interval_ms: Option<u64>,
    /// Processing threads (Kafka Streams' num.stream.threads).
    #[arg(long, env = "OMNI_THREADS")]
    pub threads: Option<usize>,
}

/// Loads a topology and applies environment, flags and secrets.
pub fn effective(path: &std::path::Path, connect: &Connect, overrides: &Overrides) -> anyhow::Result<Topology> {
    let mut topology = Topology::load(path)?;
    apply(&mut topology, connect, overrides)?;
    topology.validate()?;
    Ok(topology)
}

pub fn apply(topology: &mut Topology, connect: &Connect, overrides: &Overrides) -> anyhow::Result<()> {
    if let Some(brokers) = &connect.brokers {
        topology.kafka.brokers = brokers.clone();
    }
    if let Some(url) = &connect.redis_url {
        topology.redis.url = url.clone();
    }
    if let Some(dir) = &overrides.state_dir {
        topology.store.dir = dir.clone();
    }
    if let Some(id) = &overrides.instance_id {
        topology.instance.id = id.clone();
    }
    if let Some(listen) = &overrides.http_listen {
        topology.http.listen = listen.clone();
    }
    if let Some(ms) = overrides.commit_interval_ms {
        topology.commit_interval_ms = ms;
    }
    if let Some(threads) = overrides.threads {
        topology.instance.threads = threads;
    }
    if let Some(password) = secret("OMNI_REDIS_PASSWORD")? {
        topology.redis.url = with_redis_password(&topology.redis.url, &password)?;
    }
    if let Some(password) = secret("OMNI_KAFKA_SASL_PASSWORD")? {
        topology.kafka.properties.insert("sasl.password".into(), password);
    }
    if let Some(file) = topology.kafka.properties.remove("sasl.password.file") {
        let password = std::fs::read_to_string(&file).with_context(|| format!("reading sasl.password.file {file}"))?;
        topology.kafka.properties.insert("sasl.password".into(), password.trim_end().to_owned());
    }
    Ok(())
}

/// A secret from `NAME`, or from the file named by `NAME_FILE`.
fn secret(name: &str) -> anyhow::Result<Option<String>> {
    if let Ok(value) = std::env::var(name) {
        return Ok(Some(value));
    }
    match std::env::var(format!("{name}_FILE")) {
        Ok(file) => {
            let value = std::fs::read_to_string(&file).with_context(|| format!("reading {name}_FILE {file}"))?;
            Ok(Some(value.trim_end().to_owned()))
        }
        Err(_) => Ok(None),
    }
}

fn with_redis_password(url: &str, password: &str) -> anyhow::Result<String> {
    let (scheme, rest) = url.split_once("://").context("redis url has no scheme")?;
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let user =
        rest.rsplit_once('@').map(|(userinfo, _)| userinfo.split(':').next().unwrap_or_default()).unwrap_or_default();
    Ok(format!("{scheme}://{user}:{}@{host}", percent_encode(password)))
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
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
    fn a_password_is_added_encoded_and_keeps_the_user() {
        assert_eq!(with_redis_password("redis://u@h:1", "p@ss").unwrap(), "redis://u:p%40ss@h:1");
        assert_eq!(with_redis_password("redis://h:1", "x").unwrap(), "redis://:x@h:1");
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
