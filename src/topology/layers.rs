//! The layered configuration every command reads: the topology file, then
//! `OMNI_*` environment variables, then command-line flags, each overriding
//! the one before, plus secrets read from the environment or from files.
//! The library holds the layering so a binary of one's own (see
//! [`crate::ops::runner`]) reads its configuration exactly as `omni` does.

use std::path::{Path as FsPath, PathBuf};

use super::{Topology, TopologyError};
use crate::modules::Registry;

/// The environment variable naming the topology file, where `--topology` is not given.
pub const TOPOLOGY_ENV: &str = "OMNI_TOPOLOGY";

/// The topology file a command reads when neither `--topology` nor `OMNI_TOPOLOGY` names one.
pub const DEFAULT_TOPOLOGY: &str = "topologies/room-state.toml";

/// Values that override the topology file, from the environment or flags.
/// `None` leaves the file's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layers {
    /// `[kafka] brokers` (`OMNI_BROKERS`, `--brokers`).
    pub brokers: Option<String>,
    /// `[redis] url` (`OMNI_REDIS_URL`, `--redis-url`).
    pub redis_url: Option<String>,
    /// `[redis] key_prefix` (`OMNI_KEY_PREFIX`, `--key-prefix`).
    pub key_prefix: Option<String>,
    /// `[store] dir` (`OMNI_STATE_DIR`, `--state-dir`).
    pub state_dir: Option<PathBuf>,
    /// `[instance] id` (`OMNI_INSTANCE_ID`, `--instance-id`).
    pub instance_id: Option<String>,
    /// `[http] listen` (`OMNI_HTTP_LISTEN`, `--http-listen`).
    pub http_listen: Option<String>,
    /// `commit_interval_ms` (`OMNI_COMMIT_INTERVAL_MS`, `--commit-interval-ms`).
    pub commit_interval_ms: Option<u64>,
    /// `[instance] threads` (`OMNI_THREADS`, `--threads`).
    pub threads: Option<usize>,
}

impl Layers {
    /// The overrides the environment sets (flags, where a binary has them, go on top).
    pub fn from_env() -> Result<Layers, TopologyError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let number = |name: &str| -> Result<Option<u64>, TopologyError> {
            var(name)
                .map(|v| v.parse().map_err(|_| TopologyError::Invalid(format!("{name}={v:?} is not a number"))))
                .transpose()
        };
        Ok(Layers {
            brokers: var("OMNI_BROKERS"),
            redis_url: var("OMNI_REDIS_URL"),
            key_prefix: var("OMNI_KEY_PREFIX"),
            state_dir: var("OMNI_STATE_DIR").map(PathBuf::from),
            instance_id: var("OMNI_INSTANCE_ID"),
            http_listen: var("OMNI_HTTP_LISTEN"),
            commit_interval_ms: number("OMNI_COMMIT_INTERVAL_MS")?,
            threads: number("OMNI_THREADS")?.map(|n| n as usize),
        })
    }
}

/// Which topology file to read: `flag` (`--topology`), else `OMNI_TOPOLOGY`, else
/// [`DEFAULT_TOPOLOGY`], with an error that says how to name one when it does not exist.
pub fn topology_file(flag: Option<&FsPath>) -> Result<PathBuf, TopologyError> {
    let (path, named) = match (flag, std::env::var_os(TOPOLOGY_ENV).filter(|v| !v.is_empty())) {
        (Some(path), _) => (path.to_owned(), true),
        (None, Some(path)) => (PathBuf::from(path), true),
        (None, None) => (PathBuf::from(DEFAULT_TOPOLOGY), false),
    };
    if path.is_file() {
        return Ok(path);
    }
    let here = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
    Err(TopologyError::Missing(if named {
        format!("topology file {} does not exist", path.display())
    } else {
        format!(
            "no topology file: {DEFAULT_TOPOLOGY} does not exist in {here}; \
             name one with --topology FILE or {TOPOLOGY_ENV}=FILE"
        )
    }))
}

impl Topology {
    /// Reads `file`, applies `layers` and the secrets in the environment, and
    /// validates the result against the modules `registry` knows: the one
    /// path by which every command gets its configuration.
    pub fn load_layered(file: &FsPath, layers: &Layers, registry: &Registry) -> Result<Topology, TopologyError> {
        let mut topology = Topology::parse_file(file)?;
        topology.apply(layers);
        topology.apply_secrets()?;
        topology.validate_with(registry)?;
        Ok(topology)
    }

    /// Overrides the file's values with those `layers` sets.
    pub fn apply(&mut self, layers: &Layers) {
        let Layers { brokers, redis_url, key_prefix, state_dir, instance_id, http_listen, commit_interval_ms, threads } =
            layers.clone();
        if let Some(brokers) = brokers {
            self.kafka.brokers = brokers;
        }
        if let Some(url) = redis_url {
            self.redis.url = url;
        }
        if let Some(prefix) = key_prefix {
            self.redis.key_prefix = prefix;
        }
        if let Some(dir) = state_dir {
            self.store.dir = dir;
        }
        if let Some(id) = instance_id {
            self.instance.id = id;
        }
        if let Some(listen) = http_listen {
            self.http.listen = listen;
        }
        if let Some(ms) = commit_interval_ms {
            self.commit_interval_ms = ms;
        }
        if let Some(threads) = threads {
            self.instance.threads = threads;
        }
    }

    /// Adds the secrets kept out of the file: `OMNI_REDIS_PASSWORD` (or
    /// `OMNI_REDIS_PASSWORD_FILE`), `OMNI_KAFKA_SASL_PASSWORD` (or `…_FILE`),
    /// and the file named by `sasl.password.file` in `[kafka.properties]`.
    pub fn apply_secrets(&mut self) -> Result<(), TopologyError> {
        if let Some(password) = secret("OMNI_REDIS_PASSWORD")? {
            self.redis.url = with_redis_password(&self.redis.url, &password)?;
        }
        if let Some(password) = secret("OMNI_KAFKA_SASL_PASSWORD")? {
            self.kafka.properties.insert("sasl.password".into(), password);
        }
        if let Some(file) = self.kafka.properties.remove("sasl.password.file") {
            let password = read_secret(&file, "sasl.password.file")?;
            self.kafka.properties.insert("sasl.password".into(), password);
        }
        Ok(())
    }

    /// [`validate`](Topology::validate), and every module named is one `registry` knows.
    pub fn validate_with(&self, registry: &Registry) -> Result<(), TopologyError> {
        self.validate()?;
        registry.select(&self.modules).map(drop).map_err(|e| TopologyError::Invalid(e.to_string()))
    }
}

/// A secret from `NAME`, or from the file named by `NAME_FILE`.
fn secret(name: &str) -> Result<Option<String>, TopologyError> {
    if let Ok(value) = std::env::var(name) {
        return Ok(Some(value));
    }
    match std::env::var(format!("{name}_FILE")) {
        Ok(file) => read_secret(&file, &format!("{name}_FILE")).map(Some),
        Err(_) => Ok(None),
    }
}

fn read_secret(file: &str, named_by: &str) -> Result<String, TopologyError> {
    std::fs::read_to_string(file)
        .map(|text| text.trim_end().to_owned())
        .map_err(|e| TopologyError::Invalid(format!("reading {named_by} {file}: {e}")))
}

fn with_redis_password(url: &str, password: &str) -> Result<String, TopologyError> {
    let (scheme, rest) =
        url.split_once("://").ok_or_else(|| TopologyError::Invalid("redis url has no scheme".into()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_added_encoded_and_keeps_the_user() {
        assert_eq!(with_redis_password("redis://u@h:1", "p@ss").unwrap(), "redis://u:p%40ss@h:1");
        assert_eq!(with_redis_password("redis://h:1", "x").unwrap(), "redis://:x@h:1");
    }

    #[test]
    fn layers_override_the_file_and_unset_ones_leave_it() {
        let mut t = Topology::with_defaults("a", &["tags"]);
        t.kafka.brokers = "file:9092".into();
        t.redis.key_prefix = "file".into();
        t.apply(&Layers { brokers: Some("flag:1".into()), threads: Some(3), ..Layers::default() });
        assert_eq!((t.kafka.brokers.as_str(), t.instance.threads, t.redis.key_prefix.as_str()), ("flag:1", 3, "file"));
    }

    #[test]
    fn validation_names_a_module_no_one_registered() {
        let t = Topology::with_defaults("a", &["tags", "tagz"]);
        let err = t.validate_with(&Registry::with_builtins()).unwrap_err().to_string();
        assert!(err.contains("unknown module \"tagz\""), "{err}");
    }

    #[test]
    fn a_named_topology_file_that_is_missing_is_an_error_naming_it() {
        let err = topology_file(Some(FsPath::new("/nonexistent/t.toml"))).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/t.toml"), "{err}");
    }
}
