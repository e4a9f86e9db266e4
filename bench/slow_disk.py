#!/usr/bin/env python3
"""
A criu-cache spilling to a slow disk: does it still answer?

Starts a criu-cache (twistd, 127.0.0.1) with a small --memory-limit and its
--spill-dir on a disk throttled with the blkio cgroup controller (v1
blkio.throttle.*_bps_device or v2 io.max), pushes one image to it with
`twisted-criu push`, and meanwhile times GET /sessions on its control
socket back to back.  A daemon whose reactor waits for the disk answers
late; one that pauses only the image's link answers at once.

Run from the repository root, as root (cgroups), with the project
installed:

    python bench/slow_disk.py [--rate 50M] [--size 256M] [--runs 2]

Prints one line per run and the medians; removes what it made.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def wholeDisk(path: str) -> str:
    """MAJOR:MINOR of the disk (not the partition) that holds C{path}."""
    dev = os.stat(path).st_dev
    number = f"{os.major(dev)}:{os.minor(dev)}"
    sysfs = f"/sys/dev/block/{number}"
    if os.path.exists(os.path.join(sysfs, "partition")):
        with open(os.path.join(os.path.realpath(sysfs), "..", "dev")) as f:
            number = f.read().strip()
    return number


class Throttle:
    """A cgroup whose processes read and write C{disk} at C{rate} bytes/s."""

    def __init__(self, disk: str, rate: int) -> None:
        v1 = "/sys/fs/cgroup/blkio"
        v2 = "/sys/fs/cgroup"
        if os.path.isdir(v1):
            self.path = os.path.join(v1, f"twisted-criu-slow-disk-{os.getpid()}")
            os.mkdir(self.path)
            for what in ("read", "write"):
                self._set(f"blkio.throttle.{what}_bps_device", f"{disk} {rate}")
        elif "io" in open(os.path.join(v2, "cgroup.controllers")).read().split():
            with open(os.path.join(v2, "cgroup.subtree_control"), "w") as f:
                f.write("+io")
            self.path = os.path.join(v2, f"twisted-criu-slow-disk-{os.getpid()}")
            os.mkdir(self.path)
            self._set("io.max", f"{disk} rbps={rate} wbps={rate}")
        else:
            sys.exit("slow_disk: no blkio (cgroup v1) or io (cgroup v2) controller to throttle the disk with")

    def _set(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def add(self, pid: int) -> None:
        self._set("cgroup.procs", str(pid))

    def remove(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def getSessions(controlSocket: str) -> float:
    """One GET /sessions on the control socket; returns the seconds it took."""
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(30)
        client.connect(controlSocket)
        client.sendall(b"GET /sessions HTTP/1.0\r\nHost: cache\r\n\r\n")
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
    if not reply.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
        raise RuntimeError(f"control API answered {reply[:80]!r}")
    return time.monotonic() - started


def oneRun(args: argparse.Namespace, throttle: Throttle, work: str) -> tuple[float, list[float]]:
    cacheDir = os.path.join(work, "cache")
    dumpDir = os.path.join(work, "dump")
    os.makedirs(cacheDir)
    os.makedirs(dumpDir)
    block = os.urandom(1 << 20)
    with open(os.path.join(dumpDir, "pages-1.img"), "wb") as f:
        for _ in range(args.size >> 20):
            f.write(block)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(os.path.join(work, "cache.log"), "w")
    cache = subprocess.Popen(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "criu-cache", "-D", cacheDir,
         "--listen", f"tcp:{port}:interface=127.0.0.1", "--memory-limit", "16M",
         "--spill-dir", args.spill_dir],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
    )
    try:
        throttle.add(cache.pid)
        control = os.path.join(cacheDir, "cache-control.sock")
        deadline = time.monotonic() + 30
        while not os.path.exists(control):
            if cache.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"slow_disk: the cache did not start; see {log.name}")
            time.sleep(0.05)
        started = time.monotonic()
        push = subprocess.Popen(
            [os.path.join(BIN, "twisted-criu"), "push", dumpDir, "--address", "127.0.0.1",
             "--port", str(port), "--snapshot-id", "slow-disk"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        latencies = []
        while push.poll() is None:
            latencies.append(getSessions(control))
            time.sleep(0.01)
        took = time.monotonic() - started
        if push.returncode:
            sys.exit(f"slow_disk: twisted-criu push failed ({push.returncode}); see {log.name}")
        return took, latencies
    finally:
        cache.terminate()
        cache.wait(30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rate", type=size, default=size("50M"), help="bytes/s the spill disk reads and writes")
    parser.add_argument("--size", type=size, default=size("256M"), help="size of the pushed image (whole MiB)")
    parser.add_argument("--runs", type=int, default=2, help="repetitions")
    parser.add_argument("--spill-parent", default="/var/tmp", help="a directory on the disk to throttle")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("slow_disk: needs root (it makes a cgroup)")
    throttle = Throttle(wholeDisk(args.spill_parent), args.rate)
    args.spill_dir = os.path.join(args.spill_parent, f"twisted-criu-slow-disk-{os.getpid()}")
    medians, p90s, maxima = [], [], []
    try:
        for run in range(1, args.runs + 1):
            work = tempfile.mkdtemp(prefix="twisted-criu-slow-disk-")
            try:
                took, latencies = oneRun(args, throttle, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            latencies.sort()
            median, p90, worst = statistics.median(latencies), latencies[int(0.9 * len(latencies))], latencies[-1]
            medians.append(median)
            p90s.append(p90)
            maxima.append(worst)
            print(f"run {run}: {args.size >> 20} MiB pushed in {took:.1f} s ({args.size / took / 1e6:.0f} MB/s, disk "
                  f"limited to {args.rate / 1e6:.0f} MB/s); GET /sessions x{len(latencies)}: median "
                  f"{median * 1e3:.1f} ms, p90 {p90 * 1e3:.1f} ms, max {worst * 1e3:.1f} ms", flush=True)
    finally:
        throttle.remove()
        shutil.rmtree(args.spill_dir, ignore_errors=True)
    print(f"medians of {args.runs} run(s): GET /sessions median {statistics.median(medians) * 1e3:.1f} ms, "
          f"p90 {statistics.median(p90s) * 1e3:.1f} ms, max {statistics.median(maxima) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
