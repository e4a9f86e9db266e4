"""
What each way of moving image bytes costs in CPU, measured alone, outside
the daemons (issue 13's groundwork; see bench/README.md).

A "criu" process vmsplices the pages of a pre-touched anonymous mapping
into a pipe sized with F_SETPIPE_SZ (no SPLICE_F_GIFT: the pipe holds
references to the pages, as criu's image pipes do); one path, in a process
of its own, moves them on; a far end, in another, takes them.  Per path:
CPU-seconds per GB of the path's process and of the far end (user and
system apart: getrusage around the transfer), wall GB/s, peak RSS, and the
irq+softirq time /proc/stat counts meanwhile, medians of --runs; with
sender and receiver sharing both cores, and pinned to one core each.

  proxy (pipe -> loopback TCP; the far end discards with recv_into):
    a  splice -> memfd, sendfile memfd -> socket (the brief's "today")
    a2 splice -> memfd, write from a mapping of it (what the proxy does today)
    b  splice -> socket            c  tee -> holding pipes, splice -> socket
    d  read + send                 e  read + TLS 1.3 AES-128-GCM + send
  cache (loopback TCP -> memfd; the far end sends from a mapping):
    f  recv_into + write (today)   f2 the same into pages allocated beforehand
    g  splice socket -> pipe -> memfd
    h  recv_into a mapped memfd (MADV_POPULATE_WRITE); h2 the same, pages allocated beforehand
    k  splice socket -> holding pipes (the socket's pages kept: no store)
  serve (memfd -> the restore's pipe; the far end reads into a buffer):
    i  sendfile (today)            j  pread + write

    python -m bench.datapaths [--size 1G] [--runs 3] [--paths a,b,...]
        [--affinity both|shared|split] [--verify] [--json FILE]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import statistics
from typing import Any, Callable

from bench.datapaths.plumbing import (
    F_SETPIPE_SZ, GB, MiB, PAGE, TCP_ULP, Meter, block, cipherCost, collect, criuFeeder, discardSink,
    expectedCrc, handshake, pipeSink, signal, softirq, spawn, tcpFeeder, tlsConnection, wait,
)
from bench.datapaths.paths import allocatedMemfd, cacheMove, newMemfd, proxyMove, serveMove
from twisted_criu.twistd.parsers import parseSize

SIDES = {"a": "proxy", "a2": "proxy", "b": "proxy", "c": "proxy", "d": "proxy", "e": "proxy",
         "f": "cache", "f2": "cache", "g": "cache", "h": "cache", "h2": "cache", "k": "cache", "i": "serve", "j": "serve"}
NAMES = {
    "a": "splice->memfd, sendfile->sock", "a2": "splice->memfd, mmap write->sock",
    "b": "splice pipe->sock", "c": "tee->hold pipes, splice->sock", "d": "read + send",
    "e": "read + TLS(AES-128-GCM) + send", "f": "recv_into + write->memfd",
    "f2": "recv_into + write->allocated memfd",
    "g": "splice sock->pipe->memfd", "h": "recv_into mmap'd memfd", "h2": "recv_into mmap'd allocated memfd", "k": "splice sock->hold pipes", "i": "sendfile memfd->pipe",
    "j": "pread + write->pipe",
}


def runOnce(kind: str, size: int, opts: argparse.Namespace, split: bool) -> dict[str, Any]:
    """One transfer the C{kind} way; the path on CPU 0 and the rest on CPU 1 if C{split}."""
    here, there = (0, 1) if split else (None, None)
    readyR, readyW = os.pipe()
    goR, goW = os.pipe()
    ours = [readyR, goW]
    side = SIDES[kind]
    children: dict[str, tuple[int, int]] = {}
    waiting = 1
    if side in ("proxy", "cache"):
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    if side == "proxy":
        children["far"] = spawn(lambda: discardSink(listener, readyW, kind == "e", opts.verify), there, ours, readyW)
        pipeR, pipeW = os.pipe()
        fcntl.fcntl(pipeW, F_SETPIPE_SZ, opts.pipeSize)
        children["criu"] = spawn(lambda: criuFeeder(pipeW, size, readyW), there, ours + [pipeR], readyW)
        os.close(pipeW)

        def proxyJob() -> dict[str, Any]:
            sock = socket.create_connection(("127.0.0.1", port))
            conn = None
            if kind == "e":
                conn = tlsConnection(False)
                handshake(conn, sock)
            signal(readyW)
            wait(goR)
            meter = Meter()
            meter.start()
            kept = proxyMove(kind, pipeR, sock, conn, opts)
            sock.shutdown(socket.SHUT_WR)
            out = meter.result()
            while sock.recv(1 << 16):  # (TLS: the session tickets we never read; closing on them resets)
                pass
            sock.close()
            out.update(kept.check(opts.verify))
            return out

        children["path"] = spawn(proxyJob, here, ours, readyW)
        os.close(pipeR)
        waiting = 3
    elif side == "cache":
        def cacheJob() -> dict[str, Any]:
            sock, _ = listener.accept()
            pool = allocatedMemfd(size) if kind in ("f2", "h2") else -1
            signal(readyW)
            wait(goR)
            meter = Meter()
            meter.start()
            kept = cacheMove(kind, sock, size, opts.holdSize, pool)
            return meter.result(**kept.check(opts.verify))

        children["path"] = spawn(cacheJob, here, ours, readyW)
        children["far"] = spawn(lambda: tcpFeeder(port, size, readyW, goR), there, ours, readyW)
        waiting = 2
    else:
        pipeR, pipeW = os.pipe()
        fcntl.fcntl(pipeW, F_SETPIPE_SZ, opts.pipeSize)
        children["far"] = spawn(lambda: pipeSink(pipeR, opts.verify), there, ours + [pipeW], readyW)

        def serveJob() -> dict[str, Any]:
            fd = newMemfd()
            for i in range(0, size, MiB):
                os.write(fd, block(i // MiB)[: min(MiB, size - i)])
            signal(readyW)
            wait(goR)
            meter = Meter()
            meter.start()
            serveMove(kind, fd, pipeW, size)
            os.close(pipeW)
            out = meter.result()
            os.close(fd)
            return out

        children["path"] = spawn(serveJob, here, ours + [pipeR], readyW)
        os.close(pipeR)
        os.close(pipeW)
    if side in ("proxy", "cache"):
        listener.close()
    os.close(readyW)
    os.close(goR)
    got = b""
    while len(got) < waiting and b"!" not in got:
        more = os.read(readyR, waiting - len(got))
        if not more:
            break
        got += more
    irq0 = softirq()
    os.write(goW, b"x" * (2 if side == "cache" else 1) if b"!" not in got else b"!!")
    os.close(goW)
    results = {name: collect(pid, r) for name, (pid, r) in children.items()}
    irq1 = softirq()
    os.close(readyR)
    failed = [f"{name}: {out['error']}" for name, out in sorted(results.items(), key=lambda kv: kv[0] != "path") if "error" in out]
    if failed:
        raise RuntimeError(f"path {kind}: " + "; ".join(failed))
    return summarize(kind, size, opts, results, [b - a for a, b in zip(irq0, irq1)])


def summarize(kind: str, size: int, opts: argparse.Namespace, r: dict[str, Any], irq: list[float]) -> dict[str, Any]:
    path, far = r["path"], r["far"]
    if SIDES[kind] != "cache" and far["bytes"] != size:
        raise RuntimeError(f"path {kind}: {far['bytes']} bytes arrived, not {size}")
    if opts.verify:
        crc = expectedCrc(size)
        if SIDES[kind] != "cache" and far["crc"] != crc:
            raise RuntimeError(f"path {kind}: the bytes that arrived are damaged")
        if kind not in "bdeij" and path["keptCrc"] != crc:
            raise RuntimeError(f"path {kind}: the copy it kept is damaged")
    end = path["t1"] if SIDES[kind] == "cache" else max(path["t1"], far["t1"])
    gb = size / GB
    return {
        "path": kind, "side": SIDES[kind],
        "path_user": path["user"] / gb, "path_sys": path["sys"] / gb,
        "far_user": far["user"] / gb, "far_sys": far["sys"] / gb,
        "criu_cpu": (r["criu"]["user"] + r["criu"]["sys"]) / gb if "criu" in r else 0.0,
        "GBps": gb / (end - path["t0"]), "path_rss_MiB": path["maxrssKiB"] / 1024,
        "path_rss_added_MiB": (path["maxrssKiB"] - path["startRssKiB"]) / 1024,
        "far_rss_MiB": far["maxrssKiB"] / 1024, "irq_per_cpu": [x / gb for x in irq],
        "hold_pipes": float(path.get("holdPipes", 0)),
    }


def median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(row[key] for row in rows)
    out["irq_per_cpu"] = [statistics.median(row["irq_per_cpu"][i] for row in rows) for i in range(len(rows[0]["irq_per_cpu"]))]
    return out


def probeKernelTLS() -> str:
    """Can a connected TCP socket take the kernel's TLS (kTLS) upper layer?"""
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            available = f.read().strip() or "(none)"
    except OSError as e:
        available = f"unreadable ({e.strerror})"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as sock:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
                result = "accepted: kTLS is available"
            except OSError as e:
                result = f"refused: {os.strerror(e.errno or 0)} (errno {e.errno})"
    return f"tcp_available_ulp: {available}; setsockopt(TCP_ULP, 'tls') {result}"


def probePipes(largest: int = 4 << 30) -> tuple[int, str]:
    """The largest pipe F_SETPIPE_SZ grants here (trying powers of two), and why the next one failed."""
    size, granted, why = MiB, 0, "no limit met"
    while size <= largest:
        r, w = os.pipe()
        try:
            granted = fcntl.fcntl(w, F_SETPIPE_SZ, size)
        except OSError as e:
            why = f"{size // MiB} MiB: {e.strerror}"
            break
        finally:
            os.close(r)
            os.close(w)
        size *= 2
    return granted, why


def positiveSize(text: str) -> int:
    try:
        size = parseSize(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if size <= 0 or size % PAGE:
        raise argparse.ArgumentTypeError(f"{text!r}: need a positive multiple of {PAGE} bytes (try 1G or 64K)")
    return size


def parseArgs(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="admin/bench-datapaths", description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=positiveSize, default=positiveSize("1G"), help="bytes per transfer (default 1G)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each path; medians are reported (default 3)")
    parser.add_argument("--paths", default=",".join(SIDES), help="comma-separated paths (default: all)")
    parser.add_argument("--affinity", choices=("both", "shared", "split"), default="both",
                        help="shared: unpinned; split: the path on CPU 0, the other processes on CPU 1")
    parser.add_argument("--pipe-size", dest="pipeSize", type=positiveSize, default=MiB,
                        help="criu's pipe, set with F_SETPIPE_SZ (default 1M, pipe-max-size's default)")
    parser.add_argument("--hold-size", dest="holdSize", type=positiveSize,
                        help="each holding pipe of path c (default: the largest F_SETPIPE_SZ grants, at most 64M)")
    parser.add_argument("--verify", action="store_true", help="check the CRC-32 of what arrived and what was kept")
    parser.add_argument("--json", help="write every run's figures to this file")
    opts = parser.parse_args(argv)
    opts.paths = opts.paths.split(",")
    unknown = [p for p in opts.paths if p not in SIDES]
    if unknown:
        parser.error(f"unknown path(s) {', '.join(unknown)}: choose from {', '.join(SIDES)}")
    if opts.runs < 1:
        parser.error("--runs must be at least 1")
    if opts.affinity != "shared" and len(os.sched_getaffinity(0)) < 2:
        parser.error("--affinity split needs two CPUs")
    return opts


def fmt(m: dict[str, Any]) -> str:
    total = m["path_user"] + m["path_sys"] + m["far_user"] + m["far_sys"]
    irq = "/".join(f"{x:.2f}" for x in m["irq_per_cpu"])
    return (f"{m['path']:<3} {NAMES[m['path']]:<32} {m['path_user']:5.2f} {m['path_sys']:5.2f} | "
            f"{m['far_user']:5.2f} {m['far_sys']:5.2f} | {total:5.2f} | {m['GBps']:5.2f} | "
            f"{m['path_rss_MiB']:5.0f} {m['path_rss_added_MiB']:+4.0f} {m['far_rss_MiB']:5.0f} | {irq}")


def main(argv: list[str], say: Callable[[str], None] = print) -> int:
    opts = parseArgs(argv)
    granted, why = probePipes()
    if opts.holdSize is None:
        opts.holdSize = min(granted, 64 * MiB)
    say(probeKernelTLS())
    say(f"largest pipe F_SETPIPE_SZ grants: {granted // MiB} MiB (next: {why}); pipe-max-size "
        f"{open('/proc/sys/fs/pipe-max-size').read().strip()}; loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    modes = {"both": ["shared", "split"], "shared": ["shared"], "split": ["split"]}[opts.affinity]
    report: dict[str, Any] = {"size": opts.size, "runs": {}, "medians": {}}
    for mode in modes:
        say(f"\n{mode}: {opts.size / GB:.3f} GB, medians of {opts.runs}; CPU-s/GB user sys of the path | "
            f"of the far end | total | GB/s | peak RSS MiB path (+ during transfer) far | irq+softirq s/GB per CPU")
        for kind in opts.paths:
            rows = [runOnce(kind, opts.size, opts, mode == "split") for _ in range(opts.runs)]
            report["runs"].setdefault(mode, {})[kind] = rows
            m = report["medians"].setdefault(mode, {})[kind] = median(rows)
            say(fmt(m) + (f"  ({m['hold_pipes']:.0f} holding pipes)" if kind in "ck" else ""))
    say(f"AES-128-GCM alone (OpenSSL, 1 MiB updates, one core): {cipherCost(min(opts.size, 256 * MiB)):.2f} CPU-s/GB")
    say(f"loadavg after: {os.getloadavg()[0]:.2f}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0

