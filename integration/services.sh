#!/usr/bin/env bash
# Real services for omni's integration tests, without Docker:
#   - Apache Kafka 4.4.0 (KRaft, one node acting as broker and controller), run from the jars
#     that Maven resolves from Maven Central (integration/kafka/pom.xml), as a plain
#     `java -cp 'libs/*' kafka.Kafka server.properties` process;
#   - Redis (redis-server from Debian's packages, installed with apt-get when missing).
# Both listen on 127.0.0.1 only, on ports picked once and kept in the state folder.
#
# Usage: integration/services.sh up|down|env|status|clean|start SVC|stop SVC|logs SVC
#   up            start Kafka and Redis (no-op for those already running), wait until they answer
#   down          stop both (SIGTERM, then SIGKILL after a timeout); data and ports are kept
#   env           print 'export OMNI_BROKERS=...' and 'export OMNI_REDIS_URL=...' lines for eval
#   start SVC     start one service (kafka|redis), same port and data as before
#   stop SVC      stop one service, keep its port and data (fault injection)
#   status        show what runs where
#   logs SVC      tail the service's log
#   clean         down, then delete the state folder
#
# Env: OMNI_SERVICES_DIR   state folder (default <repo>/integration/.state)
#      OMNI_SERVICES_CACHE jar cache     (default <repo>/integration/.cache)
#      OMNI_SERVICES_TIMEOUT readiness timeout in seconds (default 120)
#      KAFKA_HEAP_OPTS     JVM heap options (default -Xms256m -Xmx768m)
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
KDIR=$STATE/kafka
RDIR=$STATE/redis

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
  taken=$(cat "$KDIR/port" "$KDIR/controller.port" "$RDIR/port" 2>/dev/null || true)
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

kafka_write_config() {
  local bport=$1 cport=$2
  cat >"$KDIR/server.properties.tmp" <<EOF
# written by integration/services.sh on every start; edit the script, not this file
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$bport,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$bport,CONTROLLER://127.0.0.1:$cport
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KDIR/data
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# A new group's members (omni's processing threads) join in one rebalance.
group.initial.rebalance.delay.ms=300
num.recovery.threads.per.data.dir=1
num.network.threads=2
num.io.threads=4
EOF
  mv "$KDIR/server.properties.tmp" "$KDIR/server.properties"
}

kafka_java_opts() {
  # shellcheck disable=SC2206
  JOPTS=(${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m} -XX:+UseG1GC -XX:MaxGCPauseMillis=20
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
    [[ "$md" == *"broker 1 at 127.0.0.1:$port"* ]]
  else
    # only lines logged since this start count (the log is kept across restarts)
    tail -c +"$((${KAFKA_LOG_OFFSET:-0} + 1))" "$KDIR/logs/server.log" 2>/dev/null | grep -q "Kafka Server started"
  fi
}

kafka_start() {
  mkdir -p "$KDIR/logs" "$KDIR/data"
  local bport cport pid java
  bport=$(port_file "$KDIR/port")
  cport=$(port_file "$KDIR/controller.port")
  command -v kcat >/dev/null 2>&1 || apt_install kcat \
    || log "no kcat: readiness falls back to the broker's 'Kafka Server started' log line"
  pid=$(kafka_pid)
  if [ -n "$pid" ]; then
    log "kafka already running (pid $pid) on 127.0.0.1:$bport"
  else
    port_bindable "$bport" || die "kafka port 127.0.0.1:$bport is taken by another process (see: ss -ltnp | grep $bport)"
    port_bindable "$cport" || die "kafka controller port 127.0.0.1:$cport is taken by another process"
    kafka_libs
    java=$(java_bin)
    kafka_java_opts
    kafka_write_config "$bport" "$cport"
    if [ ! -f "$KDIR/data/meta.properties" ]; then
      [ -s "$KDIR/cluster.id" ] || "$java" "${JOPTS[@]}" kafka.tools.StorageTool random-uuid \
        >"$KDIR/cluster.id" 2>>"$KDIR/logs/format.out" || die "kafka.tools.StorageTool random-uuid failed"
      log "formatting KRaft storage (cluster $(cat "$KDIR/cluster.id"))"
      "$java" "${JOPTS[@]}" kafka.tools.StorageTool format --standalone \
        -t "$(cat "$KDIR/cluster.id")" -c "$KDIR/server.properties" >>"$KDIR/logs/format.out" 2>&1 \
        || { tail -n 20 "$KDIR/logs/format.out" >&2; die "formatting Kafka storage failed"; }
    fi
    log "starting kafka $KAFKA_VERSION on 127.0.0.1:$bport (controller $cport)"
    KAFKA_LOG_OFFSET=$(stat -c %s "$KDIR/logs/server.log" 2>/dev/null || echo 0)
    # own session, no terminal, nothing inherited: the broker outlives this script.
    # bash -c writes its own pid (kept by exec) to the pidfile, then becomes the JVM.
    # shellcheck disable=SC2016
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$KDIR/kafka.pid" \
      "$java" "${JOPTS[@]}" kafka.Kafka "$KDIR/server.properties" \
      </dev/null >"$KDIR/logs/kafka.out" 2>&1 &
    for _ in $(seq 1 50); do [ -s "$KDIR/kafka.pid" ] && break; sleep 0.1; done
  fi
  local deadline=$((SECONDS + TIMEOUT))
  until kafka_ready "$bport"; do
    if [ -z "$(kafka_pid)" ]; then
      tail -n 20 "$KDIR/logs/kafka.out" "$KDIR/logs/server.log" >&2 2>/dev/null || true
      die "kafka exited during startup (logs in $KDIR/logs)"
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "kafka did not serve metadata on 127.0.0.1:$bport within ${TIMEOUT}s (logs in $KDIR/logs)"
    sleep 0.5
  done
  log "kafka ready on 127.0.0.1:$bport"
}

kafka_stop() {
  local pid
  pid=$(kafka_pid)
  if [ -z "$pid" ]; then log "kafka not running"; rm -f "$KDIR/kafka.pid"; return 0; fi
  log "stopping kafka (pid $pid)"
  stop_pid "$pid" kafka
  rm -f "$KDIR/kafka.pid"
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

redis_stop() {
  local pid
  pid=$(redis_pid)
  if [ -z "$pid" ]; then log "redis not running"; rm -f "$RDIR/redis.pid"; return 0; fi
  log "stopping redis (pid $pid)"
  stop_pid "$pid" redis
  rm -f "$RDIR/redis.pid"
}

# ---------------------------------------------------------------- commands

svc() {
  case "${2:-}" in
    kafka|redis) "${2}_$1" ;;
    *) die "usage: $0 $1 kafka|redis" ;;
  esac
}

cmd_env() {
  [ -s "$KDIR/port" ] && [ -s "$RDIR/port" ] || die "no ports yet in $STATE: run '$0 up' first"
  echo "export OMNI_BROKERS=127.0.0.1:$(cat "$KDIR/port")"
  echo "export OMNI_REDIS_URL=redis://127.0.0.1:$(cat "$RDIR/port")"
}

cmd_status() {
  local pid
  pid=$(kafka_pid)
  if [ -n "$pid" ]; then echo "kafka: running, pid $pid, 127.0.0.1:$(cat "$KDIR/port")"
  else echo "kafka: stopped (port $(cat "$KDIR/port" 2>/dev/null || echo unassigned))"; fi
  pid=$(redis_pid)
  if [ -n "$pid" ]; then echo "redis: running, pid $pid, 127.0.0.1:$(cat "$RDIR/port")"
  else echo "redis: stopped (port $(cat "$RDIR/port" 2>/dev/null || echo unassigned))"; fi
  echo "state: $STATE"
}

case "${1:-}" in
  up)     redis_start; kafka_start; cmd_status ;;
  down)   kafka_stop; redis_stop ;;
  env)    cmd_env ;;
  start)  svc start "${2:-}" ;;
  stop)   svc stop "${2:-}" ;;
  status) cmd_status ;;
  logs)
    case "${2:-}" in
      kafka) tail -n "${3:-50}" "$KDIR/logs/server.log" ;;
      redis) tail -n "${3:-50}" "$RDIR/redis.log" ;;
      *) die "usage: $0 logs kafka|redis [lines]" ;;
    esac ;;
  clean)  kafka_stop; redis_stop; log "removing $STATE"; rm -rf "$STATE" ;;
  *)
    echo "usage: $0 up|down|env|status|clean|start kafka|redis|stop kafka|redis|logs kafka|redis" >&2
    exit 2 ;;
esac
