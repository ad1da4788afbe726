#!/usr/bin/env bash
# Runs the ringlb demo: three local backends, ringlb in front of them with the
# embedded config/demo.toml, some traffic, and how it spread over the weights;
# then a database failover, timed.
# Same as `cargo run --release -- demo`; extra arguments go to `ringlb demo`
# (e.g. --connections 1000). Everything stops on exit or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --quiet -- demo "$@"
