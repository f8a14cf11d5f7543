//! What every call of the Omni service shares: the topology, one Redis
//! connection (re-made after a failure), the idempotent producer, the shared
//! broadcast hub, the shutdown signal, and the per-connection stream counts.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::Status;

use super::convert::{redis_status, redis_timeout};
use super::hub::Hub;
use super::trace::DeliveryTrace;
use crate::kafka::KafkaSettings;
use crate::pubsub::Publisher;
use crate::topology::Topology;
use crate::view::{KeyLayout, RedisTarget, ViewConnection, ViewError};

/// Everything a call needs.
pub struct Shared {
    pub topology: Topology,
    pub keys: KeyLayout,
    pub redis_client: RedisTarget,
    /// The shared multiplexed connection, once made: taken by every call
    /// without waiting (a clone is a handle on the same connection).
    redis: Mutex<Option<ViewConnection>>,
    /// Held while a connection is made, so concurrent calls make one.
    connecting: tokio::sync::Mutex<()>,
    pub publisher: Publisher,
    pub kafka: KafkaSettings,
    pub hub: Arc<Hub>,
    pub shutdown: watch::Receiver<bool>,
    streams: Mutex<HashMap<SocketAddr, usize>>,
    /// Notes each change a watcher sends, for `omni bench --service`.
    pub trace: Option<Arc<DeliveryTrace>>,
}

impl Shared {
    pub fn new(
        topology: Topology,
        redis_client: RedisTarget,
        publisher: Publisher,
        hub: Arc<Hub>,
        shutdown: watch::Receiver<bool>,
        trace: Option<Arc<DeliveryTrace>>,
    ) -> Shared {
        Shared {
            keys: KeyLayout::new(&topology.redis.key_prefix),
            kafka: topology.kafka.clone(),
            topology,
            redis_client,
            redis: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            publisher,
            hub,
            shutdown,
            streams: Mutex::new(HashMap::new()),
            trace,
        }
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.topology.service.redis_timeout_ms)
    }

    /// The time a call may take: the service's Redis bound, or the client's
    /// `grpc-timeout` when shorter.
    pub fn deadline(&self, metadata: &tonic::metadata::MetadataMap) -> Duration {
        let bound = self.redis_timeout();
        super::convert::grpc_timeout(metadata).map_or(bound, |asked| asked.min(bound))
    }

    /// The shared Redis connection, made (within the Redis bound) if there is none.
    pub async fn connection(&self) -> Result<ViewConnection, ViewError> {
        if let Some(conn) = self.current_connection() {
            return Ok(conn);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(conn) = self.current_connection() {
            return Ok(conn);
        }
        let conn = self.redis_client.connect_bounded(self.redis_timeout()).await?;
        *self.lock_redis() = Some(conn.clone());
        Ok(conn)
    }

    fn current_connection(&self) -> Option<ViewConnection> {
        self.lock_redis().clone()
    }

    fn lock_redis(&self) -> std::sync::MutexGuard<'_, Option<ViewConnection>> {
        self.redis.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn forget_connection(&self) {
        // A multiplexed connection does not reconnect by itself.
        *self.lock_redis() = None;
    }

    /// Runs Redis reads within `deadline`: `UNAVAILABLE` when Redis fails
    /// or does not answer in time.
    pub async fn with_redis<T, F, Fut>(&self, deadline: Duration, read: F) -> Result<T, Status>
    where
        F: FnOnce(ViewConnection) -> Fut,
        Fut: Future<Output = Result<T, ViewError>>,
    {
        let attempt = async { read(self.connection().await?).await };
        match tokio::time::timeout(deadline, attempt).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                if matches!(error, ViewError::Redis(_)) {
                    self.forget_connection();
                }
                Err(redis_status(&error))
            }
            Err(_) => {
                self.forget_connection();
                Err(redis_timeout(deadline))
            }
        }
    }

    /// Counts a stream against its connection's limit; `RESOURCE_EXHAUSTED` past it.
    pub fn open_stream(self: &Arc<Self>, peer: Option<SocketAddr>) -> Result<StreamSlot, Status> {
        let limit = self.topology.service.max_streams_per_connection;
        if let Some(peer) = peer {
            let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            let open = streams.entry(peer).or_insert(0);
            if *open >= limit {
                return Err(Status::resource_exhausted(format!(
                    "this connection already has {limit} open streams (service.max_streams_per_connection)"
                )));
            }
            *open += 1;
        }
        Ok(StreamSlot { shared: Arc::clone(self), peer })
    }

    /// Whether the service is shutting down.
    pub fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// One open stream of a connection; frees its place when dropped.
pub struct StreamSlot {
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Some(peer) = self.peer {
            let mut streams = self.shared.streams.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(open) = streams.get_mut(&peer) {
                *open -= 1;
                if *open == 0 {
                    streams.remove(&peer);
                }
            }
        }
    }
}

/// Counts a call and its latency by method and status code.
pub struct Call {
    method: &'static str,
    started: Instant,
}

impl Call {
    pub fn start(method: &'static str) -> Call {
        Call { method, started: Instant::now() }
    }

    pub fn finish<T>(self, result: Result<T, Status>) -> Result<T, Status> {
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        metrics::counter!("omni_service_requests_total", "method" => self.method, "code" => code_name(code))
            .increment(1);
        metrics::histogram!("omni_service_request_duration_seconds", "method" => self.method)
            .record(self.started.elapsed().as_secs_f64());
        result
    }
}

/// The status code's canonical name, as gRPC tools print it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
