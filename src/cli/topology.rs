//! `omni topology validate` and `omni topology describe`: a topology file
//! checked, or drawn, after the same loading and validation as `omni run`'s.

use std::path::PathBuf;

use omni::topology::{describe, Format};

use super::config::{self, Flags, TopologyArg};

#[derive(Debug, clap::Args)]
pub struct TopologyArgs {
    #[command(subcommand)]
    pub command: TopologyCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum TopologyCommand {
    /// Check a topology as `omni run` would (with OMNI_* overrides and the built-in
    /// modules), print a one-line summary and exit 0, or name the problem and exit 1.
    Validate {
        /// Topology file; the same as --topology (and taking precedence over it).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        #[command(flatten)]
        topology: TopologyArg,
    },
    /// Draw sources → modules → state stores → sinks.
    Describe {
        /// Topology file; the same as --topology (and taking precedence over it).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        #[command(flatten)]
        topology: TopologyArg,
        /// Output: an indented text outline, or a Mermaid flowchart for Markdown.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
}

pub fn run(args: TopologyArgs) -> anyhow::Result<()> {
    match args.command {
        TopologyCommand::Validate { file, topology } => {
            let topology = config::load(&chosen(file, topology), Flags::default())?;
            println!(
                "valid: application {}, modules {}, input {}",
                topology.application_id,
                topology.modules.join(", "),
                topology.input_topic()
            );
        }
        TopologyCommand::Describe { file, topology, format } => {
            let topology = config::load(&chosen(file, topology), Flags::default())?;
            print!("{}", describe(&topology, format));
        }
    }
    Ok(())
}

fn chosen(file: Option<PathBuf>, topology: TopologyArg) -> TopologyArg {
    TopologyArg { topology: file.or(topology.topology) }
}
