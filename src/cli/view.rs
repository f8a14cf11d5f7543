//! `omni snapshot` and `omni watch`: reading room state the way a late joiner does.

use std::io::IsTerminal;
use std::io::Write as _;
use std::time::Duration;

use omni::kafka::KafkaSettings;
use omni::path::Path;
use omni::pubsub::{Follower, Pattern, PubSubError};
use omni::topology::Topology;
use omni::view::{snapshot, KeyLayout, RedisTarget, RoomSnapshot};

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// Room path, e.g. app/a1/room/r1.
    pub path: String,
    /// Print JSON even on a terminal.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "omni")]
    pub key_prefix: String,
}

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Room path or pattern: `*` matches one value, a final `>` everything below.
    pub pattern: String,
    /// Topology whose broadcast topic and Redis prefix to use.
    #[arg(long, default_value = "topologies/room-state.toml")]
    pub topology: std::path::PathBuf,
    /// How far back to read the broadcast topic to cover changes committed but not yet in Redis.
    #[arg(long, default_value = "60")]
    pub lookback_secs: u64,
}

/// Exit code for a room Redis does not know.
pub const UNKNOWN_ROOM: i32 = 2;

pub async fn snapshot_command(args: SnapshotArgs, redis_url: &str) -> anyhow::Result<i32> {
    let path = Path::parse_room(&args.path)?;
    let mut conn = RedisTarget::open(redis_url)?.connect().await?;
    let keys = KeyLayout::new(&args.key_prefix);
    match snapshot(&mut conn, &keys, &path.to_string()).await? {
        None => {
            eprintln!("room {path} is not known to Redis (never written, or closed)");
            Ok(UNKNOWN_ROOM)
        }
        Some(room) if std::io::stdout().is_terminal() && !args.json => {
            print!("{}", table(&room));
            Ok(0)
        }
        Some(room) => {
            println!("{}", serde_json::to_string(&room)?);
            Ok(0)
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

pub async fn watch_command(args: WatchArgs, kafka: KafkaSettings, redis_url: &str) -> anyhow::Result<()> {
    let topology = Topology::load(&args.topology)?;
    let pattern = Pattern::parse(&args.pattern)?;
    let client = RedisTarget::open(redis_url)?;
    let mut follower = Follower::start(
        &kafka,
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
