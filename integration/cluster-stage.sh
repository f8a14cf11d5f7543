#!/usr/bin/env bash
# The cluster stage of integration/test.sh (tests/e2e/cluster.rs): three
# Kafka nodes and a Redis Cluster of three masters and three replicas, in a
# state folder of their own (other ports), since the tests kill their nodes.
# One test at a time; the folder is deleted afterwards, so each run starts
# from an empty cluster. Runs alone too: `bash integration/cluster-stage.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."

cluster_dir="$PWD/integration/.state/cluster"
cluster() { OMNI_SERVICES_DIR="$cluster_dir" bash integration/services.sh "$@"; }
trap 'cluster clean >/dev/null 2>&1 || true' EXIT
started=$SECONDS
cluster up --kafka-nodes 3 --redis-cluster
eval "$(cluster env | sed 's/^\(export \)\{0,1\}OMNI_/export OMNI_CLUSTER_/')"
export OMNI_CLUSTER_SERVICES_DIR="$cluster_dir"
# The tests take every address from the cluster; the shared services, when
# test.sh runs this, stay untouched. Run alone, the cluster stands in for them.
export OMNI_BROKERS="${OMNI_BROKERS:-$OMNI_CLUSTER_BROKERS}" OMNI_REDIS_URL="${OMNI_REDIS_URL:-$OMNI_CLUSTER_REDIS_URL}"
cargo build --release --locked --bins
cargo test --release --locked --test e2e cluster:: -- --test-threads=1 "$@"
echo "test.sh: cluster stage passed in $((SECONDS - started)) s" >&2
