#!/usr/bin/env bash
# The whole test suite: installs what it needs, starts a real Kafka broker
# and a real Redis on loopback, runs every test against them, and stops them.
set -euo pipefail
cd "$(dirname "$0")/.."

bash integration/bootstrap.sh
bash integration/services.sh up
trap 'bash integration/services.sh down >/dev/null 2>&1 || true' EXIT
eval "$(bash integration/services.sh env)"
export OMNI_BROKERS OMNI_REDIS_URL
export OMNI_SERVICES_SH="$PWD/integration/services.sh"

# One profile for everything, so RocksDB and librdkafka compile once. Unit,
# end-to-end and documentation tests all run.
cargo build --release --locked --bins
cargo test --release --locked -- --test-threads=4 "$@"
