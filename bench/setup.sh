#!/usr/bin/env bash
# Prepare the machine for bench/run.sh. Idempotent; run as root on Debian/Ubuntu.
#
# Installs with apt-get (nothing else is downloaded):
#   wrk                 HTTP load generator (keep-alive and Connection: close loads)
#   iperf3              TCP throughput (client and the iperf3 server backend)
#   haproxy             peer balancer, tcp mode
#   nginx               HTTP backends, and the peer "nginx stream" balancer
#   libnginx-mod-stream nginx's stream (L4 proxy) module
# python3 must already be present (bench/idle_conns.py, bench/benchlib.py).
# Then builds ringlb: cargo build --release -> target/release/ringlb.
#
# The packages' own services are not used: run.sh starts its own nginx/haproxy
# instances with configs in a temp dir. If the package install started the
# system nginx/haproxy service, that is left as it is (they bind :80 / nothing
# that run.sh uses).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PKGS=(wrk iperf3 haproxy nginx libnginx-mod-stream)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "packages already installed: ${PKGS[*]}"
fi

command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || { echo "nginx stream module missing" >&2; exit 1; }

echo "building ringlb (release)"
(cd "$REPO" && cargo build --release)
"$REPO/target/release/ringlb" --version || true

echo "versions: $(haproxy -v | head -1 | awk '{print $1, $3}'), $(nginx -v 2>&1), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'), $(iperf3 --version | head -1)"
echo "fd limit (soft/hard): $(ulimit -n)/$(ulimit -Hn) -- run.sh raises soft to hard"
echo "ready: bench/run.sh --quick for a smoke test, bench/run.sh for the full comparison"
