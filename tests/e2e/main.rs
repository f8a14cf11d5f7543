//! End-to-end tests against a real Kafka broker and a real Redis server
//! (see `integration/services.sh`). Each test owns its topics, group, Redis
//! key prefix and state directory, so they run in parallel.

mod common;
mod extension;
mod faults;
mod processor;
mod redis_view;
mod pubsub;
mod cli;
mod ops;
