//! End-to-end tests against a real Kafka broker and a real Redis server
//! (see `integration/services.sh`). Each test owns its topics, group, Redis
//! key prefix and state directory, so they run in parallel.

mod broker_outage;
mod cli;
mod cluster;
mod common;
mod deploy_files;
mod extension;
mod faults;
mod follow_faults;
mod golden;
mod late_joiners;
mod leases;
mod liveness;
mod newcomer;
mod operator;
mod ops;
mod processor;
mod pubsub;
mod redis_backlog;
mod redis_view;
mod serve;
mod serve_faults;
mod serve_transports;
mod standby;
mod transactions;
mod view_faults;
