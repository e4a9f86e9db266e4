#!/usr/bin/env python3
"""
What twisted-criu-hook adds to a migration's downtime, with a real criu.

Each round migrates a process holding --size MiB of memory through a
criu-proxy and a criu-cache on loopback (criu dump --stream, then criu
restore --stream), once with `--action-script twisted-criu-hook` on both
criu commands and once without, alternating.  Downtime is the wall time of
criu dump (the process is frozen from its start; with the hook criu also
waits for the cache's confirmation before it kills the process) plus that
of criu restore (until the process runs again).  Reported: medians over
--runs rounds, the ratio hooked / plain, the hook's own wait (from its line
in criu's log), the daemons' CPU-seconds per GB moved and their peak RSS.

Needs root and a criu (TWISTED_CRIU_CRIU, or `criu` on PATH; admin/get-criu
builds one).  Binds only 127.0.0.1 and UNIX sockets.

    sudo .venv/bin/python bench/hook_downtime.py --size 1024 --runs 5
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]
HOOK = str(VENV_BIN / "twisted-criu-hook")

WORKLOAD = """
import os, sys, time
size = int(sys.argv[1]) << 20
block = os.urandom(1 << 20)
memory = bytearray(size)
for offset in range(0, size, 1 << 20):
    memory[offset : offset + (1 << 20)] = block
    memory[offset : offset + 8] = offset.to_bytes(8, "little")
sys.stdout.write("ready\\n"); sys.stdout.flush()
while True:
    time.sleep(0.5)
"""


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpuSeconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peakRSS(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def waitFor(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def pretouch(gib: int) -> None:
    """Fault in fresh pages once, so later runs do not pay first-touch costs."""
    if gib <= 0:
        return
    size = gib << 30
    region = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        region[offset] = 1
    region.close()


def oneRound(criu: str, sizeMiB: int, hooked: bool, base: Path) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="hd-", dir=base))
    src, dst = work / "src", work / "dst"
    src.mkdir()
    dst.mkdir()
    port = str(freePort())
    daemons = []
    workload = None
    restored = None
    try:
        for name, args in (
            ("criu-cache", ["--port", port, "-D", str(dst), "--link-key", str(work / "link.key")]),
            ("criu-proxy", ["--address", "127.0.0.1", "--port", port, "-D", str(src),
                            "--link-key", str(work / "link.key")]),
        ):
            daemons.append(
                subprocess.Popen(
                    [*TWISTD, "-n", "--pidfile=", f"--logfile={work / name}.log", name, *args],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                )
            )
        waitFor(lambda: (dst / "streamer-serve.sock").exists() and (src / "streamer-capture.sock").exists(), 30, "the daemons")
        workload = subprocess.Popen(
            [sys.executable, "-c", WORKLOAD, str(sizeMiB)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True, cwd=work,
        )
        assert workload.stdout is not None
        if workload.stdout.readline().strip() != b"ready":
            raise RuntimeError("the workload did not start")
        pid = workload.pid
        before = [cpuSeconds(d.pid) for d in daemons]
        hook = ["--action-script", HOOK] if hooked else []
        env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
        started = time.monotonic()
        subprocess.run(
            [criu, "dump", "--stream", "-t", str(pid), "-D", str(src), "-o", "dump.log", *hook],
            check=True, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=600,
        )
        dumped = time.monotonic()
        workload.wait(30)
        waitFor(lambda: not os.path.exists(f"/proc/{pid}"), 30, "the dumped task to go")
        restoreStart = time.monotonic()
        subprocess.run(
            [criu, "restore", "--stream", "-d", "-D", str(dst), "-o", "restore.log", *hook],
            check=True, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=600,
        )
        restoredAt = time.monotonic()
        restored = pid
        cpu = sum(cpuSeconds(d.pid) - b for d, b in zip(daemons, before))
        rss = [peakRSS(d.pid) for d in daemons]
        waited = 0.0
        if hooked:
            match = re.search(r"twisted-criu-hook: post-dump: .* waited ([\d.]+) s", (src / "dump.log").read_text())
            if match is None:
                raise RuntimeError("no hook line in criu's dump log")
            waited = float(match.group(1))
        return {
            "dump": dumped - started,
            "restore": restoredAt - restoreStart,
            "downtime": (dumped - started) + (restoredAt - restoreStart),
            "hookWait": waited,
            "cpuPerGB": cpu / (sizeMiB / 1024),
            "proxyRSS": rss[1] / (1 << 20),
            "cacheRSS": rss[0] / (1 << 20),
        }
    finally:
        if restored is not None:
            try:
                os.kill(restored, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if workload is not None and workload.poll() is None:
            workload.kill()
            workload.wait()
        for daemon in daemons:
            daemon.terminate()
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        if os.environ.get("HOOK_DOWNTIME_KEEP"):
            shutil.copytree(work, os.environ["HOOK_DOWNTIME_KEEP"] + f"/{work.name}", ignore=shutil.ignore_patterns("*.sock"))
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=1024, help="MiB of memory the process holds [1024]")
    parser.add_argument("--runs", type=int, default=3, help="rounds (each: one hooked, one plain migration) [3]")
    parser.add_argument("--pretouch", type=int, default=0, help="GiB of fresh memory to touch once first [0]")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    criu = os.environ.get("TWISTED_CRIU_CRIU") or shutil.which("criu")
    if not criu:
        sys.exit("hook_downtime: no criu (set TWISTED_CRIU_CRIU, or run admin/get-criu)")
    if os.geteuid() != 0:
        sys.exit("hook_downtime: criu needs root")
    pretouch(args.pretouch)
    base = Path(tempfile.mkdtemp(prefix="hook-downtime-"))
    results: dict[str, list[dict[str, float]]] = {"hooked": [], "plain": []}
    try:
        for n in range(args.runs):
            order = ("hooked", "plain") if n % 2 == 0 else ("plain", "hooked")
            for kind in order:
                result = oneRound(criu, args.size, kind == "hooked", base)
                results[kind].append(result)
                print(f"run {n + 1} {kind:6}  " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    print(f"\nmedians of {args.runs} runs, {args.size} MiB process, loopback:")
    print(f"{'':10}{'dump s':>9}{'restore s':>11}{'downtime s':>12}{'hook wait s':>13}{'CPU-s/GB':>10}{'proxy MiB':>11}{'cache MiB':>11}")
    for kind in ("plain", "hooked"):
        print(
            f"{kind:10}{median(kind, 'dump'):9.3f}{median(kind, 'restore'):11.3f}{median(kind, 'downtime'):12.3f}"
            f"{median(kind, 'hookWait'):13.3f}{median(kind, 'cpuPerGB'):10.2f}{median(kind, 'proxyRSS'):11.0f}{median(kind, 'cacheRSS'):11.0f}"
        )
    ratio = median("hooked", "downtime") / median("plain", "downtime")
    print(f"downtime hooked / plain: {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size_mib": args.size, "runs": results, "ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
