#!/usr/bin/env python3
"""What the status page costs ringlb's control thread per refresh.

    bench/status_page.py [--bin target/release/ringlb] [--backends 3,100,1000,10000] [--requests 200]

For each backend count, starts ringlb (no health checks, backends at 127.2.x.y that
nobody serves: nothing but the page touches the control thread) and fetches
/status.json and /metrics --requests times each, one after another. Reported per
endpoint: the control thread's CPU per request (utime + stime of ringlb's main thread
from /proc/PID/task/PID/stat, over the whole run, divided by the requests), the
server-side build time (median and p99, from ringlb's debug line "status.json: ...
built in"), the client's wall time per request (median), and the response size. The
page itself (/) is a static string. Everything started here is stopped on exit.
"""
import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def get(addr, path):
    s = socket.create_connection(addr, timeout=30)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    chunks = []
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        chunks.append(b)
    s.close()
    data = b"".join(chunks)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    return len(data.split(b"\r\n\r\n", 1)[1])


def main_thread_cpu(pid):
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def measure(binary, backends, requests):
    tmp = tempfile.mkdtemp(prefix="ringlb-status-bench-")
    page = ("127.0.0.1", free_port())
    listen = free_port()
    lines = [
        "[runtime]\nworkers = 2\n",
        f'[control]\nmetrics = "{page[0]}:{page[1]}"\n',
        f'[[listener]]\nname = "web"\nbind = "127.0.0.1:{listen}"\npool = "web"\n',
        '[[pool]]\nname = "web"\ntable_size = 65537\n',
    ]
    for i in range(backends):
        lines.append(f'[[pool.backend]]\naddr = "127.2.{i // 250}.{i % 250 + 1}:80"\n')
    cfg = os.path.join(tmp, "ringlb.toml")
    with open(cfg, "w") as f:
        f.write("\n".join(lines))
    log = open(os.path.join(tmp, "ringlb.log"), "w+")
    env = dict(os.environ, RUST_LOG="warn,ringlb::control::http=debug")
    proc = subprocess.Popen([binary, "run", "-c", cfg], stderr=log, env=env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(page, timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    sys.exit("ringlb did not start")
                time.sleep(0.05)
        time.sleep(0.5)
        out = {}
        for path in ["/status.json", "/metrics"]:
            get(page, path)
            log.seek(0, 2)
            before = main_thread_cpu(proc.pid)
            walls = []
            size = 0
            for _ in range(requests):
                t = time.perf_counter()
                size = get(page, path)
                walls.append(time.perf_counter() - t)
            cpu = main_thread_cpu(proc.pid) - before
            out[path] = (cpu / requests, statistics.median(walls), size)
        log.flush()
        log.seek(0)
        builds = []
        for line in log:
            m = re.search(r"status\.json: .* built in ([0-9.]+)(µs|ms|s)", line)
            if m:
                v = float(m.group(1))
                builds.append(v / 1000 if m.group(2) == "µs" else v if m.group(2) == "ms" else v * 1000)
        builds.sort()
        return out, builds
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(REPO, "target/release/ringlb"))
    ap.add_argument("--backends", default="3,100,1000,10000")
    ap.add_argument("--requests", type=int, default=200)
    a = ap.parse_args()
    print(f"{'backends':>8} {'endpoint':<13} {'cpu/req ms':>10} {'build med ms':>12} {'build p99 ms':>12} {'wall med ms':>11} {'bytes':>9}")
    for n in [int(x) for x in a.backends.split(",")]:
        requests = a.requests if n <= 1000 else max(20, a.requests // 10)
        out, builds = measure(a.bin, n, requests)
        for path, (cpu, wall, size) in out.items():
            if path == "/status.json" and builds:
                med = f"{statistics.median(builds):.3f}"
                p99 = f"{builds[min(len(builds) - 1, int(len(builds) * 0.99))]:.3f}"
            else:
                med = p99 = "-"
            print(f"{n:>8} {path:<13} {cpu * 1000:>10.3f} {med:>12} {p99:>12} {wall * 1000:>11.3f} {size:>9}")


if __name__ == "__main__":
    main()
