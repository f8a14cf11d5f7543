//! Connecting to Redis: one server (`redis://`, `rediss://`) or a Redis
//! Cluster (`redis+cluster://host:port,host:port`, `rediss+cluster://`), behind
//! one client and one connection type, so the writer and the readers need not
//! care which. A cluster URL lists one or more nodes to discover the cluster
//! from (listing every node lets a client start while some are down); its
//! user and password apply to every node. Commands on a cluster connection
//! are routed by key slot, and follow a slot to its new master after a failover.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// How long connecting to one node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a reader waits for a reply: redis-rs gives up after 500 ms by
/// default, which a Redis busy with a large pipeline passes without being down.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A Redis server or cluster to connect to. Made once per process or
/// follower, so the variants' sizes do not matter.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
pub enum RedisTarget {
    Single(redis::Client),
    Cluster(ClusterClient),
}

impl From<redis::Client> for RedisTarget {
    fn from(client: redis::Client) -> Self {
        RedisTarget::Single(client)
    }
}

/// The node URLs of a `redis+cluster://` or `rediss+cluster://` URL, or `None` for another URL.
fn cluster_nodes(url: &str) -> Option<Result<Vec<String>, String>> {
    let (scheme, rest) = url.split_once("://")?;
    let node_scheme = match scheme {
        "redis+cluster" => "redis",
        "rediss+cluster" => "rediss",
        _ => return None,
    };
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), rest),
    };
    // A cluster has one database: an explicit `/0` is allowed, nothing else.
    let hosts = hosts.strip_suffix("/0").unwrap_or(hosts);
    if hosts.contains('/') {
        return Some(Err(format!("a Redis Cluster URL names no database: {scheme}://…{hosts}")));
    }
    let nodes: Vec<String> =
        hosts.split(',').filter(|h| !h.is_empty()).map(|host| format!("{node_scheme}://{userinfo}{host}")).collect();
    if nodes.is_empty() {
        return Some(Err(format!("a {scheme}:// URL needs at least one host:port")));
    }
    Some(Ok(nodes))
}

impl RedisTarget {
    /// Opens `url` without connecting: `redis+cluster://` for a cluster, any URL
    /// `redis::Client` takes otherwise.
    pub fn open(url: &str) -> RedisResult<RedisTarget> {
        match cluster_nodes(url) {
            None => Ok(RedisTarget::Single(redis::Client::open(url)?)),
            Some(Err(reason)) => {
                Err(RedisError::from((redis::ErrorKind::InvalidClientConfig, "bad redis URL", reason)))
            }
            Some(Ok(nodes)) => Ok(RedisTarget::Cluster(
                ClusterClient::builder(nodes)
                    .connection_timeout(CONNECT_TIMEOUT)
                    // A master that died is failed over in a few seconds; the
                    // callers retry after that with their own back-off.
                    .retries(3)
                    .build()?,
            )),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster(_))
    }

    /// A multiplexed connection (to every master, for a cluster), made
    /// within 5 s, each reply bounded by 5 s.
    pub async fn connect(&self) -> RedisResult<ViewConnection> {
        self.connect_within(CONNECT_TIMEOUT, READ_TIMEOUT).await
    }

    /// A multiplexed connection made within `timeout`, each reply bounded by it too.
    pub async fn connect_bounded(&self, timeout: Duration) -> RedisResult<ViewConnection> {
        self.connect_within(timeout, timeout).await
    }

    async fn connect_within(&self, connect: Duration, reply: Duration) -> RedisResult<ViewConnection> {
        match self {
            RedisTarget::Single(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect))
                    .set_response_timeout(Some(reply));
                Ok(ViewConnection::Single(client.get_multiplexed_async_connection_with_config(&config).await?))
            }
            RedisTarget::Cluster(client) => {
                let config =
                    redis::cluster::ClusterConfig::new().set_connection_timeout(connect).set_response_timeout(reply);
                Ok(ViewConnection::Cluster(client.get_async_connection_with_config(config).await?))
            }
        }
    }

    /// A connection that reconnects by itself, with every reply bounded by
    /// `response_timeout`. A reconnect is tried once per call: its caller
    /// (the writer) backs off and sheds its backlog itself, instead of
    /// waiting out redis-rs's six retries (about 6 s) blind to its backlog.
    pub async fn connect_managed(&self, response_timeout: Duration) -> RedisResult<ViewConnection> {
        match self {
            RedisTarget::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_response_timeout(Some(response_timeout));
                Ok(ViewConnection::Managed(ConnectionManager::new_with_config(client.clone(), config).await?))
            }
            RedisTarget::Cluster(client) => {
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(response_timeout);
                Ok(ViewConnection::Cluster(client.get_async_connection_with_config(config).await?))
            }
        }
    }
}

/// A connection to a Redis server or cluster.
#[derive(Clone)]
pub enum ViewConnection {
    Single(MultiplexedConnection),
    Managed(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ViewConnection {
    pub fn is_cluster(&self) -> bool {
        matches!(self, ViewConnection::Cluster(_))
    }

    /// Every key matching `pattern`, by SCAN (never KEYS); on a cluster, SCAN
    /// runs on every master, since each holds its own slots' keys.
    pub async fn scan_keys(&mut self, pattern: &str) -> RedisResult<Vec<String>> {
        let ViewConnection::Cluster(cluster) = self else {
            return scan_node(self, pattern, None).await;
        };
        let nodes: String = cluster
            .route_command(
                redis::cmd("CLUSTER").arg("NODES").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await
            .and_then(|v| redis::from_redis_value(v).map_err(RedisError::from))?;
        let mut keys = Vec::new();
        for (host, port) in masters(&nodes) {
            keys.extend(scan_node(self, pattern, Some((host, port))).await?);
        }
        Ok(keys)
    }
}

/// The serving masters' addresses in a `CLUSTER NODES` reply.
fn masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = *fields.get(2)?;
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") || fields.len() < 9 {
                return None; // a replica, a failed master, or a master without slots
            }
            let address = fields[1].split('@').next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

/// SCAN of one node (the given cluster master, or the one server) for `pattern`.
async fn scan_node(conn: &mut ViewConnection, pattern: &str, node: Option<(String, u16)>) -> RedisResult<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000);
        let reply = match (&mut *conn, &node) {
            (ViewConnection::Cluster(cluster), Some((host, port))) => {
                let route = SingleNodeRoutingInfo::ByAddress { host: host.clone(), port: *port };
                cluster.route_command(scan, RoutingInfo::SingleNode(route)).await?
            }
            (conn, _) => conn.req_packed_command(&scan).await?,
        };
        let (next, batch): (u64, Vec<String>) = redis::from_redis_value(reply).map_err(RedisError::from)?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

impl ConnectionLike for ViewConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            ViewConnection::Single(c) => c.req_packed_command(cmd),
            ViewConnection::Managed(c) => c.req_packed_command(cmd),
            ViewConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            ViewConnection::Single(c) => c.req_packed_commands(cmd, offset, count),
            ViewConnection::Managed(c) => c.req_packed_commands(cmd, offset, count),
            ViewConnection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            ViewConnection::Single(c) => c.get_db(),
            ViewConnection::Managed(c) => c.get_db(),
            ViewConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis Cluster hash slot of `key` (CRC16 of its `{hash tag}`, or of the whole key).
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &bytes[open + 1..open + 1 + close])
        })
        .unwrap_or(bytes);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % 16384
}

/// A short hash tag whose keys hash to `slot`.
pub fn tag_for_slot(slot: u16) -> String {
    (0u32..).map(|i| i.to_string()).find(|tag| key_slot(tag) == slot).expect("every slot has a short tag")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_url_names_every_node_with_its_credentials() {
        assert_eq!(cluster_nodes("redis://h:1"), None);
        assert_eq!(
            cluster_nodes("redis+cluster://u:p@h1:1,h2:2").unwrap().unwrap(),
            vec!["redis://u:p@h1:1".to_owned(), "redis://u:p@h2:2".to_owned()]
        );
        assert_eq!(cluster_nodes("rediss+cluster://h1:1/0").unwrap().unwrap(), vec!["rediss://h1:1".to_owned()]);
        assert!(cluster_nodes("redis+cluster://h1:1/3").unwrap().is_err());
        assert!(cluster_nodes("redis+cluster://").unwrap().is_err());
        assert!(RedisTarget::open("redis+cluster://127.0.0.1:1,127.0.0.1:2").unwrap().is_cluster());
        assert!(!RedisTarget::open("redis://127.0.0.1:1").unwrap().is_cluster());
    }

    #[test]
    fn slots_follow_the_hash_tag_as_redis_computes_them() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot("123456789"), 12739);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("omni:room:{foo}"), key_slot("foo"));
        assert_eq!(key_slot("a{}b"), key_slot("a{}b"), "an empty tag hashes the whole key");
        for slot in [0, 1, 5461, 16383] {
            assert_eq!(key_slot(&format!("omni:writer:x:{{{}}}", tag_for_slot(slot))), slot);
        }
    }

    #[test]
    fn masters_are_the_serving_masters_of_cluster_nodes() {
        let nodes = "\
a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922
c 127.0.0.1:7002@17002 master,fail - 0 0 3 disconnected
d 127.0.0.1:7003@17003 slave a 0 0 1 connected
e 127.0.0.1:7004@17004 master - 0 0 7 connected 10923-16383
";
        assert_eq!(
            masters(nodes),
            vec![("127.0.0.1".to_owned(), 7000), ("127.0.0.1".to_owned(), 7001), ("127.0.0.1".to_owned(), 7004)]
        );
    }
}
