#!/usr/bin/env bash
# UDP request/response benchmark: ringlb vs nginx stream (UDP) vs the direct
# path (client -> one echo backend, no balancer), alternating within each round.
#
#   bench/udp.sh [--rounds N] [--duration S] [--workers W]
#                [--flows F] [--window K] [--size B] [--engine uring|epoll]
#
# Defaults: 3 rounds, 5 s per run, 2 workers, 64 flows x 8 in flight, 64-byte
# payloads, ringlb on io_uring. Compiles bench/udp_echo.c and bench/udp_load.c
# (gcc -O2), starts two echo backends, ringlb (one udp listener) and nginx
# (its own config and pid, not the system nginx). Everything binds and targets
# 127.0.0.1 only, every load is bounded in time, every process started here is
# stopped on exit or Ctrl-C; files live in a temp dir (KEEP_TMP=1 keeps it).
# Ports: PORT_BASE (19400) + 1, 2 (backends), 21 (ringlb), 41 (nginx).
# NGINX_RESPONSES= (empty) drops nginx's "proxy_responses 1" (a side experiment).
# Comparing two ringlb builds or settings: RINGLB_B=BIN adds "ringlb_b" (that
# binary, port +22) to the rotation; RINGLB_EXTRA / RINGLB_B_EXTRA are lines
# added to each one's listener (e.g. 'proxy_protocol = "v2"'); SYSTEMS picks
# what runs (default "ringlb nginx direct", plus ringlb_b when set). With
# proxy_protocol in either, the echo backends answer without the header.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$BENCH")

ROUNDS=3
DUR=5
WORKERS=2
FLOWS=64
WINDOW=8
SIZE=64
ENGINE=uring
WARMUP=${WARMUP:-0.5}
PORT_BASE=${PORT_BASE:-19400}
NGINX_RESPONSES=${NGINX_RESPONSES-1}   # nginx proxy_responses; NGINX_RESPONSES= (empty) omits it
RINGLB=${RINGLB:-$REPO/target/release/ringlb}
RINGLB_B=${RINGLB_B:-}
RINGLB_EXTRA=${RINGLB_EXTRA:-}
RINGLB_B_EXTRA=${RINGLB_B_EXTRA:-}

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DUR=$2; shift 2 ;;
        --workers) WORKERS=$2; shift 2 ;;
        --flows) FLOWS=$2; shift 2 ;;
        --window) WINDOW=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --engine) ENGINE=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done
case "$ENGINE" in uring|epoll) ;; *) echo "--engine must be uring or epoll" >&2; exit 2 ;; esac
for v in ROUNDS DUR WORKERS FLOWS WINDOW SIZE PORT_BASE; do
    [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -ge 1 ] || { echo "$v must be a whole number >= 1" >&2; exit 2; }
done

for t in gcc nginx python3 ss; do
    command -v "$t" >/dev/null || { echo "missing $t" >&2; exit 1; }
done
NGX_STREAM_MOD=/usr/lib/nginx/modules/ngx_stream_module.so
[ -f "$NGX_STREAM_MOD" ] || { echo "missing $NGX_STREAM_MOD: apt-get install -y libnginx-mod-stream" >&2; exit 1; }
[ -x "$RINGLB" ] || { echo "missing $RINGLB: cargo build --release" >&2; exit 1; }

BE1=$((PORT_BASE + 1)); BE2=$((PORT_BASE + 2))
declare -A PORT=([direct]=$BE1 [ringlb]=$((PORT_BASE + 21)) [ringlb_b]=$((PORT_BASE + 22)) [nginx]=$((PORT_BASE + 41)))
[ -z "$RINGLB_B" ] || [ -x "$RINGLB_B" ] || { echo "RINGLB_B=$RINGLB_B is not an executable" >&2; exit 1; }

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
TMP=$(mktemp -d /tmp/ringlb-udpbench.XXXXXX)
STARTED=()
WALL0=$(date +%s)

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local p
    for p in "${STARTED[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 1 30); do
        local alive=0
        for p in "${STARTED[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for p in "${STARTED[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    if [ "${KEEP_TMP:-0}" = 1 ]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

die() { echo "udp.sh: $*" >&2; exit 1; }

udp_bound() { ss -Hlun "sport = :$1" 2>/dev/null | grep -q .; }
wait_udp() {
    for _ in $(seq 1 100); do udp_bound "$1" && return 0; sleep 0.05; done
    die "$2 did not bind udp 127.0.0.1:$1"
}
for p in "$BE1" "$BE2" "${PORT[ringlb]}" "${PORT[ringlb_b]}" "${PORT[nginx]}"; do
    udp_bound "$p" && die "udp port $p already in use (set PORT_BASE)"
done

# --- build the C tools -------------------------------------------------------
gcc -O2 -Wall -o "$TMP/udp_echo" "$BENCH/udp_echo.c"
gcc -O2 -Wall -o "$TMP/udp_load" "$BENCH/udp_load.c"

# --- backends ----------------------------------------------------------------
ECHO_ARGS=()
case "$RINGLB_EXTRA$RINGLB_B_EXTRA" in *proxy_protocol*) ECHO_ARGS=(--strip-proxy) ;; esac
"$TMP/udp_echo" "$BE1" "${ECHO_ARGS[@]}" > "$TMP/echo1.log" 2>&1 & STARTED+=($!); ECHO1=$!
"$TMP/udp_echo" "$BE2" "${ECHO_ARGS[@]}" > "$TMP/echo2.log" 2>&1 & STARTED+=($!); ECHO2=$!
wait_udp "$BE1" "udp_echo"; wait_udp "$BE2" "udp_echo"

# --- ringlb ------------------------------------------------------------------
# ringlb_config NAME PORT EXTRA: a config with one udp listener.
ringlb_config() {
cat <<EOF
[runtime]
workers = $WORKERS
io_engine = "$ENGINE"
shutdown_timeout = "1s"

[control]
socket = "$TMP/$1.sock"

[[listener]]
name = "udp"
bind = "127.0.0.1:$2"
protocol = "udp"
pool = "echo"
idle_timeout = "60s"
$3

[[pool]]
name = "echo"

[[pool.backend]]
addr = "127.0.0.1:$BE1"

[[pool.backend]]
addr = "127.0.0.1:$BE2"
EOF
}
ringlb_config ringlb "${PORT[ringlb]}" "$RINGLB_EXTRA" > "$TMP/ringlb.toml"
"$RINGLB" check -c "$TMP/ringlb.toml" >/dev/null || die "ringlb check failed"
RUST_LOG=${RUST_LOG:-info} "$RINGLB" run -c "$TMP/ringlb.toml" > "$TMP/ringlb.log" 2>&1 & STARTED+=($!); RINGLB_PID=$!
wait_udp "${PORT[ringlb]}" "ringlb"
RINGLB_B_PID=""
if [ -n "$RINGLB_B" ]; then
    ringlb_config ringlb_b "${PORT[ringlb_b]}" "$RINGLB_B_EXTRA" > "$TMP/ringlb_b.toml"
    "$RINGLB_B" check -c "$TMP/ringlb_b.toml" >/dev/null || die "ringlb_b check failed"
    RUST_LOG=${RUST_LOG:-info} "$RINGLB_B" run -c "$TMP/ringlb_b.toml" > "$TMP/ringlb_b.log" 2>&1 & STARTED+=($!); RINGLB_B_PID=$!
    wait_udp "${PORT[ringlb_b]}" "ringlb_b"
fi

# --- nginx stream (UDP) ------------------------------------------------------
mkdir -p "$TMP/nginx/logs"
cat > "$TMP/nginx/nginx.conf" <<EOF
load_module $NGX_STREAM_MOD;
daemon off;
master_process on;
worker_processes $WORKERS;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 8192; }
stream {
    upstream u {
        hash \$remote_addr\$remote_port consistent;
        server 127.0.0.1:$BE1;
        server 127.0.0.1:$BE2;
    }
    server {
        listen 127.0.0.1:${PORT[nginx]} udp reuseport;
        proxy_pass u;
$( [ -n "$NGINX_RESPONSES" ] && echo "        proxy_responses $NGINX_RESPONSES;" )
        proxy_timeout 60s;
    }
}
EOF
nginx -t -q -e "$TMP/nginx/error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" || die "nginx config"
nginx -e "$TMP/nginx/error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" > "$TMP/nginx/stdout.log" 2>&1 & STARTED+=($!); NGINX_PID=$!
wait_udp "${PORT[nginx]}" "nginx"
sleep 0.2

# The processes whose CPU counts as "the balancer" (nginx: master + workers).
cpu_pids() {
    case "$1" in
        ringlb) echo "$RINGLB_PID" ;;
        ringlb_b) echo "$RINGLB_B_PID" ;;
        nginx) echo "$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')" | xargs | tr ' ' ',' ;;
        direct) echo "$ECHO1" ;;   # the one echo backend it hits (informational)
    esac
}
udp_rcvbuf_errors() { awk '/^Udp:/ { if (h) { print $6; exit } h = 1 }' /proc/net/snmp; }
ringlb_counters() {  # SYSTEM -> datagrams_in datagrams_out datagrams_dropped refused(sum)
    "$RINGLB" ctl -s "$TMP/$1.sock" --json stats 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
d = d.get("data", d)
l = [x for x in d["listeners"] if x["name"] == "udp"][0]
print(l["datagrams_in"], l["datagrams_out"], l["datagrams_dropped"], sum(l["refused"].values()))
' 2>/dev/null || echo "? ? ? ?"
}

echo "# udp.sh: rounds=$ROUNDS duration=${DUR}s workers=$WORKERS engine=$ENGINE flows=$FLOWS window=$WINDOW size=${SIZE}B" \
     "nproc=$(nproc) kernel=$(uname -r)"
echo "# ringlb $("$RINGLB" --version 2>/dev/null | head -1), $(nginx -v 2>&1), nginx proxy_responses ${NGINX_RESPONSES:-(not set)}"
echo "# ringlb: $RINGLB ${RINGLB_EXTRA:+[$RINGLB_EXTRA]}${RINGLB_B:+; ringlb_b: $RINGLB_B ${RINGLB_B_EXTRA:+[$RINGLB_B_EXTRA]}}"
RAW="$TMP/raw.tsv"
printf 'round\tsystem\tpps\treplies\tlost\tlate\terrors\tp50_us\tp99_us\tcpu_s\tload_cpu_s\trcvbuf_drops\tnote\n' > "$RAW"

if [ -n "${SYSTEMS:-}" ]; then
    read -r -a SYSTEMS <<< "$SYSTEMS"
elif [ -n "$RINGLB_B" ]; then
    SYSTEMS=(ringlb ringlb_b nginx direct)
else
    SYSTEMS=(ringlb nginx direct)
fi
for ((r = 1; r <= ROUNDS; r++)); do
    order=()
    for ((i = 0; i < ${#SYSTEMS[@]}; i++)); do order+=("${SYSTEMS[$(( (i + r - 1) % ${#SYSTEMS[@]} ))]}"); done
    for sys in "${order[@]}"; do
        note=""
        before=""
        case "$sys" in ringlb|ringlb_b) before=$(ringlb_counters "$sys") ;; esac
        rcv0=$(udp_rcvbuf_errors)
        out=$(timeout $((DUR + 30)) "$TMP/udp_load" 127.0.0.1 "${PORT[$sys]}" --flows "$FLOWS" --window "$WINDOW" \
                --duration "$DUR" --size "$SIZE" --warmup "$WARMUP" --pids "$(cpu_pids "$sys")") \
            || { echo "udp_load against $sys failed (rc $?)" >&2; out=""; }
        rcvdrops=$(( $(udp_rcvbuf_errors) - rcv0 ))
        if [ "$sys" = ringlb ] || [ "$sys" = ringlb_b ]; then
            pid=$RINGLB_PID; [ "$sys" = ringlb_b ] && pid=$RINGLB_B_PID
            kill -0 "$pid" 2>/dev/null || die "$sys exited during the run: $(tail -5 "$TMP/$sys.log")"
            after=$(ringlb_counters "$sys")
            note=$(python3 -c '
import sys
b, a = sys.argv[1].split(), sys.argv[2].split()
if "?" in b or "?" in a: print("ctl stats unavailable"); sys.exit()
d = [int(y) - int(x) for x, y in zip(b, a)]
print(f"in={d[0]} out={d[1]} dropped={d[2]} refused={d[3]}")' "$before" "$after")
        elif [ "$sys" = nginx ]; then
            kill -0 "$NGINX_PID" 2>/dev/null || die "nginx exited during the run"
            note="nginx error.log lines: $(wc -l < "$TMP/nginx/error.log")"
        fi
        [ -n "$out" ] || continue
        get() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<< "$out"; }
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$sys" "$(get pps)" "$(get replies)" \
            "$(get lost)" "$(get late)" "$(get errors)" "$(get p50_us)" "$(get p99_us)" "$(get target_cpu_s)" \
            "$(get load_cpu_s)" "$rcvdrops" "$note" >> "$RAW"
        printf 'round %d  %-7s %s kernel_udp_rcvbuf_drops=%s  %s\n' "$r" "$sys" "$out" "$rcvdrops" "$note"
    done
done

python3 - "$RAW" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
by = {}
for r in rows:
    by.setdefault(r["system"], []).append(r)
def med(sys_, f):
    v = [f(r) for r in by.get(sys_, [])]
    return statistics.median(v) if v else float("nan")
pps = {s: med(s, lambda r: float(r["pps"])) for s in by}
cpu = {s: med(s, lambda r: float(r["cpu_s"]) * 1e6 / max(1, int(r["replies"]))) for s in by}
p50 = {s: med(s, lambda r: float(r["p50_us"])) for s in by}
p99 = {s: med(s, lambda r: float(r["p99_us"])) for s in by}
lost = {s: sum(int(r["lost"]) + int(r["errors"]) for r in by[s]) for s in by}
late = {s: sum(int(r["late"]) for r in by[s]) for s in by}
rcv = {s: sum(int(r["rcvbuf_drops"]) for r in by[s]) for s in by}
lcpu = {s: med(s, lambda r: 100 * float(r["load_cpu_s"]) / (int(r["replies"]) / float(r["pps"]) if float(r["pps"]) else 1)) for s in by}
print()
print("| system | median pps | vs nginx | vs direct | CPU µs/packet | p50 RTT µs | p99 RTT µs | timed out / late / kernel rcvbuf drops (all rounds) | load gen CPU % | pps per round |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
for s in ["ringlb", "ringlb_b", "nginx", "direct"]:
    if s not in by:
        continue
    vn = pps[s] / pps["nginx"] if pps.get("nginx") else float("nan")
    vd = pps[s] / pps["direct"] if pps.get("direct") else float("nan")
    c = f"{cpu[s]:.2f}" if s != "direct" else f"({cpu[s]:.2f} echo)"
    per = ", ".join(f"{float(r['pps'])/1000:.1f}k" for r in by[s])
    print(f"| {s} | {pps[s]:,.0f} | {vn:.2f} | {vd:.2f} | {c} | {p50[s]:.0f} | {p99[s]:.0f} | {lost[s]} / {late[s]} / {rcv[s]} | {lcpu[s]:.0f} | {per} |")
# per-round ratio ringlb/nginx (the pair that ran closest in time)
rr = []
for r in sorted({x["round"] for x in rows}):
    a = [x for x in rows if x["round"] == r and x["system"] == "ringlb"]
    b = [x for x in rows if x["round"] == r and x["system"] == "nginx"]
    if a and b and float(b[0]["pps"]) > 0:
        rr.append(float(a[0]["pps"]) / float(b[0]["pps"]))
rb = []
for r in sorted({x["round"] for x in rows}):
    a = [x for x in rows if x["round"] == r and x["system"] == "ringlb"]
    b = [x for x in rows if x["round"] == r and x["system"] == "ringlb_b"]
    if a and b and float(b[0]["pps"]) > 0:
        rb.append((float(a[0]["pps"]) / float(b[0]["pps"]),
                   float(a[0]["cpu_s"]) / max(1, int(a[0]["replies"])) * 1e6 - float(b[0]["cpu_s"]) / max(1, int(b[0]["replies"])) * 1e6))
if rb:
    print()
    print("ringlb/ringlb_b pps per round: " + ", ".join(f"{x:.3f}" for x, _ in rb) + f" (median {statistics.median(x for x, _ in rb):.3f});"
          " CPU µs/packet ringlb - ringlb_b per round: " + ", ".join(f"{y:+.3f}" for _, y in rb) + f" (median {statistics.median(y for _, y in rb):+.3f})")
print()
print("CPU µs/packet: balancer utime+stime (all threads; nginx master+workers) / replies, measured window only;")
print("direct: the echo backend's own CPU. timed out: no reply within 200 ms (re-sent); late: a reply that")
print("came after its timeout (so timed out - late = never answered); kernel rcvbuf drops: Udp RcvbufErrors from")
print("/proc/net/snmp over the run (whole machine). Each round runs the systems in a rotated order.")
if rr:
    print()
    print("ringlb/nginx pps per round: " + ", ".join(f"{x:.2f}" for x in rr) + f" (median {statistics.median(rr):.2f})")
PY
echo
echo "# ringlb log warnings/errors: $(grep -ciE 'warn|error|panic' "$TMP/ringlb.log" || true)"
grep -iE 'warn|error|panic' "$TMP/ringlb.log" | head -5 || true
echo "# nginx error.log: $(wc -l < "$TMP/nginx/error.log") lines"
head -5 "$TMP/nginx/error.log" || true
echo "# wall time: $(( $(date +%s) - WALL0 )) s"
