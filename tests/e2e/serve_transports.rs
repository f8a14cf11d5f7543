//! `omni serve`'s transports beyond plain gRPC: `Subscribe` as Server-Sent
//! Events over HTTP/1.1.

use std::time::Duration;

use omni::proto::omni::{self as pb, publish_request};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, Lines};

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

fn raw_publish(subject: &str, topic: &str, payload: &[u8]) -> pb::PublishRequest {
    pb::PublishRequest {
        path: subject.to_owned(),
        body: Some(publish_request::Body::Payload(payload.to_vec())),
        topic: topic.to_owned(),
        content_type: "text/plain".into(),
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
    assert_eq!((record["partition"].as_i64(), record["offset"].as_i64()), (Some(sent.partition.into()), Some(sent.offset)));
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
