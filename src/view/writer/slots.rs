//! What writing to a Redis Cluster changes.
//!
//! - A pipeline goes to one node, but a flush's rooms live on every master.
//!   Each room's compare-and-set (its two keys share the room's `{path}` slot)
//!   is sent on its own, all of them at once: the cluster connection routes
//!   each to its slot's master, pipelined per node on one connection, and
//!   follows `MOVED` after a failover.
//! - Each master can lose data on its own: a failover to a replica that had
//!   not received the last writes (replication is asynchronous), or a master
//!   restarted without persistence. One marker cannot see that, since it
//!   lives on one master. So the writer keeps one marker per master, in the
//!   first slot the master serves (`CLUSTER SLOTS`, read again every marker
//!   check). A marker stays in its slot when the slot changes master, so a
//!   replica that took over is judged by whether it still holds what its
//!   master last confirmed. The markers are advanced only after every room
//!   of the flush has answered: a master's replication stream, like a
//!   server's persistence, keeps a prefix of what it ran, so a marker that
//!   survived vouches for the room writes before it on that master.

use std::collections::BTreeMap;

use futures::future::join_all;
use redis::aio::ConnectionLike;
use redis::{RedisResult, Value};

use super::ViewConnection;

/// Sends every room command at once, then every marker command at once.
/// Replies in the order of `rooms` then `markers`.
pub(super) async fn send(
    conn: &ViewConnection,
    rooms: Vec<redis::Cmd>,
    markers: Vec<redis::Cmd>,
) -> Vec<RedisResult<Value>> {
    let mut replies = run_all(conn, rooms).await;
    replies.extend(run_all(conn, markers).await);
    replies
}

async fn run_all(conn: &ViewConnection, commands: Vec<redis::Cmd>) -> Vec<RedisResult<Value>> {
    join_all(commands.into_iter().map(|cmd| {
        // A cluster connection is a handle to one shared set of node connections.
        let mut conn = conn.clone();
        // A script's error comes back as a value: made an error, as a pipeline's are.
        async move { conn.req_packed_command(&cmd).await.and_then(Value::extract_error) }
    }))
    .await
}

/// The error of a cluster request that took too long.
pub(super) fn timed_out(what: &str) -> redis::RedisError {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} took longer than the response timeout")).into()
}

/// The slot each marker goes in: the first slot of every master that serves any.
pub(super) async fn marker_slots(conn: &mut ViewConnection) -> RedisResult<Vec<u16>> {
    let reply = conn.req_packed_command(&redis::cmd("CLUSTER").arg("SLOTS").clone()).await?;
    Ok(first_slots(&reply))
}

/// From a `CLUSTER SLOTS` reply (ranges of `[start, end, [host, port, id], replicas…]`),
/// each master's lowest slot, in slot order.
fn first_slots(reply: &Value) -> Vec<u16> {
    let Value::Array(ranges) = reply else { return Vec::new() };
    let mut first: BTreeMap<Vec<u8>, u16> = BTreeMap::new();
    for range in ranges {
        let Value::Array(fields) = range else { continue };
        let (Some(Value::Int(start)), Some(Value::Array(master))) = (fields.first(), fields.get(2)) else { continue };
        // The node id when the reply has one, else its address.
        let id = match (master.get(2), master.first(), master.get(1)) {
            (Some(Value::BulkString(id)), _, _) => id.clone(),
            (_, Some(Value::BulkString(host)), Some(Value::Int(port))) => format!("{host:?}:{port}").into_bytes(),
            _ => continue,
        };
        let start = *start as u16;
        first.entry(id).and_modify(|s| *s = (*s).min(start)).or_insert(start);
    }
    let mut slots: Vec<u16> = first.into_values().collect();
    slots.sort_unstable();
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: i64, end: i64, id: &str) -> Value {
        let node = Value::Array(vec![
            Value::BulkString(b"127.0.0.1".to_vec()),
            Value::Int(7000),
            Value::BulkString(id.as_bytes().to_vec()),
        ]);
        Value::Array(vec![Value::Int(start), Value::Int(end), node])
    }

    #[test]
    fn each_master_gets_one_marker_in_its_lowest_slot() {
        let reply = Value::Array(vec![
            range(5461, 10922, "b"),
            range(0, 100, "a"),
            range(10923, 16383, "c"),
            range(101, 5460, "a"),
        ]);
        assert_eq!(first_slots(&reply), vec![0, 5461, 10923]);
        assert!(first_slots(&Value::Nil).is_empty());
    }
}
