# -*- test-case-name: tests.test_downtime,tests.slow.test_criu_downtime -*-
"""
C{admin/bench-downtime}: a real redis migrated by a real criu over a shaped
loopback link, the C{tar | socat} baseline against twisted-criu; see
C{docs/benchmarks.md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Sequence

from bench.downtime import dataset, migrate, report
from bench.downtime.netns import Namespace, burstFor, rateBits
from bench.downtime.redis import RedisServer, replay
from bench.downtime.sample import memoryRatio
from bench.downtime.tools import ROOT, SetupError, ensurePackages, findCriu, hasCompress, proxyHelp
from twisted_criu.testing.demo.real import hookProgram
from twisted_criu.twistd.parsers import parseSize

#: The variants: the baseline, and twisted-criu with each C{--compress} mode.
MODES = ("baseline", "none", "auto", "zstd")
#: The ones run by default.
DEFAULT_MODES = ("baseline", "none", "auto")


def say(text: str = "") -> None:
    print(text, flush=True)


def listOf(allowed: Callable[[str], object]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list, each item checked by C{allowed}."""

    def parse(value: str) -> list[str]:
        items = [item.strip().lower() for item in value.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("an empty list")
        for item in items:
            try:
                allowed(item)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        return items

    return parse


def checkRate(rate: str) -> None:
    if rate != "none":
        rateBits(rate)


def checkMode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="admin/bench-downtime",
        description="Downtime of a real redis migrated by a real criu over a shaped loopback link:"
        " criu dump -D + tar|socat + criu restore, against twisted-criu (--compress none, auto).",
    )
    p.add_argument("--runs", type=int, default=3, help="migrations of each variant at each rate; medians of these [3]")
    p.add_argument("--size", type=parseSize, default=parseSize("512M"), help="redis's used memory after the fill [512M]")
    p.add_argument("--rates", type=listOf(checkRate), default=["1gbit", "10gbit", "none"],
                   help="link rates (tc rates; none = unshaped) [1gbit,10gbit,none]")
    p.add_argument("--modes", type=listOf(checkMode), default=list(DEFAULT_MODES),
                   help="variants: baseline (tar|socat); none, auto, zstd (twisted-criu --compress MODE)"
                   " [baseline,none,auto]")
    p.add_argument("--seed", type=int, default=12, help="the data set's seed [12]")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--timeout", type=float, default=300, help="seconds any one step may take [300]")
    p.add_argument("--keep", action="store_true", help=(
            "keep the work directory (logs, images) under /dev/shm: the baseline's images stay in"
            " memory, about the process's size a run, and later runs have that much less free memory"
            " (in a full run with --keep, the later runs were slower); for logs, not for figures"
        ))
    return p


def phases(marks: dict[str, float]) -> str:
    """C{dump 1.20 transfer 5.10 ...}: when each step ended, seconds from the dump's start."""
    return " ".join(f"{name} {seconds:.2f}" for name, seconds in marks.items())


#: The signals that stop the benchmark (it cleans up as it unwinds).
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def interrupt(signum: int, frame: FrameType | None) -> None:
    """
    Stop the benchmark (it cleans up as it unwinds).  Later signals are
    ignored: one sent again (by C{timeout}, which passes its own on, or a
    second Ctrl-C) landed inside a clean-up and left a redis behind.
    """
    ignoreInterrupts()
    raise KeyboardInterrupt(f"signal {signum}")


def ignoreInterrupts() -> None:
    for signum in INTERRUPTS:
        signal.signal(signum, signal.SIG_IGN)


def gitRevision() -> str:
    result = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty=+dirty"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


class Bench:
    """One invocation: the data set, the namespace, and every migration."""

    def __init__(self, args: argparse.Namespace, base: Path, namespace: Namespace, tools: migrate.Tools) -> None:
        self.args = args
        self.base = base
        self.namespace = namespace
        self.tools = tools
        self.batches: list[tuple[bytes, int]] = []
        self.digest = ""
        self.info: dict[str, Any] = {}

    def fill(self) -> None:
        """Build the data set into a first redis; its digest and how well its memory compresses."""
        directory = self.base / "fill"
        directory.mkdir()
        started = time.monotonic()
        server = RedisServer(self.tools.redis, directory)
        try:
            server.ready()
            client = server.client()
            self.batches = dataset.build(self.args.seed, self.args.size, client.pipeline, client.usedMemory)
            used = client.usedMemory()
            self.digest = client.digest()
            client.close()
            with open(f"/proc/{server.pid}/status") as f:
                rss = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))
            ratio, sampled = memoryRatio(server.pid)
        finally:
            server.kill()
        keys = sum(count for _, count in self.batches)
        self.info = {"keys": keys, "used_memory": used, "rss": rss, "zstd1_ratio": ratio, "sample_bytes": sampled,
                     "digest": self.digest}
        say(
            f"data set: {keys} keys (seed {self.args.seed}), redis used_memory {used / 2**20:.0f} MiB,"
            f" RSS {rss / 2**20:.0f} MiB, DEBUG DIGEST {self.digest[:16]}; built in {time.monotonic() - started:.1f} s"
        )
        say(f"compressibility: a {sampled / 2**20:.0f} MiB sample of its resident memory packs {ratio:.2f}x with zstd -1 (1 MiB blocks)")

    def migrate(self, rate: str, index: int, mode: str) -> dict[str, Any]:
        """One fresh redis with the data set, migrated the C{mode} way."""
        directory = self.base / f"{rate}-{index + 1}-{mode}"
        for sub in ("", "src", "dst", "redis"):
            (directory / sub).mkdir(exist_ok=True)
        server = RedisServer(self.tools.redis, directory / "redis")
        run = migrate.Run(self.tools, self.namespace, directory, server)
        try:
            server.ready()
            # The same commands as the first fill: the restored redis must have
            # the data set's digest (DEBUG DIGEST takes seconds at 512M: once a run).
            replay(server.socketPath, self.batches)
            if mode == "baseline":
                return migrate.baseline(run, self.digest)
            return migrate.throughDaemons(run, self.digest, mode)
        finally:
            run.cleanUp()
            if not self.args.keep:
                shutil.rmtree(directory, ignore_errors=True)

    def rate(self, rate: str) -> report.Runs:
        """Every run of every mode at C{rate}."""
        shaped = None if rate == "none" else rate
        self.namespace.shape(shaped)
        how = "unshaped loopback" if shaped is None else f"tc qdisc tbf rate {rate} burst {burstFor(rate)} latency 100ms"
        say(f"\n== rate {rate}: {how}")
        runs: report.Runs = []
        for index in range(self.args.runs):
            results: dict[str, dict[str, Any]] = {}
            for mode in self.args.modes:
                result = self.migrate(rate, index, mode)
                results[mode] = result
                cpu = "  ".join(f"{name} {value:.2f}" for name, value in result["cpu_s"].items())
                peaks = result.get("peak_memory_bytes")
                if peaks:
                    cpu += "  peak MiB: " + report.mebibytes(peaks)
                say(
                    f"  run {index + 1}/{self.args.runs} {mode:<8} downtime {result['downtime_s']:6.2f} s"
                    f"  wire {result['wire_bytes'] / 1e6:7.1f} MB  cpu s: {cpu}  digest ok"
                    f"  ({phases(result['phases_s'])})"
                )
            runs.append(results)
        say()
        for line in report.table(rate, runs, self.args.modes, self.info.get("rss")):
            say(f"  {line}")
        return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if os.geteuid() != 0:
        say("bench-downtime: needs root (criu, ip netns, tc)")
        return 2
    for signum in INTERRUPTS:
        signal.signal(signum, interrupt)
    try:
        ensurePackages(say)
        criu = findCriu()
    except SetupError as e:
        say(f"bench-downtime: {e}")
        return 2
    compress = hasCompress(proxyHelp())
    modes = list(args.modes)
    if not compress:
        left = [mode for mode in modes if mode not in ("baseline", "none")]
        modes = [mode for mode in modes if mode in ("baseline", "none")]
        say(
            "note: this criu-proxy has no --compress option: mode 'none' runs it without the flag"
            + (f"; left out: {', '.join(left)}" if left else "")
        )
    args.modes = modes
    base = Path(tempfile.mkdtemp(prefix="tcriu-downtime-", dir="/dev/shm"))
    tools = migrate.Tools(
        criu=criu,
        redis=shutil.which("redis-server") or "redis-server",
        hook=hookProgram(base),
        timeout=args.timeout,
        proxyArgs={mode: ["--compress", mode] for mode in MODES if mode != "baseline"} if compress else {},
    )
    namespace = Namespace(f"tcriu-{os.getpid()}")
    migrate.becomeSubreaper()
    results: dict[str, report.Runs] = {}
    config = {
        "size": args.size, "runs": args.runs, "rates": args.rates, "modes": modes, "seed": args.seed,
        "criu": criu, "revision": gitRevision(), "compress_option": compress,
        "transport": "criu --stream, twisted-criu-hook on dump and restore; TLS link with a link key",
    }
    say(f"bench-downtime: {args.runs} run(s) of {', '.join(modes)} at {', '.join(args.rates)}; criu {criu};"
        f" namespace {namespace.name}; work dir {base}")
    try:
        namespace.create()
        bench = Bench(args, base, namespace, tools)
        bench.fill()
        config["data"] = bench.info
        for rate in args.rates:
            results[rate] = bench.rate(rate)
    except KeyboardInterrupt:
        say("\nbench-downtime: interrupted; cleaning up")
        return 130
    except migrate.MigrationFailed as e:
        say(f"\nbench-downtime: FAILED: {e}")
        return 1
    finally:
        ignoreInterrupts()  # a second Ctrl-C must not stop the clean-up
        namespace.remove()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.document(config, results, modes), f, indent=1)
        say(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
