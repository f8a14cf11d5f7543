//! `omni snapshot` and `omni watch`: reading room state the way a late joiner does.

use std::io::IsTerminal;
use std::io::Write as _;
use std::time::Duration;

use omni::ops::runner::probe_brokers;
use omni::path::Path;
use omni::pubsub::{Follower, Pattern, PubSubError};
use omni::view::{snapshot, KeyLayout, RedisTarget, RoomSnapshot};

use super::config::{self, Flags, KafkaArgs, KeyPrefixArg, RedisUrlArg, TopologyArg};
use super::exit;

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// Room path, e.g. app/a1/room/r1.
    pub path: String,
    /// Print JSON even on a terminal.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub topology: TopologyArg,
    #[command(flatten)]
    pub redis_url: RedisUrlArg,
    #[command(flatten)]
    pub key_prefix: KeyPrefixArg,
}

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Room path or pattern: `*` matches one value, a final `>` everything below.
    pub pattern: String,
    /// How far back to read the broadcast topic to cover changes committed but not yet in Redis.
    #[arg(long, default_value = "60", value_name = "SECS")]
    pub lookback_secs: u64,
    #[command(flatten)]
    pub topology: TopologyArg,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub redis_url: RedisUrlArg,
    #[command(flatten)]
    pub key_prefix: KeyPrefixArg,
}

/// How long `snapshot` waits for Redis.
const REDIS_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn snapshot_command(args: SnapshotArgs) -> anyhow::Result<u8> {
    let flags = Flags { redis_url: Some(&args.redis_url), key_prefix: Some(&args.key_prefix), ..Flags::default() };
    let topology = config::load(&args.topology, flags)?;
    let path = Path::parse_room(&args.path)?;
    let url = config::mask_url(&topology.redis.url);
    anyhow::ensure!(
        !topology.redis.url.is_empty(),
        "no Redis configured: set [redis] url, OMNI_REDIS_URL or --redis-url"
    );
    let client = RedisTarget::open(&topology.redis.url)?;
    let keys = KeyLayout::new(&topology.redis.key_prefix);
    let read = async {
        let mut conn = client.connect().await?;
        snapshot(&mut conn, &keys, &path.to_string()).await.map_err(anyhow::Error::from)
    };
    let room = tokio::time::timeout(REDIS_TIMEOUT, read)
        .await
        .map_err(|_| anyhow::anyhow!("Redis at {url} did not answer within {} s", REDIS_TIMEOUT.as_secs()))?
        .map_err(|e| anyhow::anyhow!("reading {path} from Redis at {url}: {e:#}"))?;
    match room {
        None => {
            eprintln!("room {path} is not known to Redis (never written, or closed)");
            Ok(exit::UNKNOWN_ROOM)
        }
        Some(room) if std::io::stdout().is_terminal() && !args.json => {
            print!("{}", table(&room));
            Ok(exit::OK)
        }
        Some(room) => {
            println!("{}", serde_json::to_string(&room)?);
            Ok(exit::OK)
        }
    }
}

fn table(room: &RoomSnapshot) -> String {
    let mut out = format!(
        "{:<12} {}\n{:<12} {}\n{:<12} {}\n",
        "path", room.path, "version", room.version, "updated_at", room.updated_at
    );
    for (module, state) in &room.modules {
        out.push_str(&format!("{module:<12} {state}\n"));
    }
    out
}

pub async fn watch_command(args: WatchArgs) -> anyhow::Result<()> {
    let flags = Flags {
        kafka: Some(&args.kafka),
        redis_url: Some(&args.redis_url),
        key_prefix: Some(&args.key_prefix),
        overrides: None,
    };
    let topology = config::load(&args.topology, flags)?;
    let pattern = Pattern::parse(&args.pattern)?;
    let brokers = topology.kafka.brokers.clone();
    let probe = {
        let kafka = topology.kafka.clone();
        tokio::task::spawn_blocking(move || probe_brokers(&kafka, Duration::from_secs(10))).await?
    };
    probe.map_err(|e| anyhow::anyhow!("cannot reach the Kafka brokers {brokers}: {e}"))?;
    let client = RedisTarget::open(&topology.redis.url)?;
    let mut follower = Follower::start(
        &topology.kafka,
        &topology.broadcast_topic,
        client,
        KeyLayout::new(&topology.redis.key_prefix),
        pattern,
        Duration::from_secs(args.lookback_secs),
    )
    .await?;
    // Errors are transient (the follower keeps going): log the first of a
    // run, and every report of a room Redis leaves behind.
    let mut failing = false;
    while let Some(next) = follower.next().await {
        match next {
            Ok(event) => {
                failing = false;
                let mut out = std::io::stdout().lock();
                let written = writeln!(out, "{}", serde_json::to_string(&event)?).and_then(|()| out.flush());
                match written {
                    // The reader went away (`omni watch … | head`): done, as Unix tools are.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                    other => other?,
                }
            }
            Err(error @ PubSubError::RedisBehind { .. }) => tracing::warn!(%error, "a room is behind"),
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "following failed; retrying");
            }
            Err(_) => {}
        }
    }
    Ok(())
}
