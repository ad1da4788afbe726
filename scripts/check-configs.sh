#!/usr/bin/env bash
# Validates every example config under config/ with `ringlb check`, the way an
# operator would before a deploy or reload. Exits 1 if any is invalid.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
status=0
for f in config/*.toml; do
    ./target/release/ringlb check -c "$f" || status=1
done
exit $status
