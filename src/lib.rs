//! omni: a stateful stream processor for live-room state.
//!
//! Layers, with imports pointing only downward:
//! - [`path`] and [`proto`]: room paths and the generated wire types;
//! - [`modules`]: pure folds of room events into room state;
//! - [`store`] (the only code that knows RocksDB), [`view`] (the only code
//!   that knows the Redis key layout), [`kafka`] (client setup) and
//!   [`pubsub`] (NATS-like subjects on Kafka);
//! - [`runtime`]: the consume, fold and commit loop;
//! - [`ops`]: a job run with its operations endpoint (`/metrics`, `/healthz`,
//!   `/readyz`), for `omni run` and for binaries of one's own;
//! - [`serve`]: the Omni service (`omni serve`), gRPC and JSON over the layers below;
//! - [`topology`]: the job's configuration, read by the runtime and the binary.

pub mod kafka;
pub mod modules;
pub mod ops;
pub mod path;
pub mod proto;
pub mod pubsub;
pub mod runtime;
pub mod serve;
pub mod store;
pub mod topology;
pub mod view;
