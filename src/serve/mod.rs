//! `omni serve`, the Omni service: omni's room state and pub/sub layer over
//! gRPC (tonic, on the project's prost messages) plus a JSON/HTTP/1.1 face
//! and the operations endpoints, all on one port, so services in any language
//! publish, read and follow rooms without touching Kafka or Redis.
//!
//! The process is stateless: room state comes from Redis and the broadcast
//! topic, and publishing goes to Kafka; run as many instances as wanted
//! behind a load balancer. Fan-out is the heart of it: one shared broadcast
//! consumer per process ([`hub`]) feeds every `Watch`, each a [`Follower`]
//! over that feed, and each joining watcher reads its snapshots from Redis
//! once.
//!
//! [`Follower`]: crate::pubsub::Follower

mod convert;
mod http;
mod hub;
mod state;
mod streams;
mod trace;
mod unary;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::proto::omni::omni_server::{Omni, OmniServer};
use crate::proto::omni::{self as pb};
use crate::pubsub::Publisher;
use crate::topology::Topology;
use crate::view::RedisTarget;
use hub::{Hub, HubOptions};
pub use state::code_name;
use state::{Call, Shared};

/// Errors starting or running the service.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding {listen}: {source}")]
    Bind { listen: String, source: std::io::Error },
    #[error("redis url {0:?} is not usable: {1}")]
    Redis(String, redis::RedisError),
    #[error("the service needs redis: set [redis] url or OMNI_REDIS_URL")]
    NoRedis,
    #[error("creating the producer: {0}")]
    Producer(#[from] crate::pubsub::PubSubError),
    #[error("reading {what} {path}: {source}")]
    Read { what: &'static str, path: String, source: std::io::Error },
    #[error("tls: set both service.tls_cert_file and service.tls_key_file, or neither")]
    HalfTls,
    #[error("tls: {0}")]
    Tls(String),
    #[error("starting the shared broadcast consumer's thread: {0}")]
    Hub(std::io::Error),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("creating the delivery trace {path}: {source}")]
    Trace { path: String, source: std::io::Error },
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// How to run the service.
#[derive(Clone)]
pub struct ServeOptions {
    /// The job's topology: topics, Redis, limits, and `[service]`.
    pub topology: Topology,
    /// Accepted bearer tokens; empty means no authentication.
    pub tokens: Vec<String>,
    /// Renders the process's metrics for `/metrics`.
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// A file to write the delivery trace to ([`trace`]), for `omni bench --service`.
    pub delivery_trace: Option<std::path::PathBuf>,
}

/// Requests up to twice the service's size limits (plus this) reach a
/// handler, which answers `INVALID_ARGUMENT` naming the limit; larger ones
/// are refused by the transport (`OUT_OF_RANGE`) before they are read whole.
const TRANSPORT_SLACK_BYTES: usize = 64 << 10;

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a shutdown waits for calls in flight after telling streams to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Binds the listener; returns it with its address (port 0 picks one).
pub async fn bind(listen: &str) -> Result<(tokio::net::TcpListener, SocketAddr), ServeError> {
    let bind_error = |source| ServeError::Bind { listen: listen.to_owned(), source };
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    Ok((listener, addr))
}

/// Serves until `stop` resolves, then ends every stream with `UNAVAILABLE`
/// and returns once calls in flight are done (or after a short grace).
pub async fn serve(
    options: ServeOptions,
    listener: tokio::net::TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let topology = options.topology.clone();
    let service = &topology.service;
    if topology.redis.url.is_empty() {
        return Err(ServeError::NoRedis);
    }
    let redis_client =
        RedisTarget::open(&topology.redis.url).map_err(|e| ServeError::Redis(topology.redis.url.clone(), e))?;
    let mut producer_settings = topology.kafka.clone();
    producer_settings.properties.insert("message.timeout.ms".into(), service.publish_timeout_ms.to_string());
    let publisher = Publisher::new(&producer_settings, topology.input_topic())?;
    let trace = match &options.delivery_trace {
        None => None,
        Some(path) => Some(Arc::new(
            trace::DeliveryTrace::create(path)
                .map_err(|source| ServeError::Trace { path: path.display().to_string(), source })?,
        )),
    };
    let hub = Hub::start(
        topology.kafka.clone(),
        HubOptions {
            broadcast_topic: topology.broadcast_topic.clone(),
            buffer: service.watch_buffer,
            buffer_bytes: service.watch_buffer_bytes,
            lookback: Duration::from_millis(service.watch_lookback_ms),
            lookback_bytes: service.watch_lookback_bytes,
            trace: trace.clone(),
        },
    )
    .map_err(ServeError::Hub)?;
    let (stopping, shutdown) = watch::channel(false);
    let shared = Arc::new(Shared::new(topology.clone(), redis_client, publisher, hub, shutdown, trace.clone()));

    // `""` is the process (as `/healthz`: a liveness probe must not restart a
    // service catching up); `omni.v1.Omni` is readiness (as `/readyz`).
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<OmniServer<OmniService>>().await;
    let reflection_v1 = reflection().build_v1()?;
    // grpcurl and Python's grpcio-reflection still ask v1alpha.
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let limit = 2 * service.max_message_bytes.max(topology.limits.max_record_bytes) + TRANSPORT_SLACK_BYTES;
    let omni = OmniServer::new(OmniService { shared: Arc::clone(&shared) })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    let tokens = Arc::new(options.tokens.clone());
    let authenticated = tonic::service::interceptor::InterceptedService::new(omni, move |request: Request<()>| {
        check_token(&tokens, request.metadata().get("authorization").and_then(|v| v.to_str().ok()))?;
        Ok(request)
    });
    let grpc = Routes::new(authenticated)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .into_axum_router();
    let app = grpc.merge(http::router(Arc::clone(&shared), Arc::clone(&options.metrics), options.tokens.clone()));

    let mut server = Server::builder().accept_http1(true).http2_keepalive_interval(Some(Duration::from_secs(30)));
    let tls = tls_acceptor(&topology)?;
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(report_health(health, Arc::clone(&shared.hub), stop, stopping, stopped_tx));
    let stopped = async {
        let _ = stopped_rx.await;
    };
    let router = server.add_routes(Routes::from(app));
    let running: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match tls {
        Some(acceptor) => Box::pin(router.serve_with_incoming_shutdown(tls_incoming(listener, acceptor), stopped)),
        None => Box::pin(router.serve_with_incoming_shutdown(plain_incoming(listener), stopped)),
    };
    let served = run_until_stopped(running, &shared).await;
    if let Some(trace) = &trace {
        trace.flush();
    }
    served
}

/// Keeps the gRPC health: `omni.v1.Omni` serving once the hub has read the
/// broadcast's last minute (as `/readyz` says ready), and both it and the
/// server (`""`) not serving from `stop` on, when the streams are told to end.
async fn report_health(
    health: tonic_health::server::HealthReporter,
    hub: Arc<Hub>,
    stop: impl Future<Output = ()>,
    stopping: watch::Sender<bool>,
    stopped: tokio::sync::oneshot::Sender<()>,
) {
    let mut stop = std::pin::pin!(stop);
    tokio::select! {
        () = hub.wait_ready() => {
            health.set_serving::<OmniServer<OmniService>>().await;
            stop.await;
        }
        () = &mut stop => {}
    }
    tracing::info!("shutting down: ending streams with UNAVAILABLE");
    health.set_not_serving::<OmniServer<OmniService>>().await;
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    stopping.send_replace(true);
    let _ = stopped.send(());
}

/// Runs the server until it ends, or until a shutdown and the calls still in
/// flight are done (within the grace).
async fn run_until_stopped(
    running: impl Future<Output = Result<(), tonic::transport::Error>>,
    shared: &Shared,
) -> Result<(), ServeError> {
    tokio::pin!(running);
    let mut shutdown = shared.shutdown.clone();
    tokio::select! {
        done = &mut running => return done.map_err(ServeError::from),
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
    match tokio::time::timeout(SHUTDOWN_GRACE, running).await {
        Ok(done) => done.map_err(ServeError::from),
        Err(_) => {
            tracing::warn!("calls still in flight after the shutdown grace; stopping anyway");
            Ok(())
        }
    }
}

/// Server reflection over every proto the service speaks.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Without TCP_NODELAY a watch event can sit in the kernel waiting for the
/// client's delayed ACK (40 ms): events are small writes.
fn no_delay(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY");
    }
}

fn plain_incoming(listener: TcpListener) -> impl futures::Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| accepted.inspect(no_delay))
}

/// TLS connections, each handshake in a task of its own so a slow client
/// holds up nobody else's.
fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> impl futures::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while !tx.is_closed() {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            no_delay(&tcp);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, %peer, "a TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "a TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The TLS acceptor of `service.tls_cert_file` and `tls_key_file`. It offers
/// HTTP/2 (gRPC) and HTTP/1.1 (the JSON calls and Server-Sent Events, for
/// `curl --http1.1` and clients that speak only HTTP/1.1).
fn tls_acceptor(topology: &Topology) -> Result<Option<TlsAcceptor>, ServeError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let service = &topology.service;
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ServeError::Read { what, path: path.display().to_string(), source })
    };
    let (cert_file, key_file) = match (&service.tls_cert_file, &service.tls_key_file) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        _ => return Err(ServeError::HalfTls),
    };
    let pem_error =
        |path: &std::path::Path, e: &dyn std::fmt::Display| ServeError::Tls(format!("{}: {e}", path.display()));
    let certs = CertificateDer::pem_slice_iter(&read("service.tls_cert_file", cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert_file, &e))?;
    let key =
        PrivateKeyDer::from_pem_slice(&read("service.tls_key_file", key_file)?).map_err(|e| pem_error(key_file, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// `UNAUTHENTICATED` unless tokens are off or the header names one of them.
/// Compares every byte of every token, so timing says nothing about them.
pub(crate) fn check_token(tokens: &[String], header: Option<&str>) -> Result<(), Status> {
    if tokens.is_empty() {
        return Ok(());
    }
    let offered = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or_default().as_bytes();
    let matched = tokens.iter().fold(false, |found, token| {
        let token = token.as_bytes();
        let same = token.len() == offered.len() && token.iter().zip(offered).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0;
        found | same
    });
    if matched {
        Ok(())
    } else {
        Err(Status::unauthenticated("a valid `authorization: Bearer <token>` is required"))
    }
}

/// Reads the accepted tokens: `OMNI_SERVICE_TOKENS` (comma-separated) and
/// the lines of `service.tokens_file`.
pub fn load_tokens(topology: &Topology, from_env: Option<&str>) -> Result<Vec<String>, ServeError> {
    let mut tokens: Vec<String> =
        from_env.unwrap_or_default().split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect();
    if let Some(file) = &topology.service.tokens_file {
        let text = std::fs::read_to_string(file).map_err(|source| ServeError::Read {
            what: "service.tokens_file",
            path: file.display().to_string(),
            source,
        })?;
        tokens.extend(text.lines().map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned));
    }
    Ok(tokens)
}

/// The gRPC service `omni.v1.Omni`.
pub struct OmniService {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Omni for OmniService {
    async fn publish(&self, request: Request<pb::PublishRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        let call = Call::start("Publish");
        call.finish(unary::publish(&self.shared, request.into_inner()).await.map(Response::new))
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::RoomSnapshot>, Status> {
        let call = Call::start("GetSnapshot");
        let deadline = self.shared.deadline(request.metadata());
        call.finish(unary::get_snapshot(&self.shared, deadline, request.into_inner()).await.map(Response::new))
    }

    async fn get_deltas(
        &self,
        request: Request<pb::GetDeltasRequest>,
    ) -> Result<Response<pb::GetDeltasResponse>, Status> {
        let call = Call::start("GetDeltas");
        let deadline = self.shared.deadline(request.metadata());
        call.finish(unary::get_deltas(&self.shared, deadline, request.into_inner()).await.map(Response::new))
    }

    async fn keep_alive(
        &self,
        request: Request<pb::KeepAliveRequest>,
    ) -> Result<Response<pb::KeepAliveResponse>, Status> {
        let call = Call::start("KeepAlive");
        call.finish(unary::keep_alive(&self.shared, request.into_inner()).await.map(Response::new))
    }

    type WatchStream = streams::EventStream<pb::WatchEvent>;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let call = Call::start("Watch");
        let deadline = self.shared.deadline(request.metadata());
        let peer = request.remote_addr();
        let opened = streams::watch(Arc::clone(&self.shared), peer, deadline, request.into_inner()).await;
        call.finish(opened.map(Response::new))
    }

    type SubscribeStream = streams::EventStream<pb::SubscribeRecord>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let call = Call::start("Subscribe");
        let peer = request.remote_addr();
        let opened = streams::subscribe(Arc::clone(&self.shared), peer, request.into_inner()).await;
        call.finish(opened.map(Response::new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_only_when_configured() {
        assert!(check_token(&[], None).is_ok());
        let tokens = vec!["s3cret".to_owned(), "other".to_owned()];
        assert!(check_token(&tokens, Some("Bearer s3cret")).is_ok());
        assert!(check_token(&tokens, Some("Bearer other")).is_ok());
        for wrong in [None, Some("Bearer s3cre"), Some("s3cret"), Some("Bearer s3cretX"), Some("Basic s3cret")] {
            assert_eq!(check_token(&tokens, wrong).unwrap_err().code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
    }
}
