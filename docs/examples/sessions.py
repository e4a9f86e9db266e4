"""
A migration through real daemons, recorded for the pages on sessions and
monitoring:

    python docs/examples/sessions.py OUTPUT_DIR

It starts C{twistd criu-cache --keep} and C{twistd criu-proxy} (separate
processes, linked over TLS with a link key of their own, on 127.0.0.1, with
C{--progress-interval 1} and the cache's C{--metrics}), plays C{criu dump
--stream} against the proxy (a few small images and a pages image written
at about 40 MB/s, as criu writes a process's memory) with the real
C{twisted-criu-hook} at C{post-dump}, then C{criu restore --stream}
against the cache with the hook at C{pre-restore} and C{post-resume}, and
checks every byte.  Then it runs C{twisted-criu ls}, C{pull}, C{drop} and
C{push} as an operator would, and reads the cache's metrics.

It writes into OUTPUT_DIR: C{hook.txt} (the hook's lines), C{proxy-log.txt}
and C{cache-log.txt} (what the daemons logged about the images and the
session), C{operator.txt} (the commands and their output), C{metrics.txt}
(the cache's non-zero C{twisted_criu_} series) and C{setup.txt} (what ran).
Everything binds 127.0.0.1 or UNIX sockets in a temporary directory that is
removed at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from _transcript import Transcript, logLines, writeLines

from twisted_criu.testing.criu import StreamClient
from twisted_criu.testing.processes import Daemon, freePort, waitForSockets

MiB = 1 << 20
#: The pages image, and the rate criu is played writing it at.
PAGES_SIZE = 96 * MiB
WRITE_RATE = 40 * 1000 * 1000
SMALL = {"inventory.img": 44, "pstree.img": 26, "core-4247.img": 2544, "mm-4247.img": 1421}

#: What the pages keep of the daemons' logs: images, progress, the session.
PROXY_LINES = ("progress:", "stored", "forwarded", "hook", "criu finished", "dump finished", "session")
CACHE_LINES = ("progress:", "received", "served", "the proxy ended", "restore", "session")


def writeSlowly(client: StreamClient, name: str, data: bytes, rate: int) -> None:
    """Write C{data} as image C{name}, at about C{rate} bytes a second."""
    started = time.monotonic()
    with client.openWrite(name) as writer:
        for offset in range(0, len(data), MiB):
            writer.write(data[offset : offset + MiB])
            ahead = started + (offset + MiB) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


def hook(shell: Transcript, action: str, imagesDir: str) -> None:
    """Run twisted-criu-hook as criu runs it at C{action}."""
    shell.run(
        ["twisted-criu-hook"],
        env={"CRTOOLS_SCRIPT_ACTION": action, "CRTOOLS_IMAGE_DIR": imagesDir},
    )


def stopAll(daemons: list[Daemon]) -> None:
    """SIGTERM every daemon still running, then wait for each (SIGKILL after 5 s)."""
    running = [d.process for d in daemons if d.process is not None and d.process.poll() is None]
    for process in running:
        process.terminate()
    for process in running:
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(output: str) -> None:
    work = tempfile.mkdtemp(prefix="twisted-criu-docs-")
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    os.makedirs(src)
    os.makedirs(dst)
    port, metricsPort = freePort(), freePort()
    # Paths relative to the work directory, where everything runs.
    common = ["--port", str(port), "--link-key", "link.key", "--progress-interval", "1"]
    cache = Daemon("criu-cache", work, dst, "streamer-serve.sock")
    proxy = Daemon("criu-proxy", work, src, "streamer-capture.sock")
    try:
        cache.start(["-D", "dst", "--keep", "--metrics", f"tcp:{metricsPort}:interface=127.0.0.1",
                     *common], cwd=work)
        # The proxy retries until the cache listens: start both at once.
        proxy.start(["-D", "src", "--address", "127.0.0.1", *common], cwd=work)
        waitForSockets([cache, proxy], timeout=30)
        images = {name: os.urandom(size) for name, size in SMALL.items()}
        images["pages-1.img"] = os.urandom(PAGES_SIZE)
        shell = Transcript(work)

        dump = StreamClient(proxy.socketPath, timeout=60)
        for name in ("pstree.img", "core-4247.img", "mm-4247.img"):
            dump.write(name, images[name])
        writeSlowly(dump, "pages-1.img", images["pages-1.img"], WRITE_RATE)
        dump.write("inventory.img", images["inventory.img"])
        hook(shell, "post-dump", "src")
        dump.close()

        restore = StreamClient(cache.socketPath, timeout=60)
        hook(shell, "pre-restore", "dst")
        for name in ("inventory.img", "pstree.img", "core-4247.img", "mm-4247.img", "pages-1.img"):
            if restore.read(name) != images[name]:
                raise SystemExit(f"{name} came back different")
        hook(shell, "post-resume", "dst")
        restore.close()
        shell.write(os.path.join(output, "hook.txt"))

        shell.run(["twisted-criu", "ls", "--from", "dst", "-l"])
        shell.run(["twisted-criu", "pull", "--from", "dst", "restored"])
        shell.run(["twisted-criu", "drop", "--from", "dst", "1"])
        shell.run(["twisted-criu", "push", "restored", "--address", "127.0.0.1",
                   "--port", str(port), "--link-key", "link.key"])
        shell.run(["twisted-criu", "ls", "--from", "dst"])
        shell.write(os.path.join(output, "operator.txt"))

        with urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/metrics", timeout=30) as r:
            metrics = r.read().decode()
        writeLines(os.path.join(output, "metrics.txt"), [
            line for line in metrics.splitlines()
            if line.startswith("twisted_criu_") and not line.endswith(" 0.0")
        ])
    finally:
        stopAll([proxy, cache])
    proxyLines = logLines(proxy.logPath, PROXY_LINES)
    if not any("progress:" in line for line in proxyLines):
        raise SystemExit(f"the proxy logged no progress line: see {proxy.logPath}")
    writeLines(os.path.join(output, "proxy-log.txt"), proxyLines)
    writeLines(os.path.join(output, "cache-log.txt"), logLines(cache.logPath, CACHE_LINES))
    writeLines(os.path.join(output, "setup.txt"), [
        f"twistd criu-cache -D dst --keep --metrics tcp:{metricsPort}:interface=127.0.0.1 "
        + " ".join(common),
        f"twistd criu-proxy -D src --address 127.0.0.1 " + " ".join(common),
        f"criu dump --stream, played: {len(images)} images, pages-1.img"
        f" {PAGES_SIZE // MiB} MiB written at {WRITE_RATE / 1e6:.0f} MB/s",
    ])
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/examples/sessions.py OUTPUT_DIR")
    main(os.path.abspath(sys.argv[1]))
