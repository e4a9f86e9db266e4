"""
What an operator sees when the daemons spill past C{--memory-limit}:

    python docs/examples/spilling.py OUTPUT_DIR

Starts a real C{twistd criu-cache} and C{twistd criu-proxy} on loopback,
both with C{--memory-limit 1M}, dumps three images (8 MiB in all) through
the proxy as C{criu dump --stream} does, and, while the cache holds them,
reads its control API (what C{twisted-criu ls} shows) and its metrics; then
restores them as C{criu restore --stream} does, which makes both daemons
drop them.  Writes to OUTPUT_DIR:

- C{log.txt}: the lines both daemons logged about spilling;
- C{sessions.json}: the cache's C{GET /sessions} answer, with the images in it;
- C{metrics.txt}: the cache's memory and spill gauges.

Paths under the scratch directory are shown as C{DIR}.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from twisted_criu.testing.criu import StreamClient  # noqa: E402
from twisted_criu.testing.processes import Daemon, freePort, waitForSockets  # noqa: E402

IMAGES = {"pages-1.img": 6 << 20, "pages-2.img": 2 << 20, "core-1.img": 4096}
TIMEOUT = 60.0


def control(path: str, request: str) -> dict[str, object]:
    """The JSON answer of a daemon's control API (a UNIX socket) to C{GET request}."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        s.sendall(f"GET {request} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    answer = answer.split(b"\r\n\r\n", 1)[1]
    value: dict[str, object] = json.loads(answer)
    return value


def waitFor(condition: object, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def spillLines(path: str, scratch: str) -> list[str]:
    """The lines of a twistd log about spilling, without their timestamps."""
    with open(path) as f:
        return [
            line.split(" ", 1)[1].rstrip("\n").replace(scratch, "DIR")
            for line in f
            if "[twisted_criu.storage.spill" in line
        ]


def run(scratch: str, output: str) -> None:
    src, dst, spill = (os.path.join(scratch, name) for name in ("src", "dst", "spill"))
    for directory in (src, dst, spill):
        os.mkdir(directory)
    port, metricsPort = freePort(), freePort()
    common = ["--memory-limit", "1M", "--spill-dir", spill, "--link-key", os.path.join(scratch, "link.key")]
    cache = Daemon("criu-cache", scratch, dst, "streamer-serve.sock")
    proxy = Daemon("criu-proxy", scratch, src, "streamer-capture.sock")
    cache.start(
        ["-D", dst, "--port", str(port), "--metrics", f"tcp:{metricsPort}:interface=127.0.0.1", *common],
        cwd=scratch,
    )
    try:
        waitForSockets([cache], TIMEOUT)
        proxy.start(["-D", src, "--port", str(port), "--address", "127.0.0.1", *common], cwd=scratch)
        waitForSockets([proxy], TIMEOUT)
        dump = StreamClient(proxy.socketPath, timeout=TIMEOUT)
        for name, size in IMAGES.items():
            dump.write(name, os.urandom(size))
        dump.close()

        cacheControl = os.path.join(dst, "cache-control.sock")
        total = sum(IMAGES.values())

        def held() -> bool:
            sessions = control(cacheControl, "/sessions")["sessions"]
            return any(s["bytes"] == total for s in sessions)  # type: ignore[index, union-attr]

        waitFor(held, "the cache to hold every image")
        listing = control(cacheControl, "/sessions")
        session = control(cacheControl, f"/sessions/{listing['sessions'][0]['id']}")  # type: ignore[index]
        listing["sessions"] = [session]
        with open(os.path.join(output, "sessions.json"), "w") as f:
            f.write(json.dumps(listing, indent=1).replace(scratch, "DIR") + "\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/metrics", timeout=TIMEOUT) as r:
            metrics = r.read().decode()
        wanted = re.compile(r"^twisted_criu_(memory|spill|memory_limit)_bytes ", re.M)
        with open(os.path.join(output, "metrics.txt"), "w") as f:
            f.write("\n".join(line for line in metrics.splitlines() if wanted.match(line)) + "\n")

        restore = StreamClient(cache.socketPath, timeout=TIMEOUT)
        for name in IMAGES:
            reader = restore.openRead(name)
            assert reader is not None, name
            with reader:
                while reader.read(1 << 20):
                    pass
        restore.close()
        waitFor(lambda: any("stopped spilling" in line for line in spillLines(cache.logPath, scratch)),
                "the cache to drop the images")
        waitFor(lambda: any("stopped spilling" in line for line in spillLines(proxy.logPath, scratch)),
                "the proxy to drop the images")
    finally:
        proxy.stop()
        cache.stop()
    with open(os.path.join(output, "log.txt"), "w") as f:
        for daemon in (proxy, cache):
            f.write(f"# {daemon.tapname}\n")
            f.write("\n".join(spillLines(daemon.logPath, scratch)) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/examples/spilling.py OUTPUT_DIR")
    with tempfile.TemporaryDirectory(prefix="twisted-criu-example-") as scratch:
        run(scratch, os.path.abspath(sys.argv[1]))
