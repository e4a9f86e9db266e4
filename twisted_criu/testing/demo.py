# -*- test-case-name: tests.slow.test_packaging -*-
"""
A loopback migration, end to end, with no CRIU binary.

C{python -m twisted_criu.testing.demo} starts a real C{twistd criu-cache} and a real
C{twistd criu-proxy} as separate processes linked over TLS on 127.0.0.1,
then plays C{criu dump --remote} against the proxy and C{criu restore
--remote} against the cache with L{twisted_criu.testing.criu.LocalImageClient}
(or C{--stream} with L{twisted_criu.testing.criu.StreamClient}), and checks that
every image comes back byte for byte (SHA-256), that a missing image gets
ENOENT, and that both daemons exit 0 on their own (they run with
C{--once}).  Everything binds loopback or UNIX sockets.

This module is the run and what it prints; the daemons are
L{twisted_criu.testing.processes}, the images L{twisted_criu.testing.imageset}.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import sys
import tempfile
import time
from types import FrameType
from typing import NoReturn, Sequence, Union

from twisted_criu import __version__, wire
from twisted_criu.testing.criu import (
    PIPE,
    SEED,
    ImageReader,
    ImageWriter,
    LocalImageClient,
    StreamClient,
)
from twisted_criu.testing.imageset import (
    CHUNK,
    Image,
    dumpOrder,
    generateImages,
    restoreOrder,
    sha256File,
    syntheticNames,
)
from twisted_criu.testing.processes import (
    Daemon,
    DaemonError,
    freePort,
    tail,
    waitForSockets,
)

#: What criu restore asks for that usually does not exist.
MISSING_IMAGE = "memfd.img"


class DemoError(Exception):
    """The demo failed; the message says why."""


# -- output -----------------------------------------------------------------


def say(message: str = "") -> None:
    print(message, flush=True)


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def rate(size: int, seconds: float) -> str:
    return f"{size / 1e6 / max(seconds, 1e-9):.1f} MB/s"


# -- images -----------------------------------------------------------------


def collectImages(directory: str, synthetic: bool) -> list[Image]:
    images = []
    entries = sorted(os.listdir(directory))
    if synthetic:
        entries = syntheticNames()
    for name in entries:
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or os.path.islink(path):
            say(f"  (skipping {name}: not a regular file)")
            continue
        try:
            wire.checkName(name)
        except Exception as e:
            raise DemoError(f"cannot send {path}: {e}") from None
        images.append(Image(name, path, os.path.getsize(path), sha256File(path)))
    if not images:
        raise DemoError(f"no image files in {directory}")
    if synthetic:
        return images
    order = dumpOrder([i.name for i in images])
    byName = {i.name: i for i in images}
    return [byName[n] for n in order]


# -- daemons ----------------------------------------------------------------


def waitForExit(daemons: Sequence[Daemon], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for daemon in daemons:
        code = daemon.wait(deadline - time.monotonic())
        if code is None:
            raise daemon.failure(
                f"still running {timeout:g} s after the migration finished"
            )
        if code != 0:
            raise daemon.failure(f"exited with code {code}")
        say(f"  {daemon.tapname:<10} exited 0 by itself")


# -- criu's side ------------------------------------------------------------


class RemoteCriu:
    """C{criu dump|restore --remote}: one connection per image, snapshot ids."""

    protocol = "remote"
    proxySocket = "img-proxy.sock"
    cacheSocket = "img-cache.sock"

    def __init__(self, proxyPath: str, cachePath: str, variant: str, snapshotId: str, timeout: float) -> None:
        self.dumper = LocalImageClient(proxyPath, variant, timeout=timeout)
        self.restorer = LocalImageClient(cachePath, variant, timeout=timeout)
        self.snapshotId = snapshotId
        self.dumpCommand = f"criu dump --remote -D {snapshotId}"
        self.restoreCommand = f"criu restore --remote -D {snapshotId}"

    def startDump(self, width: int) -> None:
        self.dumper.pushSnapshotId(self.snapshotId)
        say(f"  append {wire.PARENT_IMAGE:<{width}} snapshot id {self.snapshotId!r}")
        ids = self.dumper.snapshotIds()
        if not ids or ids[-1] != self.snapshotId:
            raise DemoError(
                f"the proxy's parent list is {ids!r}, expected it to end with {self.snapshotId!r}"
            )
        say(f"  read   {wire.PARENT_IMAGE:<{width}} {ids!r}")

    def openWrite(self, name: str) -> ImageWriter:
        return self.dumper.openWrite(self.snapshotId, name)

    def finishDump(self) -> None:
        self.dumper.finishDump()
        say("  finish (dump)")

    def startRestore(self, width: int) -> None:
        ids = self.restorer.snapshotIds()
        if self.snapshotId not in ids:
            raise DemoError(f"the cache's parent list {ids!r} lacks {self.snapshotId!r}")
        say(f"  read   {wire.PARENT_IMAGE:<{width}} {ids!r}")

    def openRead(self, name: str) -> ImageReader | None:
        return self.restorer.openRead(self.snapshotId, name)

    def finishRestore(self) -> None:
        self.restorer.finishRestore()
        say("  finish (restore)")


class StreamCriu:
    """C{criu dump|restore --stream}: one control connection per run."""

    protocol = "stream"
    proxySocket = "streamer-capture.sock"
    cacheSocket = "streamer-serve.sock"

    def __init__(self, proxyPath: str, cachePath: str, timeout: float) -> None:
        self.dumper = StreamClient(proxyPath, timeout=timeout)
        self.restorer = StreamClient(cachePath, timeout=timeout)
        self.dumpCommand = "criu dump --stream -D DIR"
        self.restoreCommand = "criu restore --stream -D DIR"

    def startDump(self, width: int) -> None:
        pass

    def openWrite(self, name: str) -> ImageWriter:
        return self.dumper.openWrite(name)

    def finishDump(self) -> None:
        self.dumper.close()
        say("  close  (end of dump)")

    def startRestore(self, width: int) -> None:
        pass

    def openRead(self, name: str) -> ImageReader | None:
        return self.restorer.openRead(name)

    def finishRestore(self) -> None:
        self.restorer.close()
        say("  close  (end of restore)")


Criu = Union[RemoteCriu, StreamCriu]


def sendImage(criu: Criu, image: Image) -> None:
    digest = hashlib.sha256()
    with criu.openWrite(image.name) as writer, open(image.path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            writer.write(chunk)
    if writer.size != image.size or digest.hexdigest() != image.sha256:
        raise DemoError(f"{image.path} changed while it was being sent")


def fetchImage(criu: Criu, name: str) -> tuple[int, str] | None:
    reader = criu.openRead(name)
    if reader is None:
        return None
    digest = hashlib.sha256()
    size = 0
    with reader:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def imageLine(verb: str, name: str, size: int, sha: str, width: int, note: str = "") -> str:
    return f"  {verb:<6} {name:<{width}} {size:>12,} B  sha256 {sha[:16]}{note}"


def dump(criu: Criu, images: Sequence[Image], width: int) -> float:
    say(f"dump: {criu.dumpCommand}  ->  criu-proxy")
    start = time.monotonic()
    criu.startDump(width)
    for image in images:
        sendImage(criu, image)
        say(imageLine("write", image.name, image.size, image.sha256, width))
    criu.finishDump()
    elapsed = time.monotonic() - start
    total = sum(i.size for i in images)
    say(f"  dumped {len(images)} images, {human(total)} in {elapsed:.2f} s ({rate(total, elapsed)})")
    return elapsed


def restore(criu: Criu, images: Sequence[Image], width: int) -> float:
    say(f"restore: {criu.restoreCommand}  <-  criu-cache")
    start = time.monotonic()
    criu.startRestore(width)
    byName = {i.name: i for i in images}
    mismatches = []
    for name in restoreOrder(list(byName)):
        image = byName[name]
        got = fetchImage(criu, name)
        if got is None:
            say(f"  read   {name:<{width}} ENOENT  <-- MISSING")
            mismatches.append(f"{name}: the cache says it does not exist")
            continue
        size, sha = got
        if (size, sha) == (image.size, image.sha256):
            say(imageLine("read", name, size, sha, width, "  ok"))
        else:
            say(imageLine("read", name, size, sha, width, "  <-- MISMATCH"))
            mismatches.append(
                f"{name}: got {size} bytes sha256 {sha[:16]}, "
                f"sent {image.size} bytes sha256 {image.sha256[:16]}"
            )
    missing = MISSING_IMAGE
    while missing in byName:
        missing = "x" + missing
    if fetchImage(criu, missing) is not None:
        mismatches.append(f"{missing}: was never dumped, yet the cache served it")
        say(f"  read   {missing:<{width}} served  <-- expected ENOENT")
    else:
        say(f"  read   {missing:<{width}} ENOENT (never dumped: as expected)")
    criu.finishRestore()
    elapsed = time.monotonic() - start
    if mismatches:
        raise DemoError("restored images differ from the dumped ones:\n  " + "\n  ".join(mismatches))
    total = sum(i.size for i in images)
    say(
        f"  restored {len(images)} images, {human(total)} in {elapsed:.2f} s "
        f"({rate(total, elapsed)}; includes waiting for the proxy to forward them)"
    )
    return elapsed


# -- main -------------------------------------------------------------------


def parseArguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m twisted_criu.testing.demo",
        description=(
            "Loopback migration demo: start a criu-cache and a criu-proxy "
            "(twistd, --once) linked over 127.0.0.1, act as `criu dump "
            "--remote` and `criu restore --remote` (or --stream), and check every image "
            "comes back intact (SHA-256), that a missing image gets ENOENT "
            "and that both daemons exit 0 by themselves. No CRIU needed."
        ),
    )
    parser.add_argument(
        "--images", metavar="DIR",
        help="send the files of this image directory (default: generate a synthetic set)",
    )
    parser.add_argument(
        "--size", type=float, default=64, metavar="MIB",
        help="size of the synthetic pages-1.img in MiB (default: 64)",
    )
    parser.add_argument(
        "--snapshot-id", default="snap1",
        help="the -D string criu would be given (default: snap1)",
    )
    parser.add_argument(
        "--protocol", choices=("remote", "stream"), default="remote",
        help="criu's side: remote (criu-dev --remote: img-proxy.sock / "
        "img-cache.sock, one connection per image) or stream (released "
        "criu --stream: streamer-capture.sock / streamer-serve.sock); "
        "default: remote",
    )
    parser.add_argument(
        "--variant", choices=(PIPE, SEED), default=PIPE,
        help="--remote only: pipe (criu-dev 2020, image bytes through "
        "SCM_RIGHTS pipes) or seed (2015, bytes on the socket); default: pipe",
    )
    parser.add_argument(
        "--memory-limit", metavar="SIZE",
        help="passed to both daemons: image bytes held in memory before "
        "spilling to disk, e.g. 16M (default: the daemons' default)",
    )
    parser.add_argument(
        "--timeout", type=float, default=120, metavar="SECONDS",
        help="give up if the whole run takes longer (default: 120)",
    )
    parser.add_argument(
        "--keep", action="store_true",
        help="keep the work directory (daemon logs, synthetic images)",
    )
    args = parser.parse_args(argv)
    if args.size < 0:
        parser.error("--size must not be negative")
    if args.images is not None and not os.path.isdir(args.images):
        parser.error(f"--images: {args.images} is not a directory")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        wire.checkName(args.snapshot_id)
    except Exception as e:
        parser.error(f"--snapshot-id: {e}")
    return args


class _Timeout(BaseException):
    pass


def _alarm(signum: int, frame: FrameType | None) -> NoReturn:
    raise _Timeout()


def _terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt()


def run(args: argparse.Namespace, workDir: str) -> None:
    started = time.monotonic()
    src = os.path.join(workDir, "src")
    dst = os.path.join(workDir, "dst")
    os.mkdir(src)
    os.mkdir(dst)
    say(f"twisted-criu {__version__} loopback migration demo (no CRIU needed)")
    say(f"  work dir  {workDir}")

    if args.images is None:
        imagesDir = os.path.join(workDir, "images")
        os.mkdir(imagesDir)
        generateImages(imagesDir, args.size)
        images = collectImages(imagesDir, synthetic=True)
        origin = "synthetic (criu's names, random bytes)"
    else:
        imagesDir = os.path.abspath(args.images)
        images = collectImages(imagesDir, synthetic=False)
        origin = "from --images"
    total = sum(i.size for i in images)
    say(f"  images    {len(images)} files, {human(total)}, {origin}: {imagesDir}")

    port = freePort()
    extra = [] if args.memory_limit is None else ["--memory-limit", args.memory_limit]
    # The demo's own link key, so that it leaves nothing in /etc.
    extra += ["--link-key", os.path.join(workDir, "link.key")]
    sockets = StreamCriu if args.protocol == "stream" else RemoteCriu
    cache = Daemon("criu-cache", workDir, dst, sockets.cacheSocket)
    proxy = Daemon("criu-proxy", workDir, src, sockets.proxySocket)
    daemons = [cache, proxy]
    try:
        # The cache first: a proxy that finds no cache retries with backoff.
        for attempt in range(3):
            cache.start(["--once", "--port", str(port), "-D", dst, *extra], cwd=workDir)
            try:
                waitForSockets([cache], timeout=min(30.0, args.timeout))
                break
            except DaemonError:
                # Someone else may have taken the free port in the meantime.
                if attempt == 2 or "Address already in use" not in tail(cache.logPath):
                    raise
                cache.stop()
                port = freePort()
        say(f"  link      criu-proxy -> 127.0.0.1:{port} -> criu-cache (TLS 1.3, link key {workDir}/link.key)")
        say(f"  started   {cache.tapname:<10} pid {cache.pid:<7} {cache.socketPath}")
        proxy.start(
            ["--once", "--port", str(port), "--address", "127.0.0.1", "-D", src, *extra],
            cwd=workDir,
        )
        waitForSockets([proxy], timeout=min(30.0, args.timeout))
        say(f"  started   {proxy.tapname:<10} pid {proxy.pid:<7} {proxy.socketPath}")
        say()

        width = max(len(i.name) for i in images + [Image(MISSING_IMAGE, "", 0, "")])
        width = max(width, len(wire.PARENT_IMAGE))
        criu: Criu
        if args.protocol == "stream":
            criu = StreamCriu(proxy.socketPath, cache.socketPath, args.timeout)
        else:
            criu = RemoteCriu(
                proxy.socketPath, cache.socketPath, args.variant, args.snapshot_id, args.timeout
            )
        migrationStart = time.monotonic()
        try:
            dump(criu, images, width)
            say()
            restore(criu, images, width)
        except OSError as e:
            for daemon in daemons:
                code = daemon.exitCode()
                if code is not None:
                    raise daemon.failure(f"died (exit code {code}): {e}") from None
            raise DemoError(f"talking to the daemons failed: {e}") from None
        migration = time.monotonic() - migrationStart
        say()
        say("daemons (started with --once):")
        waitForExit(daemons, timeout=30)
    except _Timeout:
        parts = [f"the demo did not finish within {args.timeout:g} s (--timeout)"]
        for daemon in daemons:
            if daemon.process is not None:
                parts.append(str(daemon.failure(f"(pid {daemon.pid}) log:")))
        raise DemoError("\n".join(parts)) from None
    finally:
        for daemon in daemons:
            daemon.stop()

    say()
    say(
        f"OK: {len(images)} images ({total:,} bytes) went criu dump --{args.protocol} -> "
        f"criu-proxy -> TLS -> criu-cache -> criu restore --{args.protocol} intact "
        f"in {migration:.2f} s ({rate(total, migration)}); "
        f"whole demo {time.monotonic() - started:.1f} s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parseArguments(argv)
    workDir = tempfile.mkdtemp(prefix="twisted-criu-demo-")
    previous = signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, args.timeout)
    try:
        run(args, workDir)
        return 0
    except (DemoError, DaemonError) as e:
        say()
        say(f"FAILED: {e}")
        return 1
    except _Timeout:
        say()
        say(f"FAILED: the demo did not finish within {args.timeout:g} s (--timeout)")
        return 1
    except KeyboardInterrupt:
        say()
        say("interrupted")
        return 130
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            say(f"(kept {workDir})")
        else:
            shutil.rmtree(workDir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
