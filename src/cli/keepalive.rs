//! `omni keepalive`: keeps a lease alive, once or every `--every` until
//! Ctrl-C. A keep-alive is an omni `KeepAlive` record on the job's input
//! topic, keyed by the room's path so it is ordered with the room's events.

use std::time::Duration;

use omni::path::Path;
use omni::pubsub::Publisher;

use super::config::{self, Flags, KafkaArgs, TopologyArg};

#[derive(Debug, clap::Args)]
pub struct KeepaliveArgs {
    /// Room path, e.g. app/a1/room/r1.
    pub path: String,
    /// The lease id(s) `omni publish ... --lease-ttl` printed.
    #[arg(required = true)]
    pub lease_ids: Vec<String>,
    /// Send a keep-alive this often (e.g. 2s, 500ms) until Ctrl-C, instead of once.
    #[arg(long, value_parser = parse_duration)]
    pub every: Option<Duration>,
    /// Topic; defaults to the topology's input topic.
    #[arg(long)]
    pub topic: Option<String>,
    #[command(flatten)]
    pub topology: TopologyArg,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// A duration such as `10s`, `500ms`, `2m` or `1h`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration such as 10s or 500ms"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

pub async fn run(args: KeepaliveArgs) -> anyhow::Result<()> {
    let topology = config::load(&args.topology, Flags { kafka: Some(&args.kafka), ..Flags::default() })?;
    let topic = args.topic.clone().unwrap_or_else(|| topology.input_topic().to_owned());
    let kafka = topology.kafka.clone();
    let path = Path::parse_room(&args.path)?;
    let publisher = Publisher::new(&kafka, topic.clone())?;
    let Some(every) = args.every else {
        publisher.keep_alive(&topic, &path, &args.lease_ids).await?;
        println!("kept alive {}", args.lease_ids.join(" "));
        return Ok(());
    };
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        publisher.keep_alive(&topic, &path, &args.lease_ids).await?;
        println!("kept alive {}", args.lease_ids.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("s").is_err());
    }
}
