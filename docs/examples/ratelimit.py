"""
A migration through a proxy started with C{--rate-limit}, recorded for the
page on monitoring:

    python docs/examples/ratelimit.py OUTPUT_DIR

It starts C{twistd criu-cache} and C{twistd criu-proxy --rate-limit 20M}
(separate processes, linked over TLS with a link key of their own, on
127.0.0.1, the proxy with C{--progress-interval 1} and C{--metrics}),
plays C{criu dump --stream} against the proxy (a 96 MiB pages image written
as fast as the proxy takes it), and while the link forwards it runs
C{twisted-criu ls} against the proxy and reads its metrics; then the
real C{twisted-criu-hook} at C{post-dump} waits for the cache, and a
played C{criu restore --stream} checks every byte.

It writes into OUTPUT_DIR: C{proxy-log.txt} (the proxy's start-up line
about the limit, its progress lines and the image forwarded),
C{operator.txt} (C{twisted-criu ls} while the link was busy),
C{metrics.txt} (the proxy's C{twisted_criu_link_} series then) and
C{setup.txt} (what ran).  Everything binds 127.0.0.1 or UNIX sockets in a
temporary directory that is removed at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import urllib.request

from _transcript import Transcript, logLines, writeLines
from sessions import hook, stopAll

from twisted_criu.testing.criu import StreamClient
from twisted_criu.testing.processes import Daemon, freePort, waitForSockets

MiB = 1 << 20
PAGES_SIZE = 96 * MiB
RATE_LIMIT = "20M"

#: What the page keeps of the proxy's log.
PROXY_LINES = ("link rate limited", "progress:", "forwarded pages")


def main(output: str) -> None:
    work = tempfile.mkdtemp(prefix="twisted-criu-docs-")
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    os.makedirs(src)
    os.makedirs(dst)
    port, metricsPort = freePort(), freePort()
    common = ["--port", str(port), "--link-key", "link.key"]
    proxyArgs = ["--rate-limit", RATE_LIMIT, "--progress-interval", "1",
                 "--metrics", f"tcp:{metricsPort}:interface=127.0.0.1"]
    cache = Daemon("criu-cache", work, dst, "streamer-serve.sock")
    proxy = Daemon("criu-proxy", work, src, "streamer-capture.sock")
    try:
        cache.start(["-D", "dst", *common], cwd=work)
        proxy.start(["-D", "src", "--address", "127.0.0.1", *common, *proxyArgs], cwd=work)
        waitForSockets([cache, proxy], timeout=30)
        pages = os.urandom(PAGES_SIZE)
        inventory = os.urandom(44)
        shell = Transcript(work)

        dump = StreamClient(proxy.socketPath, timeout=60)
        dump.write("pages-1.img", pages)
        dump.write("inventory.img", inventory)
        time.sleep(1.0)  # the link is still busy: 96 MiB take about 5 s at 20 MB/s
        shell.run(["twisted-criu", "ls", "--from", "src"])
        with urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/metrics", timeout=30) as r:
            metrics = r.read().decode()
        hook(shell, "post-dump", "src")
        dump.close()
        shell.write(os.path.join(output, "operator.txt"))
        writeLines(os.path.join(output, "metrics.txt"), [
            line for line in metrics.splitlines() if line.startswith("twisted_criu_link_")
        ])

        restore = StreamClient(cache.socketPath, timeout=60)
        if restore.read("inventory.img") != inventory or restore.read("pages-1.img") != pages:
            raise SystemExit("the images came back different")
        restore.close()
    finally:
        stopAll([proxy, cache])
    proxyLines = logLines(proxy.logPath, PROXY_LINES)
    if not any("--rate-limit" in line for line in proxyLines if "progress:" in line):
        raise SystemExit(f"the proxy logged no progress line with its limit: see {proxy.logPath}")
    writeLines(os.path.join(output, "proxy-log.txt"), proxyLines)
    writeLines(os.path.join(output, "setup.txt"), [
        "twistd criu-cache -D dst " + " ".join(common),
        "twistd criu-proxy -D src --address 127.0.0.1 " + " ".join(common + proxyArgs),
        f"criu dump --stream, played: pages-1.img {PAGES_SIZE // MiB} MiB, then inventory.img",
    ])
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/examples/ratelimit.py OUTPUT_DIR")
    main(os.path.abspath(sys.argv[1]))
