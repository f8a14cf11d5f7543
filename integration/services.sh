#!/usr/bin/env bash
# Real services for omni's integration tests, without Docker:
#   - Apache Kafka 4.4.0 (KRaft, each node acting as broker and controller), run from the jars
#     that Maven resolves from Maven Central (integration/kafka/pom.xml), as a plain
#     `java -cp 'libs/*' kafka.Kafka server.properties` process;
#   - Redis (redis-server from Debian's packages, installed with apt-get when missing).
# Everything listens on 127.0.0.1 only, on ports picked once and kept in the state folder.
#
# By default one Kafka node and one Redis. `up --kafka-nodes 3 --redis-cluster` starts three
# KRaft nodes (one cluster id, a three-voter controller quorum) and a Redis Cluster of three
# masters and three replicas, joined with `redis-cli --cluster create`. The shape is remembered
# in the state folder, so later commands (env, down, start…) need no flags.
#
# Usage: integration/services.sh up|down|env|status|clean|start SVC|stop SVC|kill SVC|logs SVC
#   up [--kafka-nodes N] [--redis-cluster]
#                 start Kafka and Redis (no-op for those already running), wait until they answer
#   down          stop everything (SIGTERM, then SIGKILL after a timeout); data and ports are kept
#   env           print `export OMNI_BROKERS=...` and `export OMNI_REDIS_URL=...` lines for eval
#                 (a Redis Cluster is `redis+cluster://host:port,host:port,...`, every node)
#   start SVC     start one service, same port and data as before
#   stop SVC      stop one service (SIGTERM), keep its port and data (fault injection)
#   kill SVC      kill one service with SIGKILL (fault injection: no clean shutdown)
#   status        show what runs where
#   logs SVC      tail the service's log
#   clean         down, then delete the state folder
# SVC: kafka|redis for the one-node shape; kafka (every node), kafka-1..kafka-N, redis (every
# node) or redis-PORT (one Redis Cluster node, by its port; `status` lists them) otherwise.
#
# Env: OMNI_SERVICES_DIR   state folder (default <repo>/integration/.state)
#      OMNI_SERVICES_CACHE jar cache     (default <repo>/integration/.cache)
#      OMNI_SERVICES_TIMEOUT readiness timeout in seconds (default 120)
#      KAFKA_HEAP_OPTS     JVM heap options (default -Xms256m -Xmx768m; -Xms128m -Xmx512m a node
#                          when there are several)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${OMNI_SERVICES_DIR:-$ROOT/integration/.state}
CACHE=${OMNI_SERVICES_CACHE:-$ROOT/integration/.cache}
TIMEOUT=${OMNI_SERVICES_TIMEOUT:-120}
STOP_TIMEOUT=30

KAFKA_VERSION=4.4.0
KAFKA_POM=$ROOT/integration/kafka/pom.xml
KAFKA_LOG4J=$ROOT/integration/kafka/log4j2.properties
KAFKA_LIBS=$CACHE/kafka-$KAFKA_VERSION/libs
KDIR=$STATE/kafka      # the Kafka node being worked on (kafka_node sets it per node)
KNODE=1                # its node.id
KNAME=kafka            # its name in messages and commands
RDIR=$STATE/redis      # the one-node Redis
CDIR=$STATE/redis-cluster
SHAPE=$STATE/shape     # the shape `up` was given: KAFKA_NODES=… and REDIS_CLUSTER=…
CLUSTER_REDIS_NODES=6  # three masters, one replica each

log() { echo "services: $*" >&2; }
die() { echo "services: ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- helpers

APT_UPDATED=0
# apt_install PKG...: returns non-zero (after saying why) when it cannot install
apt_install() {
  command -v apt-get >/dev/null 2>&1 || { log "apt-get not found; install $* by hand"; return 1; }
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || { log "apt-get update failed"; return 1; }
    APT_UPDATED=1
  fi
  log "apt-get install -y $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || { log "apt-get install $* failed"; return 1; }
}

java_bin() {
  if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then echo "$JAVA_HOME/bin/java"
  elif command -v java >/dev/null 2>&1; then command -v java
  else die "java not found (Kafka needs Java 17+); install a JDK or set JAVA_HOME"
  fi
}

# true when something accepts TCP connections on 127.0.0.1:$1
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# true when 127.0.0.1:$1 can be bound right now
port_bindable() {
  local rc=0
  python3 - "$1" <<'PY' 2>/dev/null || rc=$?
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(3)
s.close()
PY
  case $rc in
    0) return 0 ;;
    3) return 1 ;;
    *) ! port_open "$1" ;;   # no usable python3: free if nothing accepts connections there
  esac
}

# A free port below the kernel's ephemeral range (so no client socket grabs it while the
# service is stopped), distinct from the ports already handed out in the state folder.
pick_port() {
  local lo=20000 hi p taken
  hi=$(awk '{print $1 - 1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32767)
  [ "$hi" -gt $((lo + 1000)) ] || hi=32767
  taken=$(find "$STATE" -name '*port' -type f -exec cat {} + 2>/dev/null || true)
  for _ in $(seq 1 200); do
    p=$((lo + (RANDOM * 32768 + RANDOM) % (hi - lo)))
    grep -qx "$p" <<<"$taken" && continue
    port_bindable "$p" && { echo "$p"; return 0; }
  done
  die "found no free port in $lo-$hi"
}

# port_file FILE: the remembered port, picking and saving one the first time
port_file() {
  if [ ! -s "$1" ]; then
    mkdir -p "$(dirname "$1")"
    pick_port >"$1.tmp" && mv "$1.tmp" "$1"
  fi
  cat "$1"
}

pid_of() { [ -s "$1" ] && tr -dc '0-9' <"$1" || true; }

# pid_alive PID PATTERN: PID runs and its command line contains PATTERN
pid_alive() {
  [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 1
  [ -r "/proc/$1/cmdline" ] || return 0
  local cmd
  cmd=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
  [[ "$cmd" == *"$2"* ]]
}

# stop_pid PID NAME: SIGTERM, wait up to STOP_TIMEOUT s, then SIGKILL
stop_pid() {
  local pid=$1 name=$2
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 $((STOP_TIMEOUT * 5))); do
    kill -0 "$pid" 2>/dev/null || return 0
    # exited but not yet reaped (PID 1 may reap orphans lazily) counts as gone
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ] && return 0
    sleep 0.2
  done
  log "$name (pid $pid) still running after ${STOP_TIMEOUT}s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  die "$name (pid $pid) survives SIGKILL"
}

# kill_pid PID NAME: SIGKILL, and wait until it is gone
kill_pid() {
  kill -KILL "$1" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    kill -0 "$1" 2>/dev/null || return 0
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ] && return 0
    sleep 0.1
  done
  die "$2 (pid $1) survives SIGKILL"
}

# ---------------------------------------------------------------- kafka

kafka_pid() {
  local pid
  pid=$(pid_of "$KDIR/kafka.pid")
  if pid_alive "$pid" "$KDIR/server.properties"; then echo "$pid"; return 0; fi
  # pidfile lost: find the broker of this state folder by its command line
  pgrep -f "kafka\\.Kafka $KDIR/server\\.properties" | head -n 1 || true
}

kafka_libs() {
  if [ -f "$KAFKA_LIBS/.complete" ]; then return 0; fi
  command -v mvn >/dev/null 2>&1 || apt_install maven || die "maven (mvn) is needed to fetch the Kafka jars"
  log "resolving Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS"
  local tmp=$KAFKA_LIBS.tmp.$$
  rm -rf "$tmp"; mkdir -p "$tmp"
  if ! mvn -q -B -f "$KAFKA_POM" dependency:copy-dependencies -DoutputDirectory="$tmp" \
      >"$tmp.log" 2>&1; then
    tail -n 30 "$tmp.log" >&2
    rm -rf "$tmp"
    die "maven could not resolve the Kafka jars (log above)"
  fi
  rm -f "$tmp.log"
  ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1 || die "no kafka_2.13-$KAFKA_VERSION.jar after resolution"
  touch "$tmp/.complete"
  rm -rf "$KAFKA_LIBS"; mv "$tmp" "$KAFKA_LIBS"
}

# kafka_node N: work on node N (its folder and node.id). One node lives in $STATE/kafka, as it
# always did; a cluster's nodes in $STATE/kafka-N.
kafka_node() {
  KNODE=$1
  if [ "$KAFKA_NODES" = 1 ]; then KDIR=$STATE/kafka KNAME=kafka; else KDIR=$STATE/kafka-$1 KNAME=kafka-$1; fi
}

# The controller quorum: one voter per node (static, so every node is formatted alike).
kafka_voters() {
  local i voters=""
  for i in $(seq 1 "$KAFKA_NODES"); do
    voters="$voters${voters:+,}$i@127.0.0.1:$(cat "$(kafka_dir "$i")/controller.port")"
  done
  echo "$voters"
}

kafka_dir() { if [ "$KAFKA_NODES" = 1 ]; then echo "$STATE/kafka"; else echo "$STATE/kafka-$1"; fi; }

kafka_write_config() {
  local bport=$1 cport=$2 quorum rf isr
  if [ "$KAFKA_NODES" = 1 ]; then
    quorum="controller.quorum.bootstrap.servers=127.0.0.1:$cport"
  else
    quorum="controller.quorum.voters=$(kafka_voters)"
  fi
  # Internal topics and topics created by the broker are replicated as a production cluster's:
  # three copies where there are three nodes, two of them in sync to take a write.
  rf=$((KAFKA_NODES < 3 ? KAFKA_NODES : 3))
  isr=$((KAFKA_NODES < 2 ? KAFKA_NODES : 2))
  cat >"$KDIR/server.properties.tmp" <<EOF
# written by integration/services.sh on every start; edit the script, not this file
process.roles=broker,controller
node.id=$KNODE
$quorum
listeners=PLAINTEXT://127.0.0.1:$bport,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$bport,CONTROLLER://127.0.0.1:$cport
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KDIR/data
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
auto.create.topics.enable=true
offsets.topic.replication.factor=$rf
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
# A node killed under load: its partitions' leadership moves at once, and a restarted node
# takes its leaderships back soon after it has caught up.
leader.imbalance.check.interval.seconds=10
# A new group's members (omni's processing threads) join in one rebalance.
group.initial.rebalance.delay.ms=300
num.recovery.threads.per.data.dir=1
num.network.threads=2
num.io.threads=4
EOF
  mv "$KDIR/server.properties.tmp" "$KDIR/server.properties"
}

kafka_java_opts() {
  # three nodes share the machine with the tests: a smaller heap each
  local heap="-Xms256m -Xmx768m"
  [ "$KAFKA_NODES" = 1 ] || heap="-Xms128m -Xmx512m"
  # shellcheck disable=SC2206
  JOPTS=(${KAFKA_HEAP_OPTS:-$heap} -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    -Dkafka.logs.dir="$KDIR/logs" -Dlog4j2.configurationFile="$KAFKA_LOG4J"
    -cp "$KAFKA_LIBS/*")
}

# true when the broker serves metadata on 127.0.0.1:$1
kafka_ready() {
  local port=$1
  port_open "$port" || return 1
  if command -v kcat >/dev/null 2>&1; then
    local md
    md=$(timeout 10 kcat -L -b "127.0.0.1:$port" -m 5 2>/dev/null) || return 1
    [[ "$md" == *"broker $KNODE at 127.0.0.1:$port"* ]]
  else
    # only lines logged since this start count (the log is kept across restarts)
    tail -c +"$((${KAFKA_LOG_OFFSET:-0} + 1))" "$KDIR/logs/server.log" 2>/dev/null | grep -q "Kafka Server started"
  fi
}

# Every node's ports, picked before any node starts: each node's config names every voter.
kafka_ports() {
  local i
  for i in $(seq 1 "$KAFKA_NODES"); do
    kafka_node "$i"
    mkdir -p "$KDIR/logs" "$KDIR/data"
    port_file "$KDIR/port" >/dev/null
    port_file "$KDIR/controller.port" >/dev/null
  done
}

# The cluster id, one for every node.
kafka_cluster_id() {
  local java=$1
  [ -s "$STATE/kafka.cluster.id" ] && { cat "$STATE/kafka.cluster.id"; return 0; }
  # the one-node shape kept it in its node folder
  [ -s "$STATE/kafka/cluster.id" ] && [ "$KAFKA_NODES" = 1 ] && { cat "$STATE/kafka/cluster.id"; return 0; }
  "$java" "${JOPTS[@]}" kafka.tools.StorageTool random-uuid >"$STATE/kafka.cluster.id.tmp" 2>>"$KDIR/logs/format.out" \
    || die "kafka.tools.StorageTool random-uuid failed"
  mv "$STATE/kafka.cluster.id.tmp" "$STATE/kafka.cluster.id"
  cat "$STATE/kafka.cluster.id"
}

# kafka_start N: start node N and wait until it serves metadata
kafka_start() {
  kafka_launch "$1"
  kafka_wait "$1"
}

# kafka_launch N: start node N's process (no-op when it runs), without waiting for it
kafka_launch() {
  kafka_node "$1"
  kafka_ports
  kafka_node "$1"
  local bport cport pid java id
  bport=$(cat "$KDIR/port")
  cport=$(cat "$KDIR/controller.port")
  command -v kcat >/dev/null 2>&1 || apt_install kcat \
    || log "no kcat: readiness falls back to the broker's 'Kafka Server started' log line"
  pid=$(kafka_pid)
  if [ -n "$pid" ]; then
    log "$KNAME already running (pid $pid) on 127.0.0.1:$bport"
  else
    port_bindable "$bport" || die "kafka port 127.0.0.1:$bport is taken by another process (see: ss -ltnp | grep $bport)"
    port_bindable "$cport" || die "kafka controller port 127.0.0.1:$cport is taken by another process"
    kafka_libs
    java=$(java_bin)
    kafka_java_opts
    kafka_write_config "$bport" "$cport"
    if [ ! -f "$KDIR/data/meta.properties" ]; then
      id=$(kafka_cluster_id "$java")
      log "formatting KRaft storage of $KNAME (cluster $id)"
      local standalone=()
      [ "$KAFKA_NODES" = 1 ] && standalone=(--standalone)
      "$java" "${JOPTS[@]}" kafka.tools.StorageTool format "${standalone[@]}" \
        -t "$id" -c "$KDIR/server.properties" >>"$KDIR/logs/format.out" 2>&1 \
        || { tail -n 20 "$KDIR/logs/format.out" >&2; die "formatting Kafka storage failed"; }
    fi
    log "starting $KNAME $KAFKA_VERSION on 127.0.0.1:$bport (controller $cport)"
    KAFKA_LOG_OFFSET=$(stat -c %s "$KDIR/logs/server.log" 2>/dev/null || echo 0)
    # own session, no terminal, nothing inherited: the broker outlives this script.
    # bash -c writes its own pid (kept by exec) to the pidfile, then becomes the JVM.
    # shellcheck disable=SC2016
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$KDIR/kafka.pid" \
      "$java" "${JOPTS[@]}" kafka.Kafka "$KDIR/server.properties" \
      </dev/null >"$KDIR/logs/kafka.out" 2>&1 &
    for _ in $(seq 1 50); do [ -s "$KDIR/kafka.pid" ] && break; sleep 0.1; done
  fi
}

# kafka_wait N: wait until node N serves metadata
kafka_wait() {
  kafka_node "$1"
  local bport deadline=$((SECONDS + TIMEOUT))
  bport=$(cat "$KDIR/port")
  until kafka_ready "$bport"; do
    if [ -z "$(kafka_pid)" ]; then
      tail -n 20 "$KDIR/logs/kafka.out" "$KDIR/logs/server.log" >&2 2>/dev/null || true
      die "$KNAME exited during startup (logs in $KDIR/logs)"
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "$KNAME did not serve metadata on 127.0.0.1:$bport within ${TIMEOUT}s (logs in $KDIR/logs)"
    sleep 0.5
  done
  log "$KNAME ready on 127.0.0.1:$bport"
}

# kafka_up: every node started, then waited for (a cluster's nodes need each other's quorum)
# Every test run leaves its topics behind, and each partition holds files
# open in the broker: past this many partitions a stopped broker's data is
# test debris that would exhaust its open files, so `up` starts it afresh.
MOST_KEPT_PARTITIONS=6000

# kafka_reset_if_full: drop the data of every node when all are stopped and
# the first holds too many partitions (the nodes are started afresh together).
kafka_reset_if_full() {
  local i kept
  for i in $(seq 1 "$KAFKA_NODES"); do kafka_node "$i"; [ -n "$(kafka_pid)" ] && return 0; done
  kafka_node 1
  [ -d "$KDIR/data" ] || return 0
  kept=$(find "$KDIR/data" -mindepth 1 -maxdepth 1 -type d | wc -l)
  [ "$kept" -gt "$MOST_KEPT_PARTITIONS" ] || return 0
  log "kafka's data holds $kept partitions left by earlier runs; starting it afresh"
  for i in $(seq 1 "$KAFKA_NODES"); do kafka_node "$i"; rm -rf "$KDIR/data"; mkdir -p "$KDIR/data"; done
}

kafka_up() {
  local i
  kafka_reset_if_full
  for i in $(seq 1 "$KAFKA_NODES"); do kafka_launch "$i"; done
  for i in $(seq 1 "$KAFKA_NODES"); do kafka_wait "$i"; done
}

# kafka_stop N [KILL]: stop node N (SIGTERM, or SIGKILL at once with KILL)
kafka_stop() {
  kafka_node "$1"
  local pid
  pid=$(kafka_pid)
  if [ -z "$pid" ]; then log "$KNAME not running"; rm -f "$KDIR/kafka.pid"; return 0; fi
  if [ "${2:-}" = KILL ]; then
    log "killing $KNAME (pid $pid) with SIGKILL"
    kill_pid "$pid" "$KNAME"
  else
    log "stopping $KNAME (pid $pid)"
    stop_pid "$pid" "$KNAME"
  fi
  rm -f "$KDIR/kafka.pid"
}

kafka_down() {
  local i
  for i in $(seq 1 "$KAFKA_NODES"); do kafka_stop "$i"; done
}

# ---------------------------------------------------------------- redis

redis_pid() {
  local pid port
  pid=$(pid_of "$RDIR/redis.pid")
  port=$(cat "$RDIR/port" 2>/dev/null || echo none)
  # redis rewrites its command line to "redis-server 127.0.0.1:PORT"
  if pid_alive "$pid" "redis-server 127.0.0.1:$port"; then echo "$pid"; return 0; fi
  # pidfile lost: find it by that title
  [ "$port" = none ] || pgrep -f "^redis-server 127\\.0\\.0\\.1:$port\$" | head -n 1 || true
}

redis_ready() { [ "$(timeout 5 redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]; }

redis_start() {
  mkdir -p "$RDIR"
  local port pid
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server || die "redis-server is missing and could not be installed"
  command -v redis-cli >/dev/null 2>&1 || apt_install redis-tools || die "redis-cli is missing and could not be installed"
  port=$(port_file "$RDIR/port")
  pid=$(redis_pid)
  if [ -n "$pid" ]; then
    log "redis already running (pid $pid) on 127.0.0.1:$port"
  else
    port_bindable "$port" || die "redis port 127.0.0.1:$port is taken by another process (see: ss -ltnp | grep $port)"
    cat >"$RDIR/redis.conf" <<EOF
# written by integration/services.sh on every start
bind 127.0.0.1
port $port
protected-mode yes
daemonize yes
pidfile $RDIR/redis.pid
logfile $RDIR/redis.log
dir $RDIR
# Data survives stop/start through the snapshot Redis writes on shutdown.
# No AOF and no frequent snapshots: their rewrites (a fork compressing the
# whole dataset) would compete for the CPU the tests and benchmarks measure.
appendonly no
save 3600 1
EOF
    log "starting redis on 127.0.0.1:$port"
    rm -f "$RDIR/redis.pid"
    redis-server "$RDIR/redis.conf" </dev/null >/dev/null 2>>"$RDIR/redis.log" \
      || { tail -n 20 "$RDIR/redis.log" >&2; die "redis-server failed to start"; }
  fi
  local deadline=$((SECONDS + TIMEOUT))
  until redis_ready "$port"; do
    [ "$SECONDS" -lt "$deadline" ] || { tail -n 20 "$RDIR/redis.log" >&2; die "redis did not answer PING on 127.0.0.1:$port within ${TIMEOUT}s"; }
    sleep 0.2
  done
  log "redis ready on 127.0.0.1:$port"
}

# redis_stop [KILL]: SIGTERM (a snapshot is saved), or SIGKILL at once with KILL
redis_stop() {
  local pid
  pid=$(redis_pid)
  if [ -z "$pid" ]; then log "redis not running"; rm -f "$RDIR/redis.pid"; return 0; fi
  if [ "${1:-}" = KILL ]; then
    log "killing redis (pid $pid) with SIGKILL"
    kill_pid "$pid" redis
  else
    log "stopping redis (pid $pid)"
    stop_pid "$pid" redis
  fi
  rm -f "$RDIR/redis.pid"
}

# ---------------------------------------------------------------- redis cluster

# The nodes' ports, in creation order (the first three became the masters).
cluster_ports() {
  local i
  for i in $(seq 1 "$CLUSTER_REDIS_NODES"); do port_file "$CDIR/node-$i/port"; done
}

# cluster_dir PORT: the folder of the node listening on PORT
cluster_dir() {
  local d
  for d in "$CDIR"/node-*; do
    [ "$(cat "$d/port" 2>/dev/null)" = "$1" ] && { echo "$d"; return 0; }
  done
  die "no Redis Cluster node on port $1 in $CDIR (see: $0 status)"
}

cluster_node_pid() {
  local dir=$1 port pid
  port=$(cat "$dir/port")
  pid=$(pid_of "$dir/redis.pid")
  # a cluster node's title is "redis-server 127.0.0.1:PORT [cluster]"
  if pid_alive "$pid" "redis-server 127.0.0.1:$port"; then echo "$pid"; return 0; fi
  pgrep -f "^redis-server 127\\.0\\.0\\.1:$port( |\$)" | head -n 1 || true
}

# cluster_node_launch PORT: start one node (no-op when it runs), without waiting for it
cluster_node_launch() {
  local port=$1 dir
  dir=$(cluster_dir "$port")
  [ -n "$(cluster_node_pid "$dir")" ] && { log "redis-$port already running"; return 0; }
  port_bindable "$port" || die "redis port 127.0.0.1:$port is taken by another process"
  cat >"$dir/redis.conf" <<EOF
# written by integration/services.sh on every start
bind 127.0.0.1
port $port
protected-mode yes
daemonize yes
pidfile $dir/redis.pid
logfile $dir/redis.log
dir $dir
cluster-enabled yes
cluster-config-file nodes.conf
# A master that stops answering is failed over to its replica after 2 s: quick enough for the
# tests' fault injection. Every replica may take over, however long it was cut off.
cluster-node-timeout 2000
cluster-replica-validity-factor 0
appendonly no
save 3600 1
EOF
  log "starting redis-$port (cluster node)"
  rm -f "$dir/redis.pid"
  redis-server "$dir/redis.conf" </dev/null >/dev/null 2>>"$dir/redis.log" \
    || { tail -n 20 "$dir/redis.log" >&2; die "redis-server failed to start on $port"; }
}

cluster_state_ok() {
  timeout 5 redis-cli -h 127.0.0.1 -p "$1" CLUSTER INFO 2>/dev/null | grep -q '^cluster_state:ok'
}

# cluster_node_start PORT: start one node and wait until it answers and sees the cluster ok
cluster_node_start() {
  local port=$1 deadline=$((SECONDS + TIMEOUT))
  cluster_node_launch "$port"
  until redis_ready "$port" && { [ ! -f "$CDIR/created" ] || cluster_state_ok "$port"; }; do
    [ "$SECONDS" -lt "$deadline" ] || die "redis-$port did not answer (or see the cluster ok) within ${TIMEOUT}s"
    sleep 0.2
  done
  log "redis-$port ready"
}

# cluster_node_stop PORT [KILL]: stop one node (SIGTERM, or SIGKILL at once with KILL)
cluster_node_stop() {
  local port=$1 dir pid
  dir=$(cluster_dir "$port")
  pid=$(cluster_node_pid "$dir")
  if [ -z "$pid" ]; then log "redis-$port not running"; rm -f "$dir/redis.pid"; return 0; fi
  if [ "${2:-}" = KILL ]; then
    log "killing redis-$port (pid $pid) with SIGKILL"
    kill_pid "$pid" "redis-$port"
  else
    log "stopping redis-$port (pid $pid)"
    stop_pid "$pid" "redis-$port"
  fi
  rm -f "$dir/redis.pid"
}

# How many connected replicas a node's view of the cluster holds
cluster_replicas() {
  timeout 5 redis-cli -h 127.0.0.1 -p "$1" CLUSTER NODES 2>/dev/null \
    | awk '$3 ~ /slave/ && $3 !~ /fail/ && $8 == "connected"' | wc -l
}

cluster_up() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server || die "redis-server is missing and could not be installed"
  command -v redis-cli >/dev/null 2>&1 || apt_install redis-tools || die "redis-cli is missing and could not be installed"
  local ports port nodes=() deadline=$((SECONDS + TIMEOUT))
  ports=$(cluster_ports)
  for port in $ports; do cluster_node_launch "$port"; nodes+=("127.0.0.1:$port"); done
  for port in $ports; do
    until redis_ready "$port"; do
      [ "$SECONDS" -lt "$deadline" ] || die "redis-$port did not answer PING within ${TIMEOUT}s"
      sleep 0.2
    done
  done
  if [ ! -f "$CDIR/created" ]; then
    log "joining ${nodes[*]} into a Redis Cluster (3 masters, 1 replica each)"
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$CDIR/create.log" 2>&1 \
      || { tail -n 20 "$CDIR/create.log" >&2; die "redis-cli --cluster create failed (log in $CDIR/create.log)"; }
    touch "$CDIR/created"
  fi
  # every node sees every slot served, and every master with its replica
  for port in $ports; do
    until cluster_state_ok "$port" && [ "$(cluster_replicas "$port")" -ge 3 ]; do
      [ "$SECONDS" -lt "$deadline" ] || die "the Redis Cluster is not ok on $port within ${TIMEOUT}s"
      sleep 0.2
    done
  done
  log "redis cluster ready on $(echo $ports)"
}

cluster_down() {
  local port
  for port in $(cat "$CDIR"/node-*/port 2>/dev/null); do cluster_node_stop "$port"; done
}

# ---------------------------------------------------------------- shape

KAFKA_NODES=1
REDIS_CLUSTER=0

# The shape `up` was last given in this state folder, else the defaults.
load_shape() {
  if [ -s "$SHAPE" ]; then
    KAFKA_NODES=$(sed -n 's/^KAFKA_NODES=\([0-9][0-9]*\)$/\1/p' "$SHAPE")
    REDIS_CLUSTER=$(sed -n 's/^REDIS_CLUSTER=\([01]\)$/\1/p' "$SHAPE")
    : "${KAFKA_NODES:=1}" "${REDIS_CLUSTER:=0}"
  fi
}

# parse_shape strict|lenient ARGS...: --kafka-nodes N and --redis-cluster. Strict (for up),
# they must match a shape already kept; lenient (for env), the kept shape wins.
parse_shape() {
  local mode=$1 nodes="" cluster=""
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --kafka-nodes) [ $# -ge 2 ] || die "--kafka-nodes needs a number"; nodes=$2; shift 2 ;;
      --kafka-nodes=*) nodes=${1#*=}; shift ;;
      --redis-cluster) cluster=1; shift ;;
      *) die "unknown option $1" ;;
    esac
  done
  [ -z "$nodes" ] || [[ "$nodes" =~ ^[1-9]$ ]] || die "--kafka-nodes takes 1 to 9, not $nodes"
  if [ -s "$SHAPE" ] && [ "$mode" = lenient ]; then return 0; fi
  if [ -s "$SHAPE" ] && { [ -n "$nodes" ] || [ -n "$cluster" ]; }; then
    [ "${nodes:-1}" = "$KAFKA_NODES" ] && [ "${cluster:-0}" = "$REDIS_CLUSTER" ] \
      || die "$STATE holds services of another shape ($(tr '\n' ' ' <"$SHAPE")); use another OMNI_SERVICES_DIR or '$0 clean' first"
  fi
  KAFKA_NODES=${nodes:-$KAFKA_NODES}
  REDIS_CLUSTER=${cluster:-$REDIS_CLUSTER}
}

save_shape() {
  mkdir -p "$STATE"
  printf 'KAFKA_NODES=%s\nREDIS_CLUSTER=%s\n' "$KAFKA_NODES" "$REDIS_CLUSTER" >"$SHAPE"
}

# ---------------------------------------------------------------- commands

# svc ACTION NAME: start, stop (SIGTERM) or kill (SIGKILL) one service by name
svc() {
  local action=$1 name=${2:-} flag="" i port
  [ "$action" = kill ] && flag=KILL
  case "$name" in
    kafka)
      if [ "$action" = start ]; then kafka_up
      else for i in $(seq 1 "$KAFKA_NODES"); do kafka_stop "$i" $flag; done; fi ;;
    kafka-[1-9])
      i=${name#kafka-}
      [ "$i" -le "$KAFKA_NODES" ] || die "no $name: $KAFKA_NODES Kafka node(s) in $STATE"
      if [ "$action" = start ]; then kafka_start "$i"; else kafka_stop "$i" $flag; fi ;;
    redis)
      if [ "$REDIS_CLUSTER" = 1 ]; then
        if [ "$action" = start ]; then cluster_up
        else for port in $(cat "$CDIR"/node-*/port); do cluster_node_stop "$port" $flag; done; fi
      elif [ "$action" = start ]; then redis_start
      else redis_stop $flag; fi ;;
    redis-[0-9]*)
      [ "$REDIS_CLUSTER" = 1 ] || die "no Redis Cluster in $STATE: use 'redis'"
      port=${name#redis-}
      if [ "$action" = start ]; then cluster_node_start "$port"; else cluster_node_stop "$port" $flag; fi ;;
    *) die "usage: $0 $action kafka|kafka-N|redis|redis-PORT" ;;
  esac
}

cmd_env() {
  local brokers="" i url="" port
  for i in $(seq 1 "$KAFKA_NODES"); do
    [ -s "$(kafka_dir "$i")/port" ] || die "no ports yet in $STATE: run '$0 up' first"
    brokers="$brokers${brokers:+,}127.0.0.1:$(cat "$(kafka_dir "$i")/port")"
  done
  if [ "$REDIS_CLUSTER" = 1 ]; then
    for port in $(cat "$CDIR"/node-*/port 2>/dev/null); do url="$url${url:+,}127.0.0.1:$port"; done
    [ -n "$url" ] || die "no ports yet in $STATE: run '$0 up' first"
    url="redis+cluster://$url"
  else
    [ -s "$RDIR/port" ] || die "no ports yet in $STATE: run '$0 up' first"
    url="redis://127.0.0.1:$(cat "$RDIR/port")"
  fi
  echo "export OMNI_BROKERS=$brokers"
  echo "export OMNI_REDIS_URL=$url"
}

cmd_status() {
  local pid i dir port role name
  for i in $(seq 1 "$KAFKA_NODES"); do
    kafka_node "$i"
    name=kafka; [ "$KAFKA_NODES" = 1 ] || name=kafka-$i
    pid=$(kafka_pid)
    if [ -n "$pid" ]; then echo "$name: running, pid $pid, 127.0.0.1:$(cat "$KDIR/port")"
    else echo "$name: stopped (port $(cat "$KDIR/port" 2>/dev/null || echo unassigned))"; fi
  done
  if [ "$REDIS_CLUSTER" = 1 ]; then
    for dir in "$CDIR"/node-*; do
      [ -s "$dir/port" ] || continue
      port=$(cat "$dir/port")
      pid=$(cluster_node_pid "$dir")
      if [ -n "$pid" ]; then
        role=$(timeout 5 redis-cli -h 127.0.0.1 -p "$port" ROLE 2>/dev/null | head -n 1)
        echo "redis-$port: running, pid $pid, 127.0.0.1:$port, ${role:-unknown}"
      else echo "redis-$port: stopped"; fi
    done
  else
    pid=$(redis_pid)
    if [ -n "$pid" ]; then echo "redis: running, pid $pid, 127.0.0.1:$(cat "$RDIR/port")"
    else echo "redis: stopped (port $(cat "$RDIR/port" 2>/dev/null || echo unassigned))"; fi
  fi
  echo "state: $STATE"
}

# Stops whatever the folder holds, in the shape it was started with.
stop_everything() {
  kafka_down
  if [ "$REDIS_CLUSTER" = 1 ]; then cluster_down; else redis_stop; fi
}

load_shape
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  up)
    parse_shape strict "$@"; save_shape
    if [ "$REDIS_CLUSTER" = 1 ]; then cluster_up; else redis_start; fi
    kafka_up; cmd_status ;;
  down)   stop_everything ;;
  env)    parse_shape lenient "$@"; cmd_env ;;
  start)  svc start "${1:-}" ;;
  stop)   svc stop "${1:-}" ;;
  kill)   svc kill "${1:-}" ;;
  status) cmd_status ;;
  logs)
    case "${1:-}" in
      kafka) kafka_node 1; tail -n "${2:-50}" "$KDIR/logs/server.log" ;;
      kafka-[1-9]) kafka_node "${1#kafka-}"; tail -n "${2:-50}" "$KDIR/logs/server.log" ;;
      redis) tail -n "${2:-50}" "$RDIR/redis.log" ;;
      redis-[0-9]*) tail -n "${2:-50}" "$(cluster_dir "${1#redis-}")/redis.log" ;;
      *) die "usage: $0 logs kafka|kafka-N|redis|redis-PORT [lines]" ;;
    esac ;;
  clean)  stop_everything; log "removing $STATE"; rm -rf "$STATE" ;;
  *)
    echo "usage: $0 up [--kafka-nodes N] [--redis-cluster]|down|env [FLAGS]|status|clean|start SVC|stop SVC|kill SVC|logs SVC [LINES]" >&2
    exit 2 ;;
esac
