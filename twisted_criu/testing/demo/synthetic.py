# -*- test-case-name: tests.slow.test_demo -*-
"""
The synthetic demo (C{--synthetic}, and where criu cannot run): criu is
played by L{twisted_criu.testing.criu} through a real C{twistd criu-proxy}
and C{twistd criu-cache}.  It sends a synthetic image set (or the files of
C{--images DIR}) with C{criu dump --remote} (or C{--stream}) and reads them
back with C{criu restore}, checking that every image comes back byte for
byte (SHA-256), that a missing image gets ENOENT, and that both daemons
exit 0 on their own (C{--once}).
"""

from __future__ import annotations

import argparse
import os
import time

from twisted_criu import __version__, wire
from twisted_criu.testing.demo.daemons import DaemonPair
from twisted_criu.testing.demo.output import DemoError, Timeout, human, rate, say
from twisted_criu.testing.demo.playcriu import MISSING_IMAGE, Criu, RemoteCriu, StreamCriu, dump, restore
from twisted_criu.testing.imageset import Image, dumpOrder, generateImages, sha256File, syntheticNames


def collectImages(directory: str, synthetic: bool) -> list[Image]:
    """The image files to send, in the order criu would write them."""
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


def runSynthetic(args: argparse.Namespace, workDir: str) -> None:
    """The whole synthetic run; raises L{DemoError} on any failure."""
    started = time.monotonic()
    src = os.path.join(workDir, "src")
    dst = os.path.join(workDir, "dst")
    os.mkdir(src)
    os.mkdir(dst)
    say(f"twisted-criu {__version__} loopback migration demo, criu played by twisted_criu.testing.criu")
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

    protocol = args.protocol
    extra = [] if args.memory_limit is None else ["--memory-limit", args.memory_limit]
    sockets = StreamCriu if protocol == "stream" else RemoteCriu
    pair = DaemonPair(workDir, src, dst, sockets.proxySocket, sockets.cacheSocket, extra)
    try:
        pair.start(args.timeout)
        say()
        width = max(len(i.name) for i in images + [Image(MISSING_IMAGE, "", 0, "")])
        width = max(width, len(wire.PARENT_IMAGE))
        criu: Criu
        if protocol == "stream":
            criu = StreamCriu(pair.proxy.socketPath, pair.cache.socketPath, args.timeout)
        else:
            criu = RemoteCriu(
                pair.proxy.socketPath, pair.cache.socketPath, args.variant, args.snapshot_id, args.timeout
            )
        migrationStart = time.monotonic()
        try:
            dump(criu, images, width)
            say()
            restore(criu, images, width)
        except OSError as e:
            pair.checkAlive(e)
            raise DemoError(f"talking to the daemons failed: {e}") from None
        migration = time.monotonic() - migrationStart
        say()
        say("daemons (started with --once):")
        pair.waitForExit(timeout=30)
    except Timeout:
        raise DemoError(
            f"the demo did not finish within {args.timeout:g} s (--timeout)\n{pair.describe()}"
        ) from None
    finally:
        pair.stop()

    say()
    say(
        f"OK: {len(images)} images ({total:,} bytes) went criu dump --{protocol} -> "
        f"criu-proxy -> TLS -> criu-cache -> criu restore --{protocol} intact "
        f"in {migration:.2f} s ({rate(total, migration)}); "
        f"whole demo {time.monotonic() - started:.1f} s"
    )
