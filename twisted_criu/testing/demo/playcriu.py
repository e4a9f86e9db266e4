# -*- test-case-name: tests.slow.test_demo -*-
"""
criu's side of the synthetic demo, played by
L{twisted_criu.testing.criu}: L{RemoteCriu} (C{criu dump|restore
--remote}) or L{StreamCriu} (C{--stream}); L{dump} sends every image to
the proxy, L{restore} reads every image back from the cache and compares
its SHA-256.
"""

from __future__ import annotations

import hashlib
import time
from typing import Sequence, Union

from twisted_criu import wire
from twisted_criu.testing.criu import ImageReader, ImageWriter, LocalImageClient, StreamClient
from twisted_criu.testing.demo.output import DemoError, human, rate, say
from twisted_criu.testing.imageset import CHUNK, Image, restoreOrder

#: What criu restore asks for that usually does not exist.
MISSING_IMAGE = "memfd.img"



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
