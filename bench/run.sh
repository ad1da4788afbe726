#!/usr/bin/env bash
# Whole-system benchmark: ringlb vs HAProxy (tcp mode) vs nginx stream, with the
# direct path (client -> backend, no balancer) as the ceiling.
#
#   bench/run.sh [--rounds N] [--duration S] [--workers W] [--quick] [--soak MINUTES] [--pin]
#                [--relay copy|splice|auto] [--engine uring|epoll] [--loads "ka close iperf1 ..."] [--no-mem]
#                [--syscalls | --syscalls-only]
#
# --syscalls adds, after the timed rounds, one short strace -c run per balancer
# and load (ka, close): system calls per request / per connection. --syscalls-only
# runs just that (no memory test, no timed rounds).
# Run bench/setup.sh once first. Everything binds and targets 127.0.0.1 only,
# every load is bounded in time, every process started here is stopped on exit
# or Ctrl-C, and all configs/logs live in a temp dir (KEEP_TMP=1 keeps it).
# Results: a table per load on stdout, markdown in bench/results/latest.md.
# See bench/README.md for what each number means.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$BENCH")

ROUNDS=3
DUR=10
RELAY=auto          # ringlb's relay mode (copy | splice | auto); auto is its default
ENGINE=uring        # ringlb's io engine (uring | epoll)
LOADS=(ka close iperf1 iperf1R iperf8 iperf8R)
NO_MEM=0
WORKERS=2
PIN=false           # ringlb's runtime.pin_workers (--pin)
QUICK=0
SOAK=0
IDLE_N=${IDLE_N:-9000}      # see README: 10k would need > 20000 fds per process here
SYSCALLS=0                  # 1: also measure system calls per request (strace), see syscall_test
SYSCALL_DUR=${SYSCALL_DUR:-3}   # seconds of wrk per strace run
PORT_BASE=${PORT_BASE:-19100}

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DUR=$2; shift 2 ;;
        --workers) WORKERS=$2; shift 2 ;;
        --pin) PIN=true; shift ;;
        --quick) QUICK=1; shift ;;
        --relay) RELAY=$2; shift 2 ;;
        --engine) ENGINE=$2; shift 2 ;;
        --loads) read -r -a LOADS <<< "$2"; shift 2 ;;
        --no-mem) NO_MEM=1; shift ;;
        --soak) SOAK=$2; shift 2 ;;
        --syscalls) SYSCALLS=1; shift ;;
        --syscalls-only) SYSCALLS=1; LOADS=(); NO_MEM=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done
if [ "$QUICK" = 1 ]; then ROUNDS=1; DUR=2; IDLE_N=${QUICK_IDLE_N:-2000}; fi
[ ${#LOADS[@]} -gt 0 ] || ROUNDS=0      # --syscalls-only (or --loads ""): no timed rounds
for v in ROUNDS DUR WORKERS SOAK IDLE_N PORT_BASE SYSCALL_DUR; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "$v must be a whole number" >&2; exit 2; }
done
{ [ "$ROUNDS" -ge 1 ] || [ ${#LOADS[@]} = 0 ]; } && [ "$DUR" -ge 1 ] && [ "$WORKERS" -ge 1 ] || { echo "rounds, duration, workers must be >= 1" >&2; exit 2; }

for t in wrk iperf3 haproxy nginx python3 ss pgrep timeout; do
    command -v "$t" >/dev/null || { echo "missing $t: run bench/setup.sh first" >&2; exit 1; }
done
if [ "$SYSCALLS" = 1 ]; then
    command -v strace >/dev/null || { echo "missing strace (needed by --syscalls): apt-get install strace" >&2; exit 1; }
    [ "$SYSCALL_DUR" -ge 1 ] || { echo "SYSCALL_DUR must be >= 1" >&2; exit 2; }
fi
NGX_STREAM_MOD=/usr/lib/nginx/modules/ngx_stream_module.so
[ -f "$NGX_STREAM_MOD" ] || { echo "missing $NGX_STREAM_MOD (libnginx-mod-stream): run bench/setup.sh" >&2; exit 1; }
[ -x "$REPO/target/release/ringlb" ] || { echo "missing target/release/ringlb: run bench/setup.sh" >&2; exit 1; }

# Ports (all on 127.0.0.1)
BE1=$((PORT_BASE + 1)); BE2=$((PORT_BASE + 2)); IPERF=$((PORT_BASE + 11))
declare -A HTTP_PORT=([direct]=$BE1 [ringlb]=$((PORT_BASE + 21)) [haproxy]=$((PORT_BASE + 31)) [nginx]=$((PORT_BASE + 41)))
declare -A IPERF_PORT=([direct]=$IPERF [ringlb]=$((PORT_BASE + 22)) [haproxy]=$((PORT_BASE + 32)) [nginx]=$((PORT_BASE + 42)))
declare -A ROOT_PID=()

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
TMP=$(mktemp -d /tmp/ringlb-bench.XXXXXX)
STARTED=()          # pids of long-running processes started here
WALL0=$(date +%s)

cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${STARTED[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for p in "${STARTED[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for p in "${STARTED[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    # wait for our own pids only (a bare `wait` would also wait for the soak's tee)
    for p in "${STARTED[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "${KEEP_TMP:-0}" = 1 ] || [ $rc != 0 ]; then
        echo "temp dir kept: $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

port_free() { ! ss -Htln "sport = :$1" | grep -q .; }
wait_listen() { # port name
    for _ in $(seq 100); do
        ss -Htln "sport = :$1" | grep -q . && return 0
        sleep 0.1
    done
    die "$2 did not listen on 127.0.0.1:$1 (logs in $TMP)"
}

# All pids of a process tree (nginx master + workers, ...).
tree_pids() {
    local c
    [ -d "/proc/$1" ] || return 0
    echo "$1"
    for c in $(pgrep -P "$1" || true); do tree_pids "$c"; done
}
sys_pids() { [ -n "${ROOT_PID[$1]:-}" ] && tree_pids "${ROOT_PID[$1]}" | tr '\n' ' '; return 0; }
# "utime stime" in clock ticks, each summed over the system's processes (fields
# 14 and 15 of /proc/PID/stat; a process's stat already covers all its threads).
# Kept apart so the report can say how much of a balancer's CPU is its own code
# (user) and how much is the kernel working for it (system calls, and on this
# tick-accounted kernel also the softirqs that ran on its time slice).
cpu_ticks() {
    local p
    for p in $(sys_pids "$1"); do sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null || true; done |
        awk '{u += $12; k += $13} END {print u + 0, k + 0}'
}
# The whole machine's CPU time so far, in clock ticks, from the "cpu" line of
# /proc/stat: "user nice system idle iowait irq softirq steal" (guest and
# guest_nice are left out: they are already counted in user and nice). Sampled
# around each load, it shows how much of the box went to softirq (loopback
# packet processing) and how much stayed idle, i.e. how much CPU was left over
# after the balancer, the client and the backend.
box_ticks() { awk '$1 == "cpu" {print $2, $3, $4, $5, $6, $7, $8, $9; exit}' /proc/stat; }
rss_kib() {
    local p
    for p in $(sys_pids "$1"); do grep '^VmRSS:' "/proc/$p/status" 2>/dev/null || true; done |
        awk '{s += $2} END {print s + 0}'
}
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- backends
start_backends() {
    local p
    for p in $BE1 $BE2 $IPERF; do port_free "$p" || die "port $p busy (set PORT_BASE)"; done
    mkdir -p "$TMP/backend"
    local body
    body=$(printf 'ringlb bench backend %.0s' 1 2 3 4 5 | cut -c1-99)
    cat > "$TMP/backend/nginx.conf" <<EOF
# backend: two HTTP ports answering 200 with a 100-byte body
worker_processes 2;
worker_rlimit_nofile 20000;
pid $TMP/backend/nginx.pid;
error_log $TMP/backend/error.log warn;
daemon off;
events { worker_connections 19000; }
http {
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    client_body_temp_path $TMP/backend/tmp;
    proxy_temp_path $TMP/backend/tmp;
    fastcgi_temp_path $TMP/backend/tmp;
    uwsgi_temp_path $TMP/backend/tmp;
    scgi_temp_path $TMP/backend/tmp;
    server {
        listen 127.0.0.1:$BE1 backlog=4096;
        listen 127.0.0.1:$BE2 backlog=4096;
        location / { default_type text/plain; return 200 "$body\n"; }
    }
}
EOF
    nginx -t -q -e "$TMP/backend/error.log" -p "$TMP/backend" -c "$TMP/backend/nginx.conf" || die "backend nginx config"
    nginx -e "$TMP/backend/error.log" -p "$TMP/backend" -c "$TMP/backend/nginx.conf" > "$TMP/backend/stdout.log" 2>&1 &
    STARTED+=($!)
    iperf3 -s -B 127.0.0.1 -p "$IPERF" > "$TMP/backend/iperf3.log" 2>&1 &
    STARTED+=($!)
    wait_listen "$BE1" "backend nginx"; wait_listen "$BE2" "backend nginx"; wait_listen "$IPERF" "iperf3 -s"
}

# ---------------------------------------------------------------- balancers
start_ringlb() {
    local d=$TMP/ringlb
    mkdir -p "$d"
    cp "$REPO/target/release/ringlb" "$d/ringlb"     # immune to rebuilds during the run
    cat > "$d/ringlb.toml" <<EOF
[runtime]
workers = $WORKERS
io_engine = "$ENGINE"
pin_workers = $PIN
shutdown_timeout = "1s"

[[listener]]
name = "http"
bind = "127.0.0.1:${HTTP_PORT[ringlb]}"
protocol = "tcp"
pool = "http"
hash_key = "src_ip_port"
connect_timeout = "2s"
idle_timeout = "300s"
relay = "$RELAY"

[[listener]]
name = "iperf"
bind = "127.0.0.1:${IPERF_PORT[ringlb]}"
protocol = "tcp"
pool = "iperf"
hash_key = "src_ip_port"
connect_timeout = "2s"
idle_timeout = "300s"
relay = "$RELAY"

[[pool]]
name = "http"

[[pool.backend]]
addr = "127.0.0.1:$BE1"

[[pool.backend]]
addr = "127.0.0.1:$BE2"

[[pool]]
name = "iperf"

[[pool.backend]]
addr = "127.0.0.1:$IPERF"
EOF
    "$d/ringlb" check -c "$d/ringlb.toml" > "$d/check.log" 2>&1 || { cat "$d/check.log" >&2; die "ringlb check failed"; }
    RUST_LOG=${RUST_LOG:-warn} "$d/ringlb" run -c "$d/ringlb.toml" > "$d/ringlb.log" 2>&1 &
    ROOT_PID[ringlb]=$!; STARTED+=($!)
}

start_haproxy() {
    local d=$TMP/haproxy
    mkdir -p "$d"
    # maxconn is left to HAProxy: it derives it from RLIMIT_NOFILE (20000 here).
    cat > "$d/haproxy.cfg" <<EOF
global
    nbthread $WORKERS
    pidfile $d/haproxy.pid

defaults
    mode tcp
    timeout connect 2s
    timeout client 300s
    timeout server 300s

frontend http
    bind 127.0.0.1:${HTTP_PORT[haproxy]}
    # hash the source ip AND port, like ringlb src_ip_port and nginx
    # \$remote_addr\$remote_port ("balance source" hashes the ip only, so
    # every loopback client would land on one backend)
    tcp-request connection set-var(sess.sport) src_port
    default_backend http

backend http
    balance hash src,concat(:,sess.sport)
    hash-type consistent
    server be1 127.0.0.1:$BE1
    server be2 127.0.0.1:$BE2

frontend iperf
    bind 127.0.0.1:${IPERF_PORT[haproxy]}
    default_backend iperf

backend iperf
    server iperf 127.0.0.1:$IPERF
EOF
    haproxy -c -q -f "$d/haproxy.cfg" || die "haproxy config check failed"
    haproxy -db -f "$d/haproxy.cfg" > "$d/haproxy.log" 2>&1 &
    ROOT_PID[haproxy]=$!; STARTED+=($!)
}

start_nginx_stream() {
    local d=$TMP/nginx
    mkdir -p "$d"
    cat > "$d/nginx.conf" <<EOF
load_module $NGX_STREAM_MOD;
worker_processes $WORKERS;
worker_rlimit_nofile 20000;
pid $d/nginx.pid;
error_log $d/error.log warn;
daemon off;
events { worker_connections 19000; }
stream {
    upstream http_be {
        hash \$remote_addr\$remote_port consistent;
        server 127.0.0.1:$BE1;
        server 127.0.0.1:$BE2;
    }
    upstream iperf_be { server 127.0.0.1:$IPERF; }
    proxy_connect_timeout 2s;
    proxy_timeout 300s;
    server { listen 127.0.0.1:${HTTP_PORT[nginx]} reuseport backlog=4096; proxy_pass http_be; }
    server { listen 127.0.0.1:${IPERF_PORT[nginx]} reuseport backlog=4096; proxy_pass iperf_be; }
}
EOF
    nginx -t -q -e "$d/error.log" -p "$d" -c "$d/nginx.conf" || die "nginx stream config check failed"
    nginx -e "$d/error.log" -p "$d" -c "$d/nginx.conf" > "$d/stdout.log" 2>&1 &
    ROOT_PID[nginx]=$!; STARTED+=($!)
}

start_balancers() { # systems...
    local s
    for s in "$@"; do
        port_free "${HTTP_PORT[$s]}" && port_free "${IPERF_PORT[$s]}" || die "port of $s busy (set PORT_BASE)"
        case $s in ringlb) start_ringlb ;; haproxy) start_haproxy ;; nginx) start_nginx_stream ;; esac
    done
    for s in "$@"; do
        wait_listen "${HTTP_PORT[$s]}" "$s"; wait_listen "${IPERF_PORT[$s]}" "$s"
    done
    sleep 0.5
    for s in direct "$@"; do smoke "$s"; done
}

# One HTTP request through the system; fails the run if it does not answer 200.
smoke() {
    python3 - "${HTTP_PORT[$1]}" "$1" <<'EOF' || die "$1 does not answer HTTP (logs in $TMP)"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
data = b""
while True:
    b = s.recv(4096)
    if not b:
        break
    data += b
sys.exit(0 if data.startswith(b"HTTP/1.1 200") else 1)
EOF
}

alive_check() {
    local s
    for s in "$@"; do
        [ "$s" = direct ] && continue
        kill -0 "${ROOT_PID[$s]}" 2>/dev/null || {
            log "$s (pid ${ROOT_PID[$s]}) is no longer running; its log:"
            tail -n 30 "$TMP/$s/"*.log >&2 || true
            die "$s died"
        }
    done
}

# ---------------------------------------------------------------- loads
TSV=$TMP/results.tsv
: > "$TSV"
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$TSV"; }

run_wrk() { # port out [extra wrk args...]
    local port=$1 out=$2; shift 2
    timeout -k 5 $((DUR + 30)) wrk -t2 -c64 -d"${DUR}s" --latency "$@" "http://127.0.0.1:$port/" > "$out" 2>&1 || true
}
run_iperf() { # port out streams reverse(0/1)
    local port=$1 out=$2 p=$3 r=$4 try
    for try in 1 2; do
        timeout -k 5 $((DUR + 30)) iperf3 -c 127.0.0.1 -p "$port" -t "$DUR" -P "$p" $([ "$r" = 1 ] && echo -R) \
            --connect-timeout 3000 -J > "$out" 2>&1 || true
        python3 "$BENCH/benchlib.py" iperf "$out" | grep -q '^error' || return 0
        sleep 2    # e.g. "the server is busy" right after a previous test
    done
}

# Box shares over one load: "softirq_pct idle_pct balancer_pct" from two
# box_ticks samples and the balancer's own tick count. idle includes iowait
# (both are time no task wanted the CPU). On a kernel without
# CONFIG_IRQ_TIME_ACCOUNTING, softirq ticks are also charged to the stime of
# whatever task they interrupted, so balancer_pct and softirq_pct can overlap.
box_shares() { # "box before" "box after" balancer_ticks
    awk -v a="$1" -v b="$2" -v bal="$3" 'BEGIN {
        n = split(a, x, " "); split(b, y, " "); tot = 0
        for (i = 1; i <= n; i++) { d[i] = y[i] - x[i]; tot += d[i] }
        if (tot <= 0) { print "0 0 0"; exit }
        printf "%.1f %.1f %.1f\n", 100 * d[7] / tot, 100 * (d[4] + d[5]) / tot, 100 * bal / tot
    }'
}
# Per-unit cost of some ticks: µs per unit, or (per GiB) seconds per GiB.
per_req_us() { awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", t / hz / n * 1e6}'; }
per_gib_s() { awk -v t="$1" -v b="$2" -v hz="$CLK_TCK" 'BEGIN {printf "%.4f", t / hz / (b / 1073741824)}'; }

run_one() { # round load system
    local r=$1 load=$2 s=$3 out u0 k0 u1 k1 du dk b0 b1 cpu port
    out=$TMP/out/r$r-$load-$s.txt
    mkdir -p "$TMP/out"
    read -r u0 k0 < <(cpu_ticks "$s")
    b0=$(box_ticks)
    case $load in
        ka)      run_wrk "${HTTP_PORT[$s]}" "$out" ;;
        close)   run_wrk "${HTTP_PORT[$s]}" "$out" -H 'Connection: close' ;;
        iperf1)  run_iperf "${IPERF_PORT[$s]}" "$out" 1 0 ;;
        iperf1R) run_iperf "${IPERF_PORT[$s]}" "$out" 1 1 ;;
        iperf8)  run_iperf "${IPERF_PORT[$s]}" "$out" 8 0 ;;
        iperf8R) run_iperf "${IPERF_PORT[$s]}" "$out" 8 1 ;;
    esac
    b1=$(box_ticks)
    read -r u1 k1 < <(cpu_ticks "$s")
    du=$((u1 - u0)); dk=$((k1 - k0))
    cpu=$(awk -v t=$((du + dk)) -v hz="$CLK_TCK" 'BEGIN {printf "%.3f", t / hz}')
    local sirq idle balpct
    read -r sirq idle balpct < <(box_shares "$b0" "$b1" $((du + dk)))
    declare -A m=()
    local k v
    while read -r k v; do m[$k]=$v; done < <(
        case $load in ka|close) python3 "$BENCH/benchlib.py" wrk "$out" ;; *) python3 "$BENCH/benchlib.py" iperf "$out" ;; esac)
    if [ -n "${m[error]:-}" ]; then
        log "[round $r] $load $s: FAILED: ${m[error]} (output: $out)"
        record "$r" "$load" "$s" errors 1
        FAILURES+=("$load/$s round $r: ${m[error]} -- $(head -c 400 "$out" | tr '\n' ' ')")
        return 0
    fi
    record "$r" "$load" "$s" box_softirq_pct "$sirq"
    record "$r" "$load" "$s" box_idle_pct "$idle"
    if [ "$s" != direct ]; then
        record "$r" "$load" "$s" cpu_s "$cpu"
        record "$r" "$load" "$s" user_s "$(awk -v t="$du" -v hz="$CLK_TCK" 'BEGIN {printf "%.3f", t / hz}')"
        record "$r" "$load" "$s" sys_s "$(awk -v t="$dk" -v hz="$CLK_TCK" 'BEGIN {printf "%.3f", t / hz}')"
        record "$r" "$load" "$s" box_bal_pct "$balpct"
    fi
    case $load in
        ka|close)
            record "$r" "$load" "$s" rps "${m[rps]}"
            record "$r" "$load" "$s" p50_ms "${m[p50_ms]:-}"
            record "$r" "$load" "$s" p99_ms "${m[p99_ms]:-}"
            record "$r" "$load" "$s" errors "${m[errors]}"
            if [ "$s" != direct ] && [ "${m[requests]}" -gt 0 ]; then
                if [ "$load" = ka ]; then
                    record "$r" "$load" "$s" cpu_per_mreq "$(awk -v c="$cpu" -v n="${m[requests]}" 'BEGIN {printf "%.3f", c / n * 1e6}')"
                else
                    record "$r" "$load" "$s" cpu_per_kconn "$(awk -v c="$cpu" -v n="${m[requests]}" 'BEGIN {printf "%.4f", c / n * 1e3}')"
                fi
                # user / kernel µs per request (ka) or per connection (close)
                record "$r" "$load" "$s" user_us_per_req "$(per_req_us "$du" "${m[requests]}")"
                record "$r" "$load" "$s" sys_us_per_req "$(per_req_us "$dk" "${m[requests]}")"
            fi
            [ "${m[errors]}" != 0 ] && FAILURES+=("$load/$s round $r: ${m[errors]} wrk errors: $(grep -E 'Socket errors|Non-2xx' "$out" | tr '\n' ' ')")
            log "[round $r] $load $(printf '%-8s' "$s") $(printf '%9.0f' "${m[rps]}") req/s  p50 ${m[p50_ms]:-?} ms  p99 ${m[p99_ms]:-?} ms  errors ${m[errors]}  cpu ${cpu}s (user $du sys $dk ticks)  box softirq ${sirq}% idle ${idle}%"
            ;;
        *)
            record "$r" "$load" "$s" gbps "${m[gbps]}"
            record "$r" "$load" "$s" bytes "${m[bytes]}"
            if [ "$s" != direct ] && [ "${m[bytes]%.*}" -gt 0 ]; then
                record "$r" "$load" "$s" cpu_per_gib "$(awk -v c="$cpu" -v b="${m[bytes]}" 'BEGIN {printf "%.4f", c / (b / 1073741824)}')"
                record "$r" "$load" "$s" user_s_per_gib "$(per_gib_s "$du" "${m[bytes]}")"
                record "$r" "$load" "$s" sys_s_per_gib "$(per_gib_s "$dk" "${m[bytes]}")"
            fi
            log "[round $r] $load $(printf '%-8s' "$s") $(printf '%6.2f' "${m[gbps]}") Gbit/s  cpu ${cpu}s (user $du sys $dk ticks)  box softirq ${sirq}% idle ${idle}%  retrans ${m[retrans]}"
            ;;
    esac
}

# Idle RSS, then RSS while holding IDLE_N idle proxied connections.
mem_test() { # system
    local s=$1 out
    out=$TMP/out/mem-$s.json
    mkdir -p "$TMP/out"
    timeout -k 5 120 python3 "$BENCH/idle_conns.py" --target "127.0.0.1:${HTTP_PORT[$s]}" -n "$IDLE_N" --hold 3 \
        --pids "$(sys_pids "$s")" --backend-ports "$BE1,$BE2" --verify 20 > "$out" 2>"$out.err" \
        || { log "idle_conns.py failed for $s: $(cat "$out.err")"; FAILURES+=("mem/$s: idle_conns.py failed")
             record 0 mem "$s" run_failed 1; return 0; }    # so the report shows a row for it anyway
    python3 - "$out" "$s" >> "$TSV" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1])); s = sys.argv[2]
row = lambda m, v: print(f"0\tmem\t{s}\t{m}\t{v}")
row("n", j["n"]); row("opened", j["opened"]); row("failed", j["failed"])
row("idle_rss_mib", round(j["rss_before_kib"] / 1024, 2)); row("hold_rss_mib", round(j["rss_holding_kib"] / 1024, 2))
row("inc_mib", j["increase_mib"]); row("per_conn_kib", j["per_conn_kib"] or 0)
row("backend_legs", sum(j["backend_established"].values())); row("closed", j["closed_by_peer_during_hold"])
row("verify_ok", j["verify_ok"])
EOF
    log "mem $(printf '%-8s' "$s") $(cat "$out")"
    local j; j=$(cat "$out")
    case $j in *'"failed": 0,'*) ;; *) FAILURES+=("mem/$s: $j") ;; esac
}

# ---------------------------------------------------------------- system calls
# System calls per request relayed (ka) and per new connection (close). strace
# stops the tracee twice per system call, which slows a balancer several-fold,
# so this is a separate short run per system and load, never one of the timed
# rounds; only the counts are used, not the timings. `strace -f -p PID` attaches
# to every thread of PID (ringlb's workers, HAProxy's threads) and -p is given
# for every process of the system (nginx master + workers), so all of them are
# counted. The count is divided by the requests wrk completed in that run.
# Note: io_uring work submitted through the ring is not a system call; for
# ringlb's uring engine the figure counts io_uring_enter, not the operations.
syscall_test() { # system load(ka|close)
    local s=$1 load=$2 out p st args=() hdr=()
    out=$TMP/out/syscalls-$load-$s
    mkdir -p "$TMP/out"
    for p in $(sys_pids "$s"); do args+=(-p "$p"); done
    [ ${#args[@]} -gt 0 ] || die "no pids for $s"
    [ "$load" = close ] && hdr=(-H 'Connection: close')
    # -c: count only; -U name,calls,errors: a summary that is easy to parse
    strace -f -c -q -U name,calls,errors -o "$out.strace" "${args[@]}" 2> "$out.strace.err" &
    st=$!; STARTED+=("$st")
    if ! wait_traced "$st" "$s"; then
        stop_strace "$st"
        log "syscalls $load $s: strace did not attach: $(head -c 300 "$out.strace.err")"
        FAILURES+=("syscalls/$load/$s: strace did not attach")
        return 0
    fi
    timeout -k 5 $((SYSCALL_DUR + 30)) wrk -t1 -c64 -d"${SYSCALL_DUR}s" "${hdr[@]}" \
        "http://127.0.0.1:${HTTP_PORT[$s]}/" > "$out.wrk" 2>&1 || true
    stop_strace "$st"
    sleep 0.5
    alive_check "$s"
    smoke "$s"      # still serving once strace has let go
    declare -A m=()
    local k v
    while read -r k v; do m[$k]=$v; done < <(python3 "$BENCH/benchlib.py" strace "$out.strace" "$out.wrk")
    if [ -n "${m[error]:-}" ]; then
        log "syscalls $load $s: FAILED: ${m[error]} (files: $out.*)"
        FAILURES+=("syscalls/$load/$s: ${m[error]}")
        return 0
    fi
    for k in "${!m[@]}"; do record 0 "sys_$load" "$s" "$k" "${m[$k]}"; done
    log "syscalls $load $(printf '%-8s' "$s") ${m[requests]} requests under strace, ${m[calls]} syscalls, ${m[per_req]} per request"
}

# Wait (at most 5 s) until strace ($1) is the tracer of every thread of the system.
wait_traced() { # strace_pid system
    local p t ok
    for _ in $(seq 50); do
        kill -0 "$1" 2>/dev/null || return 1
        ok=1
        for p in $(sys_pids "$2"); do
            for t in /proc/"$p"/task/*; do
                [ "$(awk '/^TracerPid:/ {print $2}' "$t/status" 2>/dev/null)" = "$1" ] || ok=0
            done
        done
        [ $ok = 1 ] && return 0
        sleep 0.1
    done
    return 1
}

# SIGINT makes strace detach from its tracees and write the summary; if it has
# not exited within 10 s, TERM then KILL (the kernel detaches the tracees when
# the tracer dies, so the balancer keeps running either way).
stop_strace() { # strace_pid
    local sig
    for sig in INT TERM KILL; do
        kill -"$sig" "$1" 2>/dev/null || break
        for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break 2; sleep 0.1; done
    done
    wait "$1" 2>/dev/null || true
}

host_meta() {
    {
        printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
        printf 'machine\t%s vCPU, %s, kernel %s, %s MiB RAM; loopback only; load generator, backends and balancer share the CPUs\n' \
            "$(nproc)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')" "$(uname -r)" \
            "$(awk '/MemTotal/ {printf "%d", $2/1024}' /proc/meminfo)"
        printf "ringlb\t%s (commit %s%s), io_engine $ENGINE, relay $RELAY, %s workers\n" "$(target_ver)" \
            "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" \
            "$(GIT_OPTIONAL_LOCKS=0 git -C "$REPO" status --porcelain -uno 2>/dev/null | grep -q . && echo ', working tree modified' || true)" "$WORKERS"
        printf 'peers\t%s (nbthread %s), nginx %s stream (worker_processes %s)\n' \
            "$(haproxy -v | head -1 | awk '{print "HAProxy " $3}')" "$WORKERS" "$(nginx -v 2>&1 | sed 's/.*nginx\///')" "$WORKERS"
        printf 'tools\t%s, %s\n' "$(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}')" "$(iperf3 --version | head -1 | awk '{print "iperf3 " $2}')"
        printf 'parameters\t%s rounds x %s s per load, systems in alternating order per round, %s idle connections for the memory test\n' "$ROUNDS" "$DUR" "$IDLE_N"
        [ "$SYSCALLS" = 1 ] && printf 'syscalls\tstrace -f -c on all processes/threads of each balancer, separate %s s run per load, wrk -t1 -c64\n' "$SYSCALL_DUR"
        true
    } > "$TMP/meta.tsv"
}
target_ver() { "$TMP/ringlb/ringlb" --version 2>/dev/null || echo ringlb; }

# ---------------------------------------------------------------- soak
soak() {
    local secs=$((SOAK * 60)) pid out=$TMP/out
    mkdir -p "$out"
    start_backends
    start_balancers ringlb
    pid=${ROOT_PID[ringlb]}
    log "soak: ringlb pid $pid alone for $SOAK min: wrk keep-alive (-c32) + wrk Connection: close (-c16) + iperf3 -P 2 -b 500M"
    sample() { printf '%6s  %8.1f  %6s  %7s\n' "$1" "$(awk -v k="$(rss_kib ringlb)" 'BEGIN {print k / 1024}')" \
        "$(ls "/proc/$pid/fd" | wc -l)" "$(ls "/proc/$pid/task" | wc -l)"; }
    local base; base=$(sample idle)
    timeout -k 5 $((secs + 30)) wrk -t1 -c32 -d"${secs}s" "http://127.0.0.1:${HTTP_PORT[ringlb]}/" > "$out/soak-ka.txt" 2>&1 &
    local w1=$!
    timeout -k 5 $((secs + 30)) wrk -t1 -c16 -d"${secs}s" -H 'Connection: close' "http://127.0.0.1:${HTTP_PORT[ringlb]}/" > "$out/soak-close.txt" 2>&1 &
    local w2=$!
    timeout -k 5 $((secs + 30)) iperf3 -c 127.0.0.1 -p "${IPERF_PORT[ringlb]}" -t "$secs" -P 2 -b 500M --connect-timeout 3000 > "$out/soak-iperf.txt" 2>&1 &
    local w3=$!
    STARTED+=($w1 $w2 $w3)
    local samples=() t=0 t0; t0=$(date +%s)
    printf '%6s  %8s  %6s  %7s\n' "t (s)" "RSS MiB" "fds" "threads"
    echo "$base"
    while [ "$t" -lt "$secs" ]; do
        sleep 10
        t=$(( $(date +%s) - t0 ))
        kill -0 "$pid" 2>/dev/null || { tail -n 30 "$TMP/ringlb/ringlb.log" >&2; die "ringlb died during the soak"; }
        samples+=("$(sample "$t")"); echo "${samples[-1]}"
    done
    wait "$w1" "$w2" "$w3" 2>/dev/null || true
    sleep 5
    local after; after=$(sample after+5s); echo "$after"
    local errs
    errs=$(grep -hE 'Socket errors|Non-2xx' "$out/soak-ka.txt" "$out/soak-close.txt" || true)
    grep -h 'Requests/sec' "$out/soak-ka.txt" "$out/soak-close.txt" | sed 's/^/wrk /' || true
    grep -E 'receiver|error' "$out/soak-iperf.txt" | tail -n 1 | sed 's/^/iperf3 /' || true
    [ -n "$errs" ] && echo "wrk errors: $errs" || echo "wrk errors: none"
    # verdict: fds back to the idle count after the load; RSS of the last third
    # of the samples within 10% (or 2 MiB) of the middle third.
    printf '%s\n' "$base" "${samples[@]}" "$after" | python3 -c '
import sys
rows = [l.split() for l in sys.stdin if l.strip()]
base, samples, after = rows[0], rows[1:-1], rows[-1]
rss = [float(r[1]) for r in samples]; fds = [int(r[2]) for r in samples]
n = len(rss)
fd_ok = abs(int(after[2]) - int(base[2])) <= 2
print(f"fds: idle {base[2]}, under load {min(fds)}..{max(fds)}, 5 s after the load {after[2]} -> " +
      ("FLAT (back to idle)" if fd_ok else "NOT FLAT (fds not released)"))
if n >= 3:
    mid = sorted(rss[n // 3: 2 * n // 3] or rss)[len(rss[n // 3: 2 * n // 3] or rss) // 2]
    last = max(rss[2 * n // 3:])
    ok = last <= mid * 1.10 or last - mid <= 2.0
    print(f"RSS: idle {base[1]} MiB, middle third median {mid:.1f} MiB, last third max {last:.1f} MiB, after {after[1]} MiB -> " +
          ("FLAT" if ok else "GROWING"))
else:
    print("RSS: too few samples for a verdict (soak at least 1 minute)")
'
}

# ---------------------------------------------------------------- main
FAILURES=()
mkdir -p "$BENCH/results"

if [ "$SOAK" -gt 0 ]; then
    # not in a pipeline: soak must run in this shell so cleanup sees its pids
    exec > >(tee "$BENCH/results/soak.txt") 2>&1
    soak
    exit 0
fi

SYSTEMS=(direct ringlb haproxy nginx)
log "temp dir $TMP; $ROUNDS rounds x ${#LOADS[@]} loads x ${#SYSTEMS[@]} systems x ${DUR}s"
start_backends
start_balancers ringlb haproxy nginx
host_meta

# memory first, on freshly started balancers
if [ "$NO_MEM" = 0 ]; then
    for s in ringlb haproxy nginx; do mem_test "$s"; sleep 1; done
fi
alive_check "${SYSTEMS[@]}"

for r in $(seq "$ROUNDS"); do
    # rotate the order by round, reverse it every other round
    order=()
    for i in 0 1 2 3; do order+=("${SYSTEMS[$(( (i + r - 1) % 4 ))]}"); done
    if [ $((r % 2)) = 0 ]; then order=("${order[3]}" "${order[2]}" "${order[1]}" "${order[0]}"); fi
    log "round $r/$ROUNDS: order ${order[*]}"
    for load in "${LOADS[@]}"; do
        for s in "${order[@]}"; do
            run_one "$r" "$load" "$s"
            alive_check "$s"
            sleep 1
        done
    done
done

if [ ${#LOADS[@]} -gt 0 ]; then
    sleep 2
    for s in ringlb haproxy nginx; do record 0 mem "$s" after_rss_mib "$(awk -v k="$(rss_kib "$s")" 'BEGIN {printf "%.2f", k / 1024}')"; done
fi

# system calls last: after the after-loads RSS, and never inside the timed rounds
if [ "$SYSCALLS" = 1 ]; then
    for s in ringlb haproxy nginx; do
        for load in ka close; do syscall_test "$s" "$load"; sleep 1; done
    done
fi

WALL=$(( $(date +%s) - WALL0 ))
printf 'wall time\t%dm%02ds\n' $((WALL / 60)) $((WALL % 60)) >> "$TMP/meta.tsv"
if [ ${#FAILURES[@]} -gt 0 ]; then
    printf 'problems seen\t%s\n' "$(printf '%s; ' "${FAILURES[@]}")" >> "$TMP/meta.tsv"
fi
echo
python3 "$BENCH/benchlib.py" report "$TSV" "$TMP/meta.tsv" "$BENCH/results/latest.md"
cp "$TSV" "$BENCH/results/latest.tsv"
echo
log "markdown: bench/results/latest.md (raw rows: bench/results/latest.tsv); wall time ${WALL}s"
if [ ${#FAILURES[@]} -gt 0 ]; then
    log "problems seen:"; printf '  %s\n' "${FAILURES[@]}" >&2
fi
