#!/usr/bin/env bash
# The main job on embedded defaults: no Kafka or Redis to install or start.
set -euo pipefail
cd "$(dirname "$0")/.."
bash integration/bootstrap.sh
exec cargo run --release --locked --bin omni -- demo "$@"
