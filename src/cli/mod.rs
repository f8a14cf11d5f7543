//! The subcommands behind `omni`.

pub mod bench;
pub mod config;
pub mod demo;
pub mod embedded_redis;
pub mod health;
pub mod keepalive;
pub mod publish;
pub mod view;
