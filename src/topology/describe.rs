//! Draws a topology: sources → modules → state store → sinks, as text for a
//! terminal or as a mermaid flowchart for docs and reviews.

use std::fmt::Write;

use super::Topology;

/// Output format of [`describe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An indented outline.
    Text,
    /// A Mermaid flowchart, for Markdown.
    Mermaid,
}

/// The topology as text or mermaid.
pub fn describe(t: &Topology, format: Format) -> String {
    match format {
        Format::Text => text(t),
        Format::Mermaid => mermaid(t),
    }
}

fn redis_keys(t: &Topology) -> String {
    format!("{0}:room:{{<path>}} (hash), {0}:room:{{<path>}}:changes (stream)", t.redis.key_prefix)
}

fn text(t: &Topology) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "topology {}", t.application_id);
    let _ = writeln!(out, "  sources:");
    for input in &t.inputs {
        let _ = writeln!(out, "    kafka topic {input} (key: room path, value: tecate.v1.RoomEvent)");
    }
    let _ = writeln!(out, "  modules (folded per room, in partition order):");
    for module in &t.modules {
        let _ = writeln!(out, "    {module}");
    }
    let _ = writeln!(out, "  state stores:");
    let _ = writeln!(
        out,
        "    room-state: RocksDB at {}, one column family per partition, changelog {} (compacted)",
        t.store.dir.display(),
        t.changelog_topic()
    );
    let _ = writeln!(out, "  sinks:");
    let _ = writeln!(out, "    kafka topic {} (broadcast: omni.v1.StateChange per change)", t.broadcast_topic);
    let _ = writeln!(out, "    kafka topic {} (dead letters, reason in headers)", t.dead_letter_topic);
    let _ = writeln!(out, "    redis {}", redis_keys(t));
    let _ = writeln!(
        out,
        "  commits: {} every {} ms",
        if t.exactly_once { "one Kafka transaction" } else { "at-least-once offset commit" },
        t.commit_interval_ms
    );
    out
}

fn mermaid(t: &Topology) -> String {
    let mut out = String::from("flowchart LR\n");
    for (i, input) in t.inputs.iter().enumerate() {
        let _ = writeln!(out, "  src{i}[/\"{input}\"/] --> fold");
    }
    let _ = writeln!(out, "  subgraph fold[\"fold per room\"]");
    for (i, module) in t.modules.iter().enumerate() {
        let _ = writeln!(out, "    mod{i}[\"{module}\"]");
    }
    let _ = writeln!(out, "  end");
    let _ = writeln!(out, "  fold <--> store[(\"room-state (RocksDB)\")]");
    let _ = writeln!(out, "  store --> changelog[/\"{}\"/]", t.changelog_topic());
    let _ = writeln!(out, "  fold --> broadcast[/\"{}\"/]", t.broadcast_topic);
    let _ = writeln!(out, "  fold --> dlq[/\"{}\"/]", t.dead_letter_topic);
    let _ = writeln!(out, "  fold --> redis[(\"redis {}\")]", redis_keys(t).replace('"', "'"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_mermaid_name_every_node() {
        let t = Topology::with_defaults("app", &["recording", "tags"]);
        for format in [Format::Text, Format::Mermaid] {
            let drawn = describe(&t, format);
            for name in [
                "tecate.room-events",
                "recording",
                "tags",
                "omni.room-state",
                "omni.room-events.dlq",
                "app-room-state-changelog",
            ] {
                assert!(drawn.contains(name), "{format:?} lacks {name}:\n{drawn}");
            }
        }
        assert!(describe(&t, Format::Mermaid).starts_with("flowchart LR"));
    }
}
