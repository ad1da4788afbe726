#!/usr/bin/env python3
"""ringlb with many health-checked backends: control-thread CPU, `ctl backends`
latency, and the state-change storm when half the backends die at once.

    bench/many_backends.py [--backends N] [--bin target/release/ringlb] [--measure S]
    bench/many_backends.py --system haproxy     # the peer, same backends and checks

N backends (default 10000) at 127.1.x.y, all checked by TCP connect every 2 s.
They are served by two accept-and-close listeners on 0.0.0.0 (port A for even
backends, port B for odd ones): 127.0.0.0/8 all routes to lo, so two sockets
stand in for N backends. Closing listener B makes half the backends refuse at
once. Figures: ringlb's CPU (utime + stime from /proc/PID/stat) over S seconds
(default 20) in steady state and after the kill, `ctl backends` wall time and
completeness, table generations published and log lines written. Everything
started here is stopped on exit; files live in a temp dir (KEEP_TMP=1 keeps it).
See bench/README.md.
"""
import argparse
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICKS = os.sysconf("SC_CLK_TCK")


class AcceptClose(threading.Thread):
    """Accepts and closes connections on 0.0.0.0:port until stopped."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.accepted = 0

    def run(self):
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        while not self.stopped.is_set():
            for _ in sel.select(0.1):
                while True:
                    try:
                        c, _ = self.sock.accept()
                    except (BlockingIOError, OSError):
                        break
                    c.close()
                    self.accepted += 1
        sel.close()
        self.sock.close()

    def stop(self):
        self.stopped.set()
        self.join()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def ctl(binary, sock, *args, timeout=60):
    t = time.monotonic()
    out = subprocess.run([binary, "ctl", "-s", sock, "--json", *args], capture_output=True, timeout=timeout)
    took = time.monotonic() - t
    try:
        reply = json.loads(out.stdout)
    except ValueError:
        reply = None
    return took, out.returncode, reply, out.stderr.decode(errors="replace")[:200]


def backends_figure(binary, sock, n, args=()):
    took, code, reply, err = ctl(binary, sock, "backends", *args)
    got = len(reply["pools"][0]["backends"]) if reply and reply.get("ok") else 0
    return took, code, got, err


def raw_backends(sock):
    """The reply straight off the socket, without ctl's parsing and printing."""
    t = time.monotonic()
    c = socket.socket(socket.AF_UNIX)
    c.connect(sock)
    c.sendall(b'{"cmd":"backends"}\n')
    got = bytearray()
    while not got.endswith(b"\n"):
        chunk = c.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    c.close()
    return time.monotonic() - t, len(got)


def generation(binary, sock):
    _, _, r, _ = ctl(binary, sock, "stats")
    return r["pools"][0]["table_generation"] if r else None


def states(binary, sock):
    _, _, r, _ = ctl(binary, sock, "backends")
    if not r or not r.get("ok"):
        return {}
    counts = {}
    for b in r["pools"][0]["backends"]:
        counts[b["state"]] = counts.get(b["state"], 0) + 1
    return counts


def stop(lb, alive, doomed):
    """Stops the balancer (SIGTERM, then SIGKILL after 10 s) and both listeners."""
    lb.terminate()
    try:
        lb.wait(10)
    except subprocess.TimeoutExpired:
        lb.kill()
        lb.wait()
    alive.stop()
    if not doomed.stopped.is_set():
        doomed.stop()


def log_lines(path):
    with open(path, errors="replace") as f:
        return sum(1 for _ in f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", type=int, default=10000)
    ap.add_argument("--bin", default=os.path.join(REPO, "target/release/ringlb"))
    ap.add_argument("--measure", type=float, default=20.0)
    ap.add_argument("--max-concurrent", type=int, default=256)
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT_BASE", "19300")))
    ap.add_argument("--system", choices=["ringlb", "haproxy"], default="ringlb")
    a = ap.parse_args()
    if a.system == "haproxy":
        return haproxy(a)

    tmp = tempfile.mkdtemp(prefix="ringlb-many.")
    alive, doomed = AcceptClose(a.port + 1), AcceptClose(a.port + 2)
    alive.start()
    doomed.start()
    sock = os.path.join(tmp, "ctl.sock")
    lines = [
        "[runtime]\nworkers = 1\n",
        f'[control]\nsocket = "{sock}"\n',
        f'[[listener]]\nname = "l"\nbind = "127.0.0.1:{a.port}"\npool = "p"\n',
        '[[pool]]\nname = "p"\ntable_size = 65537\n',
        '[pool.health_check]\nkind = "tcp"\ninterval = "2s"\ntimeout = "1s"\n'
        f"rise = 2\nfall = 2\nmax_concurrent = {a.max_concurrent}\n",
    ]
    for i in range(a.backends):
        port = alive.port if i % 2 == 0 else doomed.port
        lines.append(f'[[pool.backend]]\naddr = "127.1.{i // 250}.{i % 250 + 1}:{port}"\n')
    cfg = os.path.join(tmp, "ringlb.toml")
    with open(cfg, "w") as f:
        f.write("\n".join(lines))
    log = os.path.join(tmp, "ringlb.log")
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
    lb = subprocess.Popen([a.bin, "run", "-c", cfg], stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
    results = []

    def say(k, v):
        results.append((k, v))
        print(f"{k:<52} {v}", flush=True)

    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if lb.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"ringlb did not start; see {log}")
            time.sleep(0.1)
        print(f"ringlb pid {lb.pid}, {a.backends} backends, log {log}", flush=True)
        time.sleep(6)  # every backend checked at least twice

        # Steady state.
        g0, l0, c0, t0 = generation(a.bin, sock), log_lines(log), cpu_seconds(lb.pid), time.monotonic()
        time.sleep(a.measure)
        c1, t1 = cpu_seconds(lb.pid), time.monotonic()
        say(f"steady: ringlb CPU over {a.measure:.0f} s (% of one core)", f"{100 * (c1 - c0) / (t1 - t0):.1f}")
        say("steady: table generations / log lines", f"{generation(a.bin, sock) - g0} / {log_lines(log) - l0}")
        for i in range(3):
            took, code, got, err = backends_figure(a.bin, sock, a.backends)
            say(f"steady: ctl backends #{i + 1} (s, exit, backends)", f"{took:.2f}  {code}  {got}/{a.backends} {err}")
        took, size = raw_backends(sock)
        say("steady: backends reply off the socket (s, bytes)", f"{took:.2f}  {size}")
        took, code, reply, _ = ctl(a.bin, sock, "backends", "p", "--limit", "100", "--offset", "5000")
        if reply and reply.get("ok"):
            say("steady: ctl backends p --limit 100 --offset 5000 (s)", f"{took:.2f} ({len(reply['pools'][0]['backends'])} backends)")
        say("steady: states", states(a.bin, sock))

        # Half the backends die at once.
        g0, l0, c0, t0 = generation(a.bin, sock), log_lines(log), cpu_seconds(lb.pid), time.monotonic()
        doomed.stop()
        time.sleep(2.5)
        took, code, got, err = backends_figure(a.bin, sock, a.backends)
        say("storm: ctl backends at +2.5 s (s, exit, backends)", f"{took:.2f}  {code}  {got}/{a.backends} {err}")
        time.sleep(max(0.0, a.measure - (time.monotonic() - t0)))
        c1, t1 = cpu_seconds(lb.pid), time.monotonic()
        say(f"storm: ringlb CPU over {t1 - t0:.0f} s after the kill (%)", f"{100 * (c1 - c0) / (t1 - t0):.1f}")
        say("storm: table generations / log lines", f"{generation(a.bin, sock) - g0} / {log_lines(log) - l0}")
        say("storm: states", states(a.bin, sock))
        took, code, got, err = backends_figure(a.bin, sock, a.backends)
        say("after storm: ctl backends (s, exit, backends)", f"{took:.2f}  {code}  {got}/{a.backends} {err}")
    finally:
        stop(lb, alive, doomed)
        if os.environ.get("KEEP_TMP") == "1":
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def haproxy(a):
    """The peer on the same backends: HAProxy with one server per backend and
    the same checks (TCP connect every 2 s, timeout 1 s, rise 2, fall 2, one
    thread). Figures: its CPU in the steady state and after half the backends
    refuse, measured as for ringlb."""
    tmp = tempfile.mkdtemp(prefix="ringlb-many-haproxy.")
    alive, doomed = AcceptClose(a.port + 1), AcceptClose(a.port + 2)
    alive.start()
    doomed.start()
    lines = [
        "global\n  nbthread 1\n  maxconn 4096\n",
        "defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n"
        "  timeout check 1s\n",
        f"frontend l\n  bind 127.0.0.1:{a.port}\n  default_backend p\n",
        "backend p\n  balance source\n  default-server check inter 2s rise 2 fall 2\n",
    ]
    for i in range(a.backends):
        port = alive.port if i % 2 == 0 else doomed.port
        lines.append(f"  server b{i} 127.1.{i // 250}.{i % 250 + 1}:{port}\n")
    cfg = os.path.join(tmp, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write("".join(lines))
    log = os.path.join(tmp, "haproxy.log")
    lb = subprocess.Popen(["haproxy", "-db", "-f", cfg], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        time.sleep(8)  # HAProxy spreads the first checks over the interval
        if lb.poll() is not None:
            sys.exit(f"haproxy exited; see {log}")
        print(f"haproxy pid {lb.pid}, {a.backends} backends, log {log}", flush=True)
        c0, t0 = cpu_seconds(lb.pid), time.monotonic()
        time.sleep(a.measure)
        c1, t1 = cpu_seconds(lb.pid), time.monotonic()
        print(f"{'steady: haproxy CPU over %.0f s (%% of one core)' % a.measure:<52} {100 * (c1 - c0) / (t1 - t0):.1f}", flush=True)
        c0, t0 = cpu_seconds(lb.pid), time.monotonic()
        doomed.stop()
        time.sleep(a.measure)
        c1, t1 = cpu_seconds(lb.pid), time.monotonic()
        print(f"{'storm: haproxy CPU over %.0f s after the kill (%%)' % (t1 - t0):<52} {100 * (c1 - c0) / (t1 - t0):.1f}", flush=True)
    finally:
        stop(lb, alive, doomed)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
