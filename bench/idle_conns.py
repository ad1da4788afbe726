#!/usr/bin/env python3
"""Open N idle TCP connections through a balancer, hold them, measure its RSS.

Usage:
  idle_conns.py --target 127.0.0.1:19121 -n 9000 --hold 5 \
      --pids "1234 1235" --backend-ports 19101,19102 [--sources 127.0.0.1,127.0.0.2]

What it does:
  1. raises its own RLIMIT_NOFILE soft limit to the hard limit;
  2. samples the summed VmRSS of --pids (the balancer's processes) -> "before";
  3. opens N connections to --target (blocking connects, 2 s timeout each),
     spreading the local address over --sources (IP_BIND_ADDRESS_NO_PORT, so
     each source address has its own ephemeral port range), sends nothing;
  4. waits 1 s, then samples RSS every 0.5 s for --hold seconds ("holding" is
     the largest sample), counts ESTABLISHED sockets towards --backend-ports
     (the balancer's backend legs; proves the balancer really connected), and
     checks that none of the held client connections was closed by the peer;
  5. optionally sends one HTTP request on --verify of the held connections and
     counts "200" replies (proves the idle connections still relay);
  6. closes everything and prints one JSON object on stdout.

Only 127.0.0.0/8 targets and sources are accepted.
"""
import argparse
import ipaddress
import json
import os
import random
import resource
import socket
import sys
import time

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h


def loopback(addr):
    if not ipaddress.ip_address(addr).is_loopback:
        sys.exit(f"idle_conns.py: {addr} is not a loopback address; refusing")
    return addr


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except FileNotFoundError:
            pass
    return total


def established_to(ports):
    """Count ESTABLISHED IPv4 sockets whose remote port is in `ports`."""
    counts = {p: 0 for p in ports}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[3] != "01":
                continue
            rport = int(parts[2].split(":")[1], 16)
            if rport in counts:
                counts[rport] += 1
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="ip:port of the balancer listener")
    ap.add_argument("-n", type=int, default=10000, help="connections to open")
    ap.add_argument("--hold", type=float, default=5.0, help="seconds to hold them")
    ap.add_argument("--pids", default="", help="balancer pids, space or comma separated")
    ap.add_argument("--backend-ports", default="", help="backend ports, comma separated")
    ap.add_argument("--sources", default="127.0.0.1", help="local addresses to connect from, comma separated")
    ap.add_argument("--verify", type=int, default=0, help="send an HTTP GET on this many held connections")
    a = ap.parse_args()

    host, port = a.target.rsplit(":", 1)
    loopback(host)
    port = int(port)
    sources = [loopback(s) for s in a.sources.split(",") if s]
    pids = [int(p) for p in a.pids.replace(",", " ").split()]
    bports = [int(p) for p in a.backend_ports.split(",") if p]

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.n + 64 > hard:
        sys.exit(f"idle_conns.py: -n {a.n} needs more fds than RLIMIT_NOFILE hard limit {hard}")

    before = rss_kib(pids)
    est_before = established_to(bports) if bports else {}
    socks, failed, errors = [], 0, {}
    t0 = time.monotonic()
    for i in range(a.n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            src = sources[i % len(sources)]
            if src != "127.0.0.1" or len(sources) > 1:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((src, 0))
            s.settimeout(2.0)
            s.connect((host, port))
            socks.append(s)
        except OSError as e:
            failed += 1
            key = type(e).__name__ + (f"[{e.errno}]" if e.errno else "")
            errors[key] = errors.get(key, 0) + 1
            s.close()
    open_s = time.monotonic() - t0

    time.sleep(1.0)
    samples = []
    end = time.monotonic() + a.hold
    while True:
        samples.append(rss_kib(pids))
        if time.monotonic() >= end:
            break
        time.sleep(0.5)
    holding = max(samples) if samples else 0
    est = established_to(bports) if bports else {}

    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1, socket.MSG_PEEK) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1

    ok = 0
    if a.verify and socks:
        for s in random.sample(socks, min(a.verify, len(socks))):
            try:
                s.setblocking(True)
                s.settimeout(2.0)
                s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    ok += 1
            except OSError:
                pass

    for s in socks:
        s.close()

    opened = len(socks)
    inc = max(0, holding - before)
    print(json.dumps({
        "target": a.target,
        "n": a.n,
        "opened": opened,
        "failed": failed,
        "errors": errors,
        "open_seconds": round(open_s, 2),
        "rss_before_kib": before,
        "rss_holding_kib": holding,
        "increase_mib": round(inc / 1024, 1),
        "per_conn_kib": round(inc / opened, 2) if opened else None,
        "backend_established": {str(p): est[p] - est_before.get(p, 0) for p in est},
        "closed_by_peer_during_hold": closed,
        "verify_requested": a.verify,
        "verify_ok": ok,
    }))


if __name__ == "__main__":
    main()
