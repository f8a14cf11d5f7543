#!/usr/bin/env bash
# Installs what building and testing omni needs on a fresh Debian machine,
# and nothing that is already there: libclang for RocksDB's bindings, the
# OpenSSL, SASL and zlib headers librdkafka builds against, Redis and kcat.
# Safe to run again; a machine that has everything runs no apt command.
set -euo pipefail

missing=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for pkg in libclang-dev clang libssl-dev libsasl2-dev zlib1g-dev pkg-config cmake make g++ redis-server redis-tools kcat maven python3; do
  have_pkg "$pkg" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || { echo "bootstrap: install ${missing[*]} (no apt-get here)" >&2; exit 1; }
  echo "bootstrap: apt-get install ${missing[*]}" >&2
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "bootstrap: Rust (cargo) is needed: https://rustup.rs" >&2; exit 1; }
