#!/usr/bin/env bash
# The main job on embedded defaults: no Kafka or Redis to install or start.
# Ctrl-C stops it within a few seconds (a second Ctrl-C at once), and the
# redis-server it starts never outlives it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash integration/bootstrap.sh
cargo build --release --locked --bin omni
# omni itself takes the terminal's signals: no cargo in between to hold them.
exec "${CARGO_TARGET_DIR:-target}/release/omni" demo "$@"
