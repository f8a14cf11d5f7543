//! The service's HTTP/1.1 face, on the gRPC port: `/metrics`, `/healthz`,
//! `/readyz`, and the calls as JSON for `curl` and browsers: unary calls as
//! `POST /v1/<Method>` with a JSON body, `Watch` and `Subscribe` as
//! Server-Sent Events on `GET /v1/Watch?pattern=…` and
//! `GET /v1/Subscribe?topic=…&pattern=…&start=…`. The JSON mirrors the gRPC
//! messages, with module states as JSON values rather than text.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt as _;
use serde_json::{json, Value};
use tonic::{Code, Status};

use super::state::{Call, Shared};
use super::{streams, unary};
use crate::proto::omni::{self as pb, publish_request, start, watch_event};
use crate::proto::rfc3339;
use crate::proto::tecate::{self, room_event};

#[derive(Clone)]
struct Http {
    shared: Arc<Shared>,
    metrics: Arc<dyn Fn() -> String + Send + Sync>,
    tokens: Arc<Vec<String>>,
}

pub fn router(shared: Arc<Shared>, metrics: Arc<dyn Fn() -> String + Send + Sync>, tokens: Vec<String>) -> Router {
    Router::new()
        .route("/metrics", get(|State(h): State<Http>| async move { (h.metrics)() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/GetSnapshot", post(get_snapshot))
        .route("/v1/GetDeltas", post(get_deltas))
        .route("/v1/Publish", post(publish))
        .route("/v1/KeepAlive", post(keep_alive))
        .route("/v1/Watch", get(watch))
        .route("/v1/Subscribe", get(subscribe))
        .with_state(Http { shared, metrics, tokens: Arc::new(tokens) })
}

async fn readyz(State(h): State<Http>) -> (StatusCode, String) {
    if h.shared.stopping() {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: shutting down\n".into())
    } else if !h.shared.hub.is_ready() {
        let topic = &h.shared.topology.broadcast_topic;
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: the broadcast topic {topic} is not readable yet\n"))
    } else {
        (StatusCode::OK, format!("ready: {} watchers\n", h.shared.hub.watchers()))
    }
}

/// A failed call as JSON, with the HTTP status the Connect protocol gives its code.
fn error_response(status: &Status) -> Response {
    let http = match status.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (http, Json(status_json(status))).into_response()
}

fn status_json(status: &Status) -> Value {
    json!({ "code": super::state::code_name(status.code()), "message": status.message() })
}

fn authorize(h: &Http, headers: &HeaderMap) -> Result<(), Status> {
    super::check_token(&h.tokens, headers.get("authorization").and_then(|v| v.to_str().ok()))
}

fn reply(result: Result<Value, Status>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(status) => error_response(&status),
    }
}

/// A module state's JSON text as a value (text that is not JSON stays a string).
fn state_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

fn snapshot_json(s: &pb::RoomSnapshot) -> Value {
    let modules: serde_json::Map<String, Value> = s.modules.iter().map(|(k, v)| (k.clone(), state_value(v))).collect();
    json!({ "path": s.path, "version": s.version, "modules": modules, "updated_at": rfc3339(s.updated_at.as_ref()) })
}

fn change_json(c: &pb::StateChange) -> Value {
    json!({
        "path": c.path, "version": c.version, "module": c.module, "state": state_value(&c.state_json),
        "cause_event_id": c.cause_event_id, "occurred_at": rfc3339(c.occurred_at.as_ref()),
        "processed_at": rfc3339(c.processed_at.as_ref()),
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PathBody {
    path: String,
}

async fn get_snapshot(State(h): State<Http>, headers: HeaderMap, Json(body): Json<PathBody>) -> Response {
    let call = Call::start("GetSnapshot");
    let result = async {
        authorize(&h, &headers)?;
        let request = pb::GetSnapshotRequest { path: body.path };
        unary::get_snapshot(&h.shared, h.shared.redis_timeout(), request).await.map(|s| snapshot_json(&s))
    }
    .await;
    reply(call.finish(result))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeltasBody {
    path: String,
    #[serde(default)]
    after_version: u64,
    #[serde(default)]
    limit: u32,
}

async fn get_deltas(State(h): State<Http>, headers: HeaderMap, Json(body): Json<DeltasBody>) -> Response {
    let call = Call::start("GetDeltas");
    let result = async {
        authorize(&h, &headers)?;
        let request = pb::GetDeltasRequest { path: body.path, after_version: body.after_version, limit: body.limit };
        let deltas = unary::get_deltas(&h.shared, h.shared.redis_timeout(), request).await?;
        Ok(json!({ "changes": deltas.changes.iter().map(change_json).collect::<Vec<_>>(), "more": deltas.more }))
    }
    .await;
    reply(call.finish(result))
}

/// A Tecate event as JSON: `{"event_id": …, "tag_set": {"key": …, "value": …}}`
/// and so on, one kind per event.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct EventBody {
    event_id: String,
    recording_started: Option<RecordingStarted>,
    recording_stopped: Option<RecordingStopped>,
    tag_set: Option<TagSet>,
    tag_removed: Option<TagRemoved>,
    room_closed: Option<serde_json::Map<String, Value>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordingStarted {
    recording_id: String,
    #[serde(default)]
    started_by: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordingStopped {
    recording_id: String,
    #[serde(default)]
    reason: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TagSet {
    key: String,
    value: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TagRemoved {
    key: String,
}

impl EventBody {
    fn into_event(self) -> Result<tecate::RoomEvent, Status> {
        let mut kinds = Vec::new();
        if let Some(k) = self.recording_started {
            kinds.push(room_event::Kind::RecordingStarted(tecate::RecordingStarted {
                recording_id: k.recording_id,
                started_by: k.started_by,
            }));
        }
        if let Some(k) = self.recording_stopped {
            kinds.push(room_event::Kind::RecordingStopped(tecate::RecordingStopped {
                recording_id: k.recording_id,
                reason: k.reason,
            }));
        }
        if let Some(k) = self.tag_set {
            kinds.push(room_event::Kind::TagSet(tecate::TagSet { key: k.key, value: k.value }));
        }
        if let Some(k) = self.tag_removed {
            kinds.push(room_event::Kind::TagRemoved(tecate::TagRemoved { key: k.key }));
        }
        if self.room_closed.is_some() {
            kinds.push(room_event::Kind::RoomClosed(tecate::RoomClosed {}));
        }
        if kinds.len() != 1 {
            return Err(Status::invalid_argument(
                "an event has exactly one of recording_started, recording_stopped, tag_set, tag_removed, room_closed",
            ));
        }
        Ok(tecate::RoomEvent { event_id: self.event_id, occurred_at: None, kind: kinds.pop() })
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    path: String,
    event: Option<EventBody>,
    /// A raw payload, as UTF-8 text.
    payload: Option<String>,
    #[serde(default)]
    topic: String,
    #[serde(default)]
    content_type: String,
    /// With a `recording_started` event: take a lease of this TTL.
    #[serde(default)]
    lease_ttl_ms: i64,
}

async fn publish(State(h): State<Http>, headers: HeaderMap, Json(body): Json<PublishBody>) -> Response {
    let call = Call::start("Publish");
    let result = async {
        authorize(&h, &headers)?;
        let body_kind = match (body.event, body.payload) {
            (Some(event), None) => publish_request::Body::Event(event.into_event()?),
            (None, Some(payload)) => publish_request::Body::Payload(payload.into_bytes()),
            _ => return Err(Status::invalid_argument("a publish needs exactly one of `event` and `payload`")),
        };
        let request = pb::PublishRequest {
            path: body.path,
            body: Some(body_kind),
            topic: body.topic,
            content_type: body.content_type,
            lease_ttl_ms: body.lease_ttl_ms,
        };
        let published = unary::publish(&h.shared, request).await?;
        let mut answer =
            json!({ "topic": published.topic, "partition": published.partition, "offset": published.offset });
        if !published.lease_id.is_empty() {
            answer["lease_id"] = json!(published.lease_id);
        }
        Ok(answer)
    }
    .await;
    reply(call.finish(result))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeepAliveBody {
    path: String,
    lease_ids: Vec<String>,
}

async fn keep_alive(State(h): State<Http>, headers: HeaderMap, Json(body): Json<KeepAliveBody>) -> Response {
    let call = Call::start("KeepAlive");
    let result = async {
        authorize(&h, &headers)?;
        let request = pb::KeepAliveRequest { path: body.path, lease_ids: body.lease_ids };
        let kept = unary::keep_alive(&h.shared, request).await?;
        Ok(json!({ "partition": kept.partition, "offset": kept.offset }))
    }
    .await;
    reply(call.finish(result))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchQuery {
    pattern: String,
}

fn sse_event(event: pb::WatchEvent) -> Event {
    let (name, data) = match event.event {
        Some(watch_event::Event::Snapshot(s)) => ("snapshot", snapshot_json(&s)),
        Some(watch_event::Event::Change(c)) => ("change", change_json(&c)),
        Some(watch_event::Event::Resynchronised(s)) => ("resynchronised", snapshot_json(&s)),
        None => ("unknown", Value::Null),
    };
    Event::default().event(name).data(data.to_string())
}

async fn watch(State(h): State<Http>, headers: HeaderMap, Query(query): Query<WatchQuery>) -> Response {
    let call = Call::start("Watch");
    let opened = async {
        authorize(&h, &headers)?;
        let request = pb::WatchRequest { pattern: query.pattern };
        streams::watch(Arc::clone(&h.shared), None, h.shared.redis_timeout(), request).await
    }
    .await;
    match call.finish(opened) {
        Err(status) => error_response(&status),
        Ok(events) => server_sent(events, sse_event),
    }
}

/// A stream as Server-Sent Events; its final error becomes an `error`
/// event, then the stream ends.
fn server_sent<T: Send + 'static>(events: streams::EventStream<T>, event: fn(T) -> Event) -> Response {
    let events = events.map(move |item| {
        Ok::<_, Infallible>(match item {
            Ok(item) => event(item),
            Err(status) => Event::default().event("error").data(status_json(&status).to_string()),
        })
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeQuery {
    topic: String,
    pattern: String,
    /// `latest` (the default), `earliest`, or a time in milliseconds since the Unix epoch.
    start: Option<String>,
}

fn start_of(text: Option<&str>) -> Result<Option<pb::Start>, Status> {
    let at = match text {
        None | Some("" | "latest") => start::At::Latest(true),
        Some("earliest") => start::At::Earliest(true),
        Some(other) => start::At::TimestampMs(other.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "start {other:?}: `latest`, `earliest`, or milliseconds since the Unix epoch"
            ))
        })?),
    };
    Ok(Some(pb::Start { at: Some(at) }))
}

/// A pub/sub record as an SSE `record` event: the payload as text when it
/// is UTF-8, and always as base64 (`payload_base64`, as proto3 JSON gives bytes).
fn record_event(record: pb::SubscribeRecord) -> Event {
    use base64::Engine as _;
    let data = json!({
        "path": record.path, "topic": record.topic, "partition": record.partition, "offset": record.offset,
        "timestamp": rfc3339(record.timestamp.as_ref()), "content_type": record.content_type,
        "payload": std::str::from_utf8(&record.payload).ok(),
        "payload_base64": base64::engine::general_purpose::STANDARD.encode(&record.payload),
    });
    Event::default().event("record").data(data.to_string())
}

async fn subscribe(State(h): State<Http>, headers: HeaderMap, Query(query): Query<SubscribeQuery>) -> Response {
    let call = Call::start("Subscribe");
    let opened = async {
        authorize(&h, &headers)?;
        let start = start_of(query.start.as_deref())?;
        let request = pb::SubscribeRequest { topic: query.topic, pattern: query.pattern, start };
        streams::subscribe(Arc::clone(&h.shared), None, request).await
    }
    .await;
    match call.finish(opened) {
        Err(status) => error_response(&status),
        Ok(records) => server_sent(records, record_event),
    }
}
