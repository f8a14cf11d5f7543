#!/usr/bin/env bash
# Runs the Python and Node clients of the Omni service (integration/clients/)
# against the real Kafka and Redis in OMNI_BROKERS / OMNI_REDIS_URL, each with
# a job (`omni run`) and an `omni serve` of its own. The Python packages live
# in a virtualenv and the Node packages in a folder under ~/.cache/omni, made
# on the first run and reused after. Needs target/release/omni built.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${OMNI_BROKERS:?set OMNI_BROKERS (eval \"\$(bash integration/services.sh env)\")}"
: "${OMNI_REDIS_URL:?set OMNI_REDIS_URL}"
omni="$PWD/target/release/omni"
cache="${OMNI_CACHE_DIR:-$HOME/.cache/omni}"
mkdir -p "$cache"

# What a fresh Debian machine lacks for the clients.
missing=()
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  echo "clients: apt-get install ${missing[*]}" >&2
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

venv="$cache/clients-venv"
if ! "$venv/bin/python" -c 'import grpc, grpc_tools' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'grpcio>=1.62' 'grpcio-tools>=1.62'
fi
node_dir="$cache/clients-node"
if ! cmp -s integration/clients/node/package.json "$node_dir/package.json" || [ ! -d "$node_dir/node_modules/@grpc/grpc-js" ]; then
  mkdir -p "$node_dir"
  cp integration/clients/node/package.json "$node_dir/"
  (cd "$node_dir" && npm install --cache "$cache/npm" --no-audit --no-fund --loglevel=error >/dev/null)
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The Python stubs, generated from proto/ now.
mkdir -p "$work/stubs"
"$venv/bin/python" -m grpc_tools.protoc -Iproto --python_out="$work/stubs" --grpc_python_out="$work/stubs" \
  proto/tecate.proto proto/omni.proto proto/omni/v1/service.proto

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# run_client <name> <command…>: a topology, an `omni serve` and the client; the
# client starts, kills and restarts the job itself.
run_client() {
  local name=$1; shift
  local id="omni-clients-$name-$RANDOM$RANDOM" dir="$work/$name" port
  mkdir -p "$dir"
  port=$(free_port)
  sed -e "s|^application_id *=.*|application_id = \"$id\"|" -e "s|^inputs *=.*|inputs = [\"$id.in\"]|" \
      -e "s|^broadcast_topic *=.*|broadcast_topic = \"$id.bc\"|" -e "s|^dead_letter_topic *=.*|dead_letter_topic = \"$id.dlq\"|" \
      -e "s|^key_prefix *=.*|key_prefix = \"$id\"|" -e "s|^dir *=.*|dir = \"$dir/state\"|" -e "s|^partitions *=.*|partitions = 4|" \
      topologies/room-state.toml >"$dir/topology.toml"
  printf '\n[instance]\nid = "%s"\n' "$name" >>"$dir/topology.toml"
  # The job makes the topics; serve waits for the broadcast topic meanwhile.
  "$omni" serve --topology "$dir/topology.toml" --listen "127.0.0.1:$port" >"$dir/serve.log" 2>&1 &
  local serve=$!
  pids+=("$serve")
  local started=$SECONDS
  if ! "$@" "127.0.0.1:$port" "$omni" "$dir/topology.toml" "$OMNI_REDIS_URL" "$id" "$id"; then
    echo "clients: the $name client failed; omni serve's log:" >&2
    tail -n 30 "$dir/serve.log" >&2
    for log in "$dir"/topology.toml.run-*.log; do echo "--- $log" >&2; tail -n 20 "$log" >&2; done
    exit 1
  fi
  kill -TERM "$serve"
  wait "$serve" || { echo "clients: omni serve did not exit cleanly on SIGTERM" >&2; exit 1; }
  echo "clients: $name client passed in $((SECONDS - started)) s" >&2
}

run_client python "$venv/bin/python" integration/clients/python/check.py "$work/stubs"
NODE_PATH="$node_dir/node_modules" run_client node node integration/clients/node/check.js "$PWD/proto"
