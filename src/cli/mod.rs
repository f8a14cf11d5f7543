//! The subcommands behind `omni`.

pub mod bench;
pub mod config;
pub mod demo;
pub mod embedded_redis;
pub mod health;
pub mod keepalive;
pub mod logs;
pub mod publish;
pub mod run;
pub mod serve;
pub mod topology;
pub mod view;

/// The process's exit codes, the same for every command.
pub mod exit {
    pub const OK: u8 = 0;
    /// Any failure: a configuration that does not load, a service that cannot be reached, …
    pub const ERROR: u8 = 1;
    /// `omni snapshot`: the room is not known to Redis (never written, or closed).
    pub const UNKNOWN_ROOM: u8 = 2;
    /// A usage error: an unknown flag, a missing argument. sysexits.h's
    /// `EX_USAGE`, not clap's 2, so that it never reads as an unknown room.
    pub const USAGE: u8 = 64;

    /// The exit codes as `--help` shows them.
    pub const HELP: &str =
        "Exit codes: 0 success; 1 error; 2 `omni snapshot` of a room Redis does not know; 64 usage error.";
}
