#!/usr/bin/env python3
"""Helpers for bench/run.sh: parse wrk / iperf3 output, build the markdown report.

  benchlib.py wrk FILE            -> "key value" lines: rps requests p50_ms p99_ms errors
  benchlib.py iperf FILE          -> "key value" lines: gbps bytes retrans  (or "error MSG")
  benchlib.py strace SUMMARY WRK  -> "key value" lines: requests calls per_req sc_NAME...  (or "error MSG")
  benchlib.py report TSV META OUT -> markdown tables on stdout and in OUT

TSV rows: round, load, system, metric, value (tab separated).
META: "key<TAB>value" lines printed as the report header.
"""
import json
import re
import statistics
import sys

UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def to_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(m.group(1)) * UNIT_MS[m.group(2)]


def parse_wrk(path):
    out = open(path).read()
    res = {"errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        print("error no Requests/sec in wrk output")
        return
    res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else 0
    dist = re.search(r"Latency Distribution\s*\n((?:\s+\d+%\s+\S+\s*\n)+)", out)
    if dist:
        for pct, val in re.findall(r"(\d+)%\s+(\S+)", dist.group(1)):
            if pct in ("50", "99"):
                res[f"p{pct}_ms"] = to_ms(val)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res["errors"] += int(m.group(1))
    for k, v in res.items():
        print(k, v)


def parse_iperf(path):
    try:
        j = json.load(open(path))
    except (ValueError, OSError) as e:
        print("error", f"unreadable iperf3 json: {e}".replace("\n", " "))
        return
    if "error" in j:
        print("error", j["error"].replace("\n", " "))
        return
    end = j.get("end", {})
    recv = end.get("sum_received", {})
    sent = end.get("sum_sent", {})
    if not recv:
        print("error no sum_received in iperf3 json")
        return
    print("gbps", recv["bits_per_second"] / 1e9)
    print("bytes", recv["bytes"])
    print("retrans", sent.get("retransmits", 0))


def parse_strace(summary, wrk):
    """Syscalls per request from `strace -c -U name,calls` and the wrk output of the same run.

    The summary is "name calls [errors]" rows between dashed lines (errors is
    blank when none failed), then a "total" row; the totals are recomputed from
    the rows. Failed calls (mostly EAGAIN reads and accepts that found nothing)
    are counted in the calls and also reported on their own.
    """
    out = open(wrk).read()
    m = re.search(r"(\d+) requests in", out)
    if not m or int(m.group(1)) == 0:
        print("error no requests in wrk output")
        return
    requests = int(m.group(1))
    calls, errors = {}, 0
    for line in open(summary):
        parts = line.split()
        if len(parts) in (2, 3) and all(p.isdigit() for p in parts[1:]) and parts[0] != "total":
            calls[parts[0]] = calls.get(parts[0], 0) + int(parts[1])
            errors += int(parts[2]) if len(parts) == 3 else 0
    if not calls:
        print("error empty strace summary")
        return
    total = sum(calls.values())
    print("requests", requests)
    print("calls", total)
    print("per_req", f"{total / requests:.3f}")
    print("errors", errors)
    print("errors_per_req", f"{errors / requests:.3f}")
    for name, n in calls.items():
        print(f"sc_{name}", f"{n / requests:.4f}")


# The CPU columns of each load table: user and kernel time beside the total
# (the last one, which "CPU vs HAProxy" compares).
CPU_REQ = [("user_us_per_req", "user µs / req"), ("sys_us_per_req", "sys µs / req"),
           ("cpu_per_mreq", "CPU-s / 1M req")]
CPU_CONN = [("user_us_per_req", "user µs / conn"), ("sys_us_per_req", "sys µs / conn"),
            ("cpu_per_kconn", "CPU-s / 1k conn")]
CPU_GIB = [("user_s_per_gib", "user s / GiB"), ("sys_s_per_gib", "sys s / GiB"),
           ("cpu_per_gib", "CPU-s / GiB")]
# Columns after "CPU vs HAProxy": shares of the whole machine's CPU time (all
# cores, from /proc/stat) during the load.
BOX = [("box_bal_pct", "balancer % box"), ("box_softirq_pct", "softirq % box"), ("box_idle_pct", "idle % box")]

LOADS = [
    # key, title, main metric, main label, higher is better, extra columns (CPU total last)
    ("ka", "HTTP keep-alive: `wrk -t2 -c64 --latency`", "rps", "req/s", True,
     [("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")] + CPU_REQ),
    ("close", "HTTP `Connection: close` (one TCP connection per request): `wrk -t2 -c64 -H 'Connection: close'`",
     "rps", "conn/s", True,
     [("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")] + CPU_CONN),
    ("iperf1", "iperf3, 1 TCP stream, client -> server", "gbps", "Gbit/s", True, CPU_GIB),
    ("iperf1R", "iperf3, 1 TCP stream, server -> client (`-R`)", "gbps", "Gbit/s", True, CPU_GIB),
    ("iperf8", "iperf3, 8 TCP streams (`-P 8`), client -> server", "gbps", "Gbit/s", True, CPU_GIB),
    ("iperf8R", "iperf3, 8 TCP streams (`-P 8 -R`), server -> client", "gbps", "Gbit/s", True, CPU_GIB),
]
SYSCALL_LOADS = [("ka", "keep-alive", "syscalls / req"), ("close", "Connection: close", "syscalls / conn")]
SYSTEMS = ["direct", "ringlb", "haproxy", "nginx"]
NAMES = {"direct": "direct (no balancer)", "ringlb": "ringlb (uring)",
         "haproxy": "HAProxy (tcp mode)", "nginx": "nginx stream"}


def fmt(v, metric=""):
    if v is None:
        return "–"
    if metric in ("rps",):
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def ratio(a, b):
    if a is None or b in (None, 0):
        return "–"
    return f"{a / b:.2f}"


def report(tsv, meta, out):
    data = {}  # (load, system, metric) -> [values by round order]
    rounds = {}
    for line in open(tsv):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 5:
            continue
        rnd, load, system, metric, value = parts
        try:
            v = float(value)
        except ValueError:
            continue
        data.setdefault((load, system, metric), []).append(v)
        rounds.setdefault((load, system, metric), []).append(rnd)

    def med(load, system, metric):
        vals = data.get((load, system, metric))
        return statistics.median(vals) if vals else None

    lines = ["# ringlb whole-system benchmark", ""]
    for l in open(meta):
        k, _, v = l.rstrip("\n").partition("\t")
        lines.append(f"- {k}: {v}")
        # label ringlb with the engine it ran (run.sh --engine), not always "uring"
        m = re.search(r"io_engine (\w+)", v) if k == "ringlb" else None
        if m:
            NAMES["ringlb"] = f"ringlb ({m.group(1)})"
    lines.append("")
    lines.append("Medians over the rounds; `vs X` = median of the system / median of X "
                 "(for throughput, above 1 is better). CPU = utime+stime of all the "
                 "balancer's processes during the load; user / sys = utime / stime apart. "
                 "`% box` = share of the whole machine's CPU time (all cores, /proc/stat) "
                 "during the load: the balancer's own, softirq, idle (+iowait). "
                 "Per-round values in the last column.")
    lines.append("")

    present = [s for s in SYSTEMS if any(k[1] == s for k in data)]
    has_loads = any(k[0] == key for key, *_ in LOADS for k in data)
    # summary
    if has_loads:
        lines.append("## Summary (medians)")
        lines.append("")
        lines.append("| load | " + " | ".join(NAMES[s] for s in present) + " | ringlb / HAProxy |")
        lines.append("| --- | " + " | ".join("---:" for _ in present) + " | ---: |")
        for key, title, main, label, _hib, _extra in LOADS:
            if not any(k[0] == key for k in data):
                continue
            short = {"ka": "keep-alive req/s", "close": "Connection: close conn/s",
                     "iperf1": "iperf3 1 stream Gbit/s", "iperf1R": "iperf3 1 stream -R Gbit/s",
                     "iperf8": "iperf3 8 streams Gbit/s", "iperf8R": "iperf3 8 streams -R Gbit/s"}[key]
            cells = [fmt(med(key, s, main), main) for s in present]
            lines.append(f"| {short} | " + " | ".join(cells) + f" | {ratio(med(key, 'ringlb', main), med(key, 'haproxy', main))} |")
        if any(k[0] == "mem" and k[2] == "per_conn_kib" for k in data):
            # lower is better here; the ratio is still ringlb / HAProxy
            cells = [fmt(med("mem", s, "per_conn_kib")) if s != "direct" else "–" for s in present]
            lines.append("| RSS KiB per idle proxied connection | " + " | ".join(cells) +
                         f" | {ratio(med('mem', 'ringlb', 'per_conn_kib'), med('mem', 'haproxy', 'per_conn_kib'))} |")
        lines.append("")

    for key, title, main, label, _hib, extra in LOADS:
        if not any(k[0] == key for k in data):
            continue
        lines.append(f"## {title}")
        lines.append("")
        hdr = f"| system | {label} | vs HAProxy | vs direct | " + " | ".join(e[1] for e in extra) + \
              " | CPU vs HAProxy | " + " | ".join(b[1] for b in BOX) + " | errors | per round |"
        lines.append(hdr)
        lines.append("|" + " --- |" * (hdr.count("|") - 1))
        cpu_metric = extra[-1][0]
        for s in present:
            m = med(key, s, main)
            if m is None:
                continue
            cells = [NAMES[s], fmt(m, main), ratio(m, med(key, "haproxy", main)),
                     ratio(m, med(key, "direct", main))]
            cells += [fmt(med(key, s, e[0])) for e in extra]
            cells.append(ratio(med(key, s, cpu_metric), med(key, "haproxy", cpu_metric)) if s != "direct" else "–")
            cells += [fmt(med(key, s, b[0])) for b in BOX]
            errs = data.get((key, s, "errors"))
            cells.append(f"{sum(errs):.0f}" if errs else "0")
            per = data.get((key, s, main), [])
            cells.append(", ".join(fmt(v, main) for v in per))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    if any(k[0] == "mem" for k in data):
        n = med("mem", "ringlb", "n") or med("mem", "haproxy", "n") or med("mem", "nginx", "n") or 0
        lines.append(f"## Memory: idle, and with {n:,.0f} idle proxied connections (`bench/idle_conns.py`)")
        lines.append("")
        lines.append("RSS = sum of VmRSS of all the balancer's processes. `fresh idle` is right after "
                     "start; `holding` while the idle connections are open; `backend legs` = "
                     "ESTABLISHED sockets the balancer opened to the backends; `after loads` = idle RSS "
                     "after all the load rounds (buffer pools kept).")
        lines.append("")
        lines.append("| system | fresh idle MiB | holding MiB | increase MiB | KiB / conn | "
                     "increase for 10k conns MiB | opened / failed | backend legs | closed early | "
                     "verify 200s | after loads MiB |")
        lines.append("|" + " --- |" * 11)
        for s in present:
            if s == "direct":
                continue
            if med("mem", s, "n") is None:
                if med("mem", s, "run_failed"):
                    lines.append(f"| {NAMES[s]} | idle_conns.py failed (see problems seen) |" + " |" * 9)
                continue
            g = lambda m: med("mem", s, m)
            pc = g("per_conn_kib")
            lines.append("| " + " | ".join([
                NAMES[s], fmt(g("idle_rss_mib")), fmt(g("hold_rss_mib")), fmt(g("inc_mib")),
                fmt(pc), fmt(pc * 10000 / 1024 if pc is not None else None),
                f"{g('opened'):.0f} / {g('failed'):.0f}", f"{g('backend_legs'):.0f}",
                f"{g('closed'):.0f}", f"{g('verify_ok'):.0f} / 20", fmt(g("after_rss_mib")),
            ]) + " |")
        lines.append("")

    if any(k[0].startswith("sys_") for k in data):
        syscall_table(lines, data, med, present)

    text = "\n".join(lines)
    with open(out, "w") as f:
        f.write(text)
    print(text)


def syscall_table(lines, data, med, present):
    """Syscalls per request (ka) / per connection (close) from the --syscalls runs."""
    lines.append("## System calls per request relayed (`--syscalls`: `strace -f -c`, separate run, `wrk -t1 -c64`)")
    lines.append("")
    lines.append("All processes and threads of the balancer traced; the count of each system call divided "
                 "by the requests wrk completed in that run (close: one request = one client connection "
                 "and one backend connection); `failed` = calls that returned an error (mostly EAGAIN). strace slows the balancer, so the request counts are "
                 "not throughput figures. io_uring operations are not system calls: for ringlb's uring "
                 "engine only the io_uring_enter calls are counted.")
    lines.append("")
    lines.append("| system | load | requests (under strace) | syscalls | per unit | failed per unit | top 6 per unit |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for s in present:
        for key, label, unit in SYSCALL_LOADS:
            load = f"sys_{key}"
            per = med(load, s, "per_req")
            if per is None:
                continue
            top = sorted(((m[3:], v[0]) for (l, sy, m), v in data.items()
                          if l == load and sy == s and m.startswith("sc_")), key=lambda x: -x[1])[:6]
            lines.append(f"| {NAMES[s]} | {label} | {med(load, s, 'requests'):,.0f} | "
                         f"{med(load, s, 'calls'):,.0f} | {per:.2f} {unit} | "
                         f"{fmt(med(load, s, 'errors_per_req'))} | "
                         + ", ".join(f"{n} {v:.2f}" if v >= 0.01 else f"{n} {v:.1g}" for n, v in top) + " |")
    lines.append("")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cmd = sys.argv[1]
    if cmd == "wrk":
        parse_wrk(sys.argv[2])
    elif cmd == "iperf":
        parse_iperf(sys.argv[2])
    elif cmd == "strace":
        parse_strace(sys.argv[2], sys.argv[3])
    elif cmd == "report":
        report(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
