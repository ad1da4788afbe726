#!/bin/sh
# The long chaos run: tests/chaos.rs for 30 minutes on io_uring (and a
# quarter of that on epoll), release build. See tests/README.md, "Chaos run".
#   bench/chaos.sh                 # 1800 s, seed 1
#   CHAOS_SECS=300 CHAOS_SEED=42 bench/chaos.sh
#   bench/chaos.sh chaos_io_uring  # one engine only (test name filter)
set -eu
cd "$(dirname "$0")/.."
# Descriptor bursts and thousands of connections: the test process needs room.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
export CHAOS_SECS="${CHAOS_SECS:-1800}"
export CHAOS_SEED="${CHAOS_SEED:-1}"
exec cargo test --release --test chaos -- --nocapture --test-threads=1 "$@"
