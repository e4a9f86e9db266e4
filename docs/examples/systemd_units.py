"""
The outputs docs/systemd.md shows, from a real run:

    python docs/examples/systemd_units.py OUTPUT_DIR

(from the root of a checkout, with the interpreter twisted-criu is
installed in, e.g. .venv/bin/python).  Writes into OUTPUT_DIR:

  - C{escape.txt}: the instance name of /var/lib/criu/migration;
  - C{verify.txt}: C{systemd-analyze verify} on every unit of systemd/;
  - C{security.txt}: what C{systemd-analyze security} finds not hardened
    in the cache's unit, and its verdict;
  - C{activation.txt}: a manual check of socket activation without
    systemd: C{systemd-socket-activate} holds a cache's sockets as its
    socket unit lists them, a proxy (started by hand) connects, the cache
    starts and receives and serves one image; what both said, and the
    socket files left after the cache stopped.

Needs Debian's systemd package (C{admin/get-systemd-tools} installs it
when it is missing).  Uses a link key of its own, loopback and a
temporary directory; nothing under /etc.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

from twisted_criu.testing.criu import StreamClient
from twisted_criu.testing.processes import freePort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNITS = os.path.join(ROOT, "systemd")
BIN = os.path.dirname(os.path.abspath(sys.executable))
INSTANCE_PATH = "/var/lib/criu/migration"
STEP = 30.0


def run(argv: list[str], lines: list[str], cwd: str = ROOT) -> str:
    """Run C{argv}, record it and what it printed in C{lines}; fail unless it exits 0."""
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {done.returncode}:\n{output}")
    lines.append("$ " + shlex.join(argv))
    lines.extend(output.rstrip("\n").splitlines())
    return output


def write(directory: str, name: str, lines: list[str]) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write("\n".join(lines) + "\n")


def escaped() -> tuple[str, list[str]]:
    lines: list[str] = []
    instance = run(["systemd-escape", "--path", INSTANCE_PATH], lines).strip()
    return instance, lines


def verified(instance: str) -> list[str]:
    lines: list[str] = []
    for name in sorted(os.listdir(UNITS)):
        stem, suffix = name.rsplit(".", 1)
        output = run(["systemd-analyze", "verify", f"systemd/{stem}{instance}.{suffix}"], lines)
        if output.strip():
            raise SystemExit(f"systemd-analyze verify complained about {name}:\n{output}")
    return lines


def security(instance: str) -> list[str]:
    unit = f"systemd/twisted-criu-cache@{instance}.service"
    argv = ["systemd-analyze", "security", "--offline=yes", unit]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    kept = [
        line.rstrip()
        for line in done.stdout.splitlines()
        if line.startswith(("✗", "→"))
    ]
    return ["$ " + shlex.join(argv) + "    # the checks not met, and the verdict", *kept]


def waitFor(condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes], log: str) -> None:
    deadline = time.monotonic() + STEP
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            with open(log) as f:
                raise SystemExit(f"{what} did not happen:\n{f.read()}")
        time.sleep(0.05)


def activation(work: str) -> list[str]:
    """The manual check of docs/systemd.md, run: its transcript."""
    images = os.path.join(work, "migration")
    src = os.path.join(work, "dump-side")
    os.makedirs(images)
    os.makedirs(src)
    key = os.path.join(work, "link.key")
    port = freePort()
    sockets = [f"{images}/img-cache.sock", f"{images}/streamer-serve.sock", f"{images}/cache-control.sock"]
    activate = ["systemd-socket-activate", "--listen", f"127.0.0.1:{port}"]
    for path in sockets:
        activate += ["--listen", path]
    activate += [
        "--fdname=link:remote:stream:control",
        f"--setenv=TWISTED_CRIU_LINK_KEY={key}",
        "twistd", "--nodaemon", "--pidfile=", "criu-cache", "--images-dir", images,
        "--listen", "systemd:domain=INET:index=0",
        "--local", "systemd:domain=UNIX:index=1",
        "--stream-local", "systemd:domain=UNIX:index=2",
        "--control", "systemd:domain=UNIX:index=3",
    ]
    proxyArgv = [
        "twistd", "--nodaemon", "--pidfile=", "criu-proxy", "--images-dir", src,
        "--address", "127.0.0.1", "--port", str(port), "--once",
    ]
    environ = dict(os.environ, TWISTED_CRIU_LINK_KEY=key)
    cacheLog = os.path.join(work, "cache.log")
    proxyLog = os.path.join(work, "proxy.log")
    lines = ["$ " + shlex.join(activate) + " &"]
    proxy: subprocess.Popen[bytes] | None = None
    with open(cacheLog, "w") as log:
        cache = subprocess.Popen(
            [activate[0], *activate[1:activate.index("twistd")], os.path.join(BIN, "twistd"),
             *activate[activate.index("twistd") + 1 :]],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        waitFor(lambda: all(os.path.exists(p) for p in sockets), "systemd-socket-activate listening", cache, cacheLog)
        for path in sockets:
            os.chmod(path, 0o600)  # what the socket unit's SocketMode=0600 does
        # The cache has not started: the first connection, the proxy's, starts it.
        lines += ["$ " + shlex.join(["chmod", "600", *sockets]) + "    # as SocketMode=0600 does"]
        lines += ["$ " + shlex.join(proxyArgv) + " &"]
        with open(proxyLog, "w") as log:
            proxy = subprocess.Popen(
                [os.path.join(BIN, "twistd"), *proxyArgv[1:]], env=environ, cwd=work,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        capture = os.path.join(src, "streamer-capture.sock")
        waitFor(lambda: os.path.exists(capture), "the proxy listening", proxy, proxyLog)
        image = os.urandom(1 << 20)
        dump = StreamClient(capture, timeout=STEP)
        dump.write("pages-1.img", image)
        dump.close()
        restore = StreamClient(sockets[1], timeout=STEP)
        if restore.read("pages-1.img") != image:
            raise SystemExit("the image read back differs from the one written")
        restore.close()
        proxy.wait(STEP)
        cache.send_signal(signal.SIGTERM)
        cache.wait(STEP)
    finally:
        for process in (cache, proxy):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    lines.append("(one image through it: criu dump --stream, then criu restore --stream; then kill -TERM %1)")
    lines.append("(what the cache's side printed, timestamps left out:)")
    wanted = ("Listening on", "Communication attempt", "starting on", "ready:", "received ", "served ", "Closed", "Shut Down")
    with open(cacheLog) as f:
        for line in f:
            if any(w in line for w in wanted):
                lines.append(line.rstrip("\n").split(" ", 1)[1] if line[:4].isdigit() else line.rstrip("\n"))
    run(["ls", "-l", *sockets], lines)
    return lines


def main(output: str) -> None:
    missing = [c for c in ("systemd-analyze", "systemd-escape", "systemd-socket-activate") if not shutil.which(c)]
    if missing:
        subprocess.run([os.path.join(ROOT, "admin", "get-systemd-tools")], check=True)
    os.makedirs(output, exist_ok=True)
    instance, lines = escaped()
    write(output, "escape.txt", lines)
    write(output, "verify.txt", verified(instance))
    write(output, "security.txt", security(instance))
    work = tempfile.mkdtemp(prefix="criu-")
    try:
        write(output, "activation.txt", activation(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUTPUT_DIR")
    main(sys.argv[1])
