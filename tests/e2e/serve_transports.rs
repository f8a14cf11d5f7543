//! `omni serve`'s transports beyond plain gRPC: `Subscribe` as Server-Sent
//! Events over HTTP/1.1, and TLS (a self-signed certificate made at test
//! time) for gRPC and for the JSON transport, including an HTTP/1.1-only
//! client such as `curl --http1.1` or a browser's `EventSource`.

use std::sync::Arc;
use std::time::Duration;

use omni::proto::omni::omni_client::OmniClient;
use omni::proto::omni::{self as pb, publish_request};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, Lines};
use tokio_rustls::rustls;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::Code;

use crate::common::*;
use crate::serve::{create_pubsub_topic, topology_for, ServeProcess};

/// Sends a GET for an event stream; the response's status and its lines.
async fn open_events<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, path: &str) -> (u16, Lines<BufReader<S>>) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(stream).lines();
    let status_line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("a response within 20 s")
        .unwrap()
        .expect("a status line");
    (status_line.split_whitespace().nth(1).unwrap().parse().unwrap(), lines)
}

/// The next event's name and JSON data.
async fn next_event<S: AsyncRead + Unpin>(lines: &mut Lines<BufReader<S>>) -> (String, serde_json::Value) {
    tokio::time::timeout(Duration::from_secs(30), async {
        let mut name = String::new();
        loop {
            let line = lines.next_line().await.unwrap().expect("the event stream goes on");
            if let Some(event) = line.strip_prefix("event: ") {
                event.clone_into(&mut name);
            } else if let Some(data) = line.strip_prefix("data: ") {
                return (name, serde_json::from_str(data).unwrap());
            }
        }
    })
    .await
    .expect("an event within 30 s")
}

/// One HTTP/1.1 request with a JSON body over any stream: `(status, body)`.
async fn json_request<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, path: &str, body: &str) -> (u16, String) {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify once the response is sent.
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await.expect("a response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    (head.split_whitespace().nth(1).unwrap().parse().unwrap(), body.to_owned())
}

fn raw_publish(subject: &str, topic: &str, payload: &[u8]) -> pb::PublishRequest {
    pb::PublishRequest {
        path: subject.to_owned(),
        body: Some(publish_request::Body::Payload(payload.to_vec())),
        topic: topic.to_owned(),
        content_type: "text/plain".into(),
        lease_ttl_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_is_served_as_server_sent_events() {
    let dir = tempfile::tempdir().unwrap();
    let t = topology_for("serve-sse-sub", dir.path());
    let chat = create_pubsub_topic(&t).await;
    let mut serve = ServeProcess::spawn(&t, dir.path(), &[]);
    let mut client = serve.client().await;
    let app = &t.application_id;
    client.publish(raw_publish(&format!("app/other-{app}/channel/c0"), &chat, b"not for us")).await.unwrap();
    let subject = format!("app/{app}/channel/c1");
    let sent = client.publish(raw_publish(&subject, &chat, b"hello")).await.unwrap().into_inner();

    // `>` is URL-encoded as a browser or curl --data-urlencode would send it.
    let path = format!("/v1/Subscribe?topic={chat}&pattern=app/{app}/%3E&start=earliest");
    let (status, mut events) = open_events(tokio::net::TcpStream::connect(&serve.addr).await.unwrap(), &path).await;
    assert_eq!(status, 200);
    let (name, record) = next_event(&mut events).await;
    assert_eq!(name, "record", "{record}");
    assert_eq!(
        (record["path"].as_str(), record["payload"].as_str(), record["payload_base64"].as_str()),
        (Some(subject.as_str()), Some("hello"), Some("aGVsbG8="))
    );
    assert_eq!(
        (record["partition"].as_i64(), record["offset"].as_i64()),
        (Some(sent.partition.into()), Some(sent.offset))
    );
    assert_eq!(record["content_type"], "text/plain");
    // Live records follow, binary ones too.
    let later = client.publish(raw_publish(&subject, &chat, &[0xff, 0x00])).await.unwrap().into_inner();
    let (name, record) = next_event(&mut events).await;
    assert_eq!((name.as_str(), record["offset"].as_i64()), ("record", Some(later.offset)), "{record}");
    assert_eq!((record["payload"].is_null(), record["payload_base64"].as_str()), (true, Some("/wA=")));

    // Bad input gets the status the gRPC call would.
    let (status, body) = http_get(&serve.addr, "/v1/Subscribe?topic=not-allowed&pattern=app/%3E").await.unwrap();
    assert_eq!((status, body.contains("PERMISSION_DENIED")), (403, true), "{body}");
    let bad_start = format!("/v1/Subscribe?topic={chat}&pattern=app/%3E&start=yesterday");
    let (status, body) = http_get(&serve.addr, &bad_start).await.unwrap();
    assert_eq!((status, body.contains("INVALID_ARGUMENT")), (400, true), "{body}");
    let bad_pattern = format!("/v1/Subscribe?topic={chat}&pattern=app/%3E/x");
    let (status, body) = http_get(&serve.addr, &bad_pattern).await.unwrap();
    assert_eq!((status, body.contains("INVALID_ARGUMENT")), (400, true), "{body}");
}

/// A self-signed certificate for `localhost` and 127.0.0.1, in PEM: `(cert, key)`.
fn self_signed() -> (String, String) {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    (certified.cert.pem(), certified.key_pair.serialize_pem())
}

/// A TLS connection trusting only `cert_pem`, offering `alpn` protocols.
async fn tls_connect(
    addr: &str,
    cert_pem: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls::pki_types::CertificateDer::from(rcgen_der(cert_pem));
    roots.add(der).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("a TLS handshake")
}

/// The DER bytes of a PEM certificate.
fn rcgen_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_grpc_and_json_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = topology_for("serve-tls", dir.path());
    let (cert, key) = self_signed();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    t.service.tls_cert_file = Some(cert_file);
    t.service.tls_key_file = Some(key_file);
    create_input(&t).await;
    let chat = create_pubsub_topic(&t).await;
    let serve = ServeProcess::spawn(&t, dir.path(), &[]);
    let port = serve.addr.rsplit_once(':').unwrap().1.to_owned();

    // gRPC over TLS, trusting only the test's certificate.
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&cert)).domain_name("localhost");
    let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}")).unwrap().tls_config(tls).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let channel = loop {
        match endpoint.connect().await {
            Ok(channel) => break channel,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no TLS connection within 30 s: {error}: {}",
                    serve.log_text()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut client = OmniClient::new(channel);
    let room = format!("app/{}/room/r1", t.application_id);
    let published = client.publish(crate::serve::publish_event(&room, crate::serve::tag_event("e1", "k", "v"))).await;
    assert_eq!(published.unwrap().into_inner().topic, t.input_topic());
    let unknown = client.get_snapshot(pb::GetSnapshotRequest { path: format!("{room}-none") }).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown}");
    // The port speaks only TLS.
    let plain = OmniClient::connect(format!("http://127.0.0.1:{port}")).await;
    let refused = match plain {
        Err(_) => true,
        Ok(mut plain) => plain.get_snapshot(pb::GetSnapshotRequest { path: room.clone() }).await.is_err(),
    };
    assert!(refused, "a plain-text call succeeded on the TLS port");

    // JSON over TLS, from a client that offers only HTTP/1.1 (curl --http1.1,
    // many HTTP libraries) and from one that offers no protocol at all.
    for alpn in [&[&b"http/1.1"[..]][..], &[]] {
        let stream = tls_connect(&serve.addr, &cert, alpn).await;
        let body = format!(r#"{{"path":"{room}-none"}}"#);
        let (status, body) = json_request(stream, "/v1/GetSnapshot", &body).await;
        assert_eq!((status, body.contains("NOT_FOUND")), (404, true), "{alpn:?}: {body}");
    }
    // Server-Sent Events over TLS and HTTP/1.1.
    let stream = tls_connect(&serve.addr, &cert, &[b"http/1.1"]).await;
    let path = format!("/v1/Subscribe?topic={chat}&pattern=app/{}/%3E&start=earliest", t.application_id);
    let (status, mut events) = open_events(stream, &path).await;
    assert_eq!(status, 200);
    let subject = format!("app/{}/channel/c1", t.application_id);
    client.publish(raw_publish(&subject, &chat, b"over tls")).await.unwrap();
    let (name, record) = next_event(&mut events).await;
    assert_eq!((name.as_str(), record["payload"].as_str()), ("record", Some("over tls")), "{record}");
}
