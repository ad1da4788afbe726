#!/usr/bin/env bash
# What accepting PROXY headers, SNI routing and the JSON access log cost per
# connection: HTTP keep-alive and Connection: close through two ringlbs in a
# chain (wrk -> front -> back -> nginx), with the feature on the back one:
#
#   base   front sends nothing, back plain
#   proxy  front proxy_protocol = "v1", back accept_proxy = "v1"
#   sni    back has a [[listener.route]] (plain HTTP: "not TLS" at the first byte, default pool)
#   json   back [control] access_log = "json" to a file
#
#   PORT_BASE=2xxxx bench/preread.sh [--rounds N] [--duration S]
#
# Variants alternate within each round; medians are printed (req/s and the
# ratio to base). Needs wrk and nginx (bench/setup.sh) and target/release/ringlb.
# Everything on 127.0.0.1; every process started here is stopped on exit.
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$BENCH")
ROUNDS=3
DUR=5
PORT_BASE=${PORT_BASE:-19300}
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DUR=$2; shift 2 ;;
        *) sed -n '2,16p' "$0"; exit 2 ;;
    esac
done
for t in wrk nginx; do command -v $t >/dev/null || { echo "missing $t: run bench/setup.sh" >&2; exit 1; }; done
[ -x "$REPO/target/release/ringlb" ] || { echo "build first: cargo build --release" >&2; exit 1; }
BE=$((PORT_BASE + 1)); FRONT=$((PORT_BASE + 21)); BACK=$((PORT_BASE + 22))
TMP=$(mktemp -d /tmp/ringlb-preread.XXXXXX)
cp "$REPO/target/release/ringlb" "$TMP/ringlb"
PIDS=()
stop() { local p; for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done; for p in "$@"; do wait "$p" 2>/dev/null || true; done; }
cleanup() { stop "${PIDS[@]}"; rm -rf "$TMP"; }
trap cleanup EXIT
wait_listen() { for _ in $(seq 100); do ss -Htln "sport = :$1" | grep -q . && return 0; sleep 0.1; done; echo "port $1 did not listen" >&2; exit 1; }

mkdir -p "$TMP/nginx/tmp"
cat > "$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
daemon off;
events { worker_connections 8000; }
http {
    access_log off; keepalive_timeout 300s; keepalive_requests 10000000;
    client_body_temp_path $TMP/nginx/tmp; proxy_temp_path $TMP/nginx/tmp; fastcgi_temp_path $TMP/nginx/tmp;
    uwsgi_temp_path $TMP/nginx/tmp; scgi_temp_path $TMP/nginx/tmp;
    server { listen 127.0.0.1:$BE backlog=4096; location / { default_type text/plain; return 200 "ringlb preread bench\n"; } }
}
EOF
nginx -e "$TMP/nginx/error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" > /dev/null 2>&1 &
PIDS+=($!)
wait_listen $BE

lb() { # name port pool-addr extra-listener extra-control
    cat > "$TMP/$1.toml" <<EOF
[runtime]
workers = 1
io_engine = "uring"
shutdown_timeout = "1s"
[control]
$5
[[listener]]
name = "$1"
bind = "127.0.0.1:$2"
pool = "p"
$4
[[pool]]
name = "p"
[[pool.backend]]
addr = "$3"
[[pool]]
name = "other"
[[pool.backend]]
addr = "$3"
EOF
    RUST_LOG=warn "$TMP/ringlb" run -c "$TMP/$1.toml" > "$TMP/$1.log" 2>&1 &
    echo $!
}

run_variant() { # variant -> "ka close"
    local front_extra="" back_extra="" back_control=""
    case "$1" in
        proxy) front_extra='proxy_protocol = "v1"'; back_extra=$'accept_proxy = "v1"\ntrusted_sources = ["127.0.0.1"]' ;;
        sni) back_extra=$'[[listener.route]]\nsni = "db.example.com"\npool = "other"' ;;
        json) back_control="access_log = \"json\""$'\n'"access_log_file = \"$TMP/access.log\"" ;;
    esac
    local b f
    b=$(lb back $BACK "127.0.0.1:$BE" "$back_extra" "$back_control")
    f=$(lb front $FRONT "127.0.0.1:$BACK" "$front_extra" "")
    wait_listen $BACK; wait_listen $FRONT
    curl -s -o /dev/null "http://127.0.0.1:$FRONT/" || { echo "$1: chain does not answer" >&2; cat "$TMP"/*.log >&2; exit 1; }
    local ka close
    ka=$(wrk -t1 -c32 -d"${DUR}s" "http://127.0.0.1:$FRONT/" | awk '/Requests\/sec/ {print $2}')
    close=$(wrk -t1 -c32 -d"${DUR}s" -H 'Connection: close' "http://127.0.0.1:$FRONT/" | awk '/Requests\/sec/ {print $2}')
    stop "$f" "$b"
    rm -f "$TMP/access.log"
    echo "$ka $close"
}

VARIANTS=(base proxy sni json)
declare -A KA CLOSE
for r in $(seq "$ROUNDS"); do
    for v in "${VARIANTS[@]}"; do
        read -r ka close < <(run_variant "$v")
        KA[$v]+="$ka "; CLOSE[$v]+="$close "
        printf 'round %s %-5s keep-alive %10s req/s   close %9s conn/s\n' "$r" "$v" "$ka" "$close" >&2
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
bka=$(echo "${KA[base]}" | median); bclose=$(echo "${CLOSE[base]}" | median)
printf '\n| variant | keep-alive req/s | vs base | close conn/s | vs base |\n|---|---|---|---|---|\n'
for v in "${VARIANTS[@]}"; do
    ka=$(echo "${KA[$v]}" | median); close=$(echo "${CLOSE[$v]}" | median)
    printf '| %s | %.0f | %.3f | %.0f | %.3f |\n' "$v" "$ka" "$(echo "$ka / $bka" | bc -l)" "$close" "$(echo "$close / $bclose" | bc -l)"
done
