"""
Process failures with real C{twistd criu-proxy} and C{twistd criu-cache}
processes on loopback: a daemon or a criu client is killed, the link
stalls, a client never speaks.

In every case: a restore is served only a delivered dump, complete and
byte-exact, and never anything of a dump that was not delivered (a read of
a dump still arriving waits for its delivery; of an aborted dump, or with
nothing delivered, it gets ENOENT); the survivors keep working (a restarted
daemon or a new proxy delivers, and the cache serves it); and the daemons
say in their log files what happened.

The helpers here (L{Daemon}, L{Relay}, L{writeImage}, L{readImage}, ...)
are also used by C{tests.slow.test_load}.  Every wait is bounded, and every
process started here is killed in cleanup.
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import wire
from twisted_criu.testing.criu import LocalImageClient
from twisted_criu.testing.processes import TWISTD, freePort

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]

#: The longest any single step may take (a daemon starting, an image
#: arriving, a log line appearing) before the test fails.
STEP = 30.0

MiB = 1 << 20
SNAP = "snap1"


def shortTempDir(test: SynchronousTestCase) -> str:
    """A fresh directory with a short path (AF_UNIX paths must be < 108 bytes)."""
    base = tempfile.mkdtemp(prefix="tc-")
    test.addCleanup(shutil.rmtree, base, True)
    return base


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def randomBytes(n: int, seed: Any) -> bytes:
    return random.Random(repr(seed)).randbytes(n)


class Daemon:
    """
    One C{twistd -n criu-proxy|criu-cache} process, restartable.  Each start
    logs to its own file (C{KIND-N.log}); L{log} is the current one.
    """

    def __init__(
        self,
        test: SynchronousTestCase,
        kind: str,
        base: str,
        *args: str,
        fileLimit: int | None = None,
        hardLimit: bool = False,
    ) -> None:
        """
        @param fileLimit: start it with this soft limit on open files (C{ulimit -n}).
        @param hardLimit: make C{fileLimit} the hard limit too (C{ulimit -Hn}): the
            daemon cannot raise it.
        """
        assert kind in ("criu-proxy", "criu-cache")
        self.test = test
        self.fileLimit = fileLimit
        self.hardLimit = hardLimit
        self.kind = kind
        self.base = base
        self.directory = os.path.join(base, "src" if kind == "criu-proxy" else "dst")
        os.makedirs(self.directory, exist_ok=True)
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        test.addCleanup(self.stop)

    @property
    def socketPath(self) -> str:
        name = "img-proxy.sock" if self.kind == "criu-proxy" else "img-cache.sock"
        return os.path.join(self.directory, name)

    @property
    def logPath(self) -> str:
        return os.path.join(self.base, f"{self.kind}-{self.starts}.log")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def client(self, timeout: float = STEP) -> LocalImageClient:
        return LocalImageClient(self.socketPath, timeout=timeout)

    def start(self) -> Daemon:
        self.stop()
        self.starts += 1
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", f"--logfile={self.logPath}"]
        argv += [self.kind, "-D", self.directory, "--stream-local", "none", *self.args]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(self.logPath + ".out", "wb") as out:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.base, env=env, preexec_fn=self._limitFiles,
            )
        self.waitForLog(r"LocalImageFactory starting on")
        if self.kind == "criu-cache":
            self.waitForLog(r"RemoteReceiverFactory (\(TLS\) )?starting on")
        return self

    def _limitFiles(self) -> None:
        """In the child: the soft limit on open files, if one was given."""
        if self.fileLimit is not None:
            hard = self.fileLimit if self.hardLimit else resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.fileLimit, hard))

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, and wait (bounded) until it is gone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass

    # -- the log file ----------------------------------------------------------

    def log(self, start: int | None = None) -> str:
        """The log of start number C{start} (default: the current one)."""
        path = os.path.join(self.base, f"{self.kind}-{start or self.starts}.log")
        parts = []
        # twistd rotates its log file at 1 MB: PATH.2, PATH.1, PATH.
        rotated = sorted(glob.glob(path + ".[0-9]*"), key=lambda p: -int(p.rsplit(".", 1)[1]))
        for name in rotated + [path, path + ".out"]:
            try:
                with open(name, encoding="utf-8", errors="replace") as f:
                    parts.append(f.read())
            except FileNotFoundError:
                pass
        return "".join(parts)

    def allLogs(self) -> str:
        return "".join(self.log(n) for n in range(1, self.starts + 1))

    def lines(self, pattern: str, start: int | None = None) -> list[re.Match[str]]:
        return list(re.finditer(pattern, self.log(start)))

    def waitForLog(self, pattern: str, count: int = 1, timeout: float = STEP) -> re.Match[str]:
        """Wait until C{pattern} matches C{count} times in the current log."""
        deadline = time.monotonic() + timeout
        while True:
            matches = self.lines(pattern)
            if len(matches) >= count:
                return matches[count - 1]
            if not self.running():
                self.test.fail(
                    f"{self.kind} exited ({self.process and self.process.returncode}) while"
                    f" waiting for {pattern!r}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                self.test.fail(
                    f"{self.kind} did not log {pattern!r} ({count}x) within {timeout} s:\n{self.log()}"
                )
            time.sleep(0.02)

    # -- file descriptors --------------------------------------------------------

    def fds(self) -> dict[int, str]:
        """What each of the daemon's descriptors is, from C{/proc/PID/fd}."""
        result = {}
        directory = f"/proc/{self.pid}/fd"
        for name in os.listdir(directory):
            try:
                result[int(name)] = os.readlink(os.path.join(directory, name))
            except FileNotFoundError:  # closed while we looked
                pass
        return result


def linkQueues(cachePort: int) -> tuple[int, int]:
    """
    (bytes queued in the proxy's end of the link not yet acknowledged,
    bytes received by the cache's end not yet read by the cache), from
    C{/proc/net/tcp}: how we know a transfer is stuck in the middle.
    """
    sendQueue = receiveQueue = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state != "01":  # ESTABLISHED
                continue
            tx, rx = (int(x, 16) for x in fields[4].split(":"))
            if int(remote.split(":")[1], 16) == cachePort:
                sendQueue += tx
            elif int(local.split(":")[1], 16) == cachePort:
                receiveQueue += rx
    return sendQueue, receiveQueue


def waitUntil(
    test: SynchronousTestCase, condition: Callable[[], bool], what: str, timeout: float = STEP
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            test.fail(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.02)


# -- criu, played with bounded waits ---------------------------------------------


#: How many times a connect found a daemon's accept queue full (EAGAIN).
busyConnects = 0


def retryBusy(connect: Callable[[], T], deadline: float) -> T:
    """
    C{connect()}, again while it fails with EAGAIN.  LocalImageClient with a
    timeout connects in non-blocking mode, and a UNIX socket's connect then
    fails with EAGAIN instead of waiting when the daemon's accept queue
    (Twisted's default backlog, 50) is full, which a burst of concurrent
    criu connections reaches.  criu's own connect blocks and waits.
    """
    global busyConnects
    while True:
        try:
            return connect()
        except BlockingIOError:
            busyConnects += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def connectIdle(path: str, timeout: float = STEP) -> socket.socket:
    """A criu connection that says nothing (waits while the accept queue is full)."""
    deadline = time.monotonic() + timeout

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
        except BaseException:
            s.close()
            raise
        return s

    return retryBusy(connect, deadline)


def writeImage(path: str, name: str, data: bytes, snapshotId: str = SNAP, timeout: float = STEP) -> None:
    """Write one image through the pipe, as criu dump --remote does; bounded."""
    deadline = time.monotonic() + timeout
    client = LocalImageClient(path, timeout=timeout)
    with retryBusy(lambda: client.openWrite(snapshotId, name), deadline) as writer:
        fd = writer.pipe
        assert fd is not None
        os.set_blocking(fd, False)
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"writing {name}: {len(view)} bytes left after {timeout} s")
            select.select([], [fd], [], left)
            try:
                view = view[os.write(fd, view[: 4 * MiB]) :]
            except BlockingIOError:
                pass


def readImage(path: str, name: str, snapshotId: str = SNAP, timeout: float = STEP) -> bytes | None:
    """
    Read one image as criu restore --remote does: its bytes to EOF, or
    L{None} for ENOENT.  Raises L{TimeoutError} past C{timeout}.
    """
    deadline = time.monotonic() + timeout
    client = LocalImageClient(path, timeout=timeout)
    try:
        reader = retryBusy(lambda: client.openRead(snapshotId, name), deadline)
    except socket.timeout:
        raise TimeoutError(f"no reply for {name} within {timeout} s") from None
    if reader is None:
        return None
    with reader:
        fd = reader.pipe
        assert fd is not None
        parts: list[bytes] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"reading {name}: stalled after {sum(map(len, parts))} bytes")
            chunk = os.read(fd, MiB)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)


def pushSnapshotId(path: str, snapshotId: str = SNAP) -> None:
    LocalImageClient(path, timeout=STEP).pushSnapshotId(snapshotId)


class Background(Generic[T]):
    """Run C{f(*args)} in a thread; L{result} joins it (bounded)."""

    def __init__(self, f: Callable[..., T], *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self.started = time.monotonic()
        self.ended: float | None = None
        self._thread = threading.Thread(target=self._run, args=(f, args), daemon=True)
        self._thread.start()

    def _run(self, f: Callable[..., T], args: tuple[Any, ...]) -> None:
        try:
            self._value = f(*args)
        except BaseException as e:
            self._error = e
        self.ended = time.monotonic()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = STEP) -> T:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"still running after {timeout} s")
        if self._error is not None:
            raise self._error
        value: T = self._value
        return value


def assertImages(test: SynchronousTestCase, cacheSocket: str, images: dict[str, bytes]) -> None:
    """Every image reads back complete and byte-exact."""
    for name, data in images.items():
        got = readImage(cacheSocket, name)
        test.assertIsNotNone(got, f"{name}: ENOENT")
        assert got is not None
        test.assertEqual(
            (len(got), sha(got)), (len(data), sha(data)), f"{name} came back different"
        )


class Relay:
    """
    A TCP relay on 127.0.0.1 between the proxy and the cache, in threads.
    L{stallAfter} makes the current connection stop forwarding after a
    number of further bytes, with both of its sockets left open (a
    network that stops delivering); later connections forward normally.
    """

    def __init__(self, test: SynchronousTestCase, targetPort: int) -> None:
        self.targetPort = targetPort
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[dict[str, Any]] = []
        self.stalled = threading.Event()
        self.stalledAt: float | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)
        test.addCleanup(self.close)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def stallAfter(self, n: int) -> None:
        with self._lock:
            conn = self.connections[-1]
            conn["limit"] = conn["forwarded"] + n

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                down, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.targetPort), timeout=5)
            except OSError:
                down.close()
                continue
            conn = {"down": down, "up": up, "forwarded": 0, "limit": None, "stalled": False}
            with self._lock:
                self.connections.append(conn)
            self._spawn(self._forward, conn)
            self._spawn(self._backward, conn)

    def _forward(self, conn: dict[str, Any]) -> None:
        """proxy -> cache: the image bytes."""
        down, up = conn["down"], conn["up"]
        while not self._closing.is_set():
            with self._lock:
                limit = conn["limit"]
                if limit is not None and conn["forwarded"] >= limit:
                    conn["stalled"] = True
            if conn["stalled"]:
                self.stalledAt = time.monotonic()
                self.stalled.set()
                self._closing.wait(120)  # forward nothing, close nothing
                return
            want = 1 << 16 if limit is None else min(1 << 16, limit - conn["forwarded"])
            try:
                if not select.select([down], [], [], 0.1)[0]:
                    continue
                data = down.recv(want)
            except OSError:
                data = b""
            if not data:
                try:
                    up.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                up.sendall(data)
            except OSError:
                down.close()
                return
            with self._lock:
                conn["forwarded"] += len(data)

    def _backward(self, conn: dict[str, Any]) -> None:
        """cache -> proxy: nothing but the close."""
        down, up = conn["down"], conn["up"]
        while not self._closing.is_set():
            try:
                if not select.select([up], [], [], 0.1)[0]:
                    continue
                data = up.recv(1 << 16)
            except OSError:
                data = b""
            if conn["stalled"]:
                return  # a dead network passes nothing, not even a close
            if not data:
                try:
                    down.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            try:
                down.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closing.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(5)
        for conn in self.connections:
            conn["down"].close()
            conn["up"].close()


def errorLines(log: str) -> list[str]:
    return re.findall(r"^.*#(?:error|critical)\].*$", log, re.M)


def arrivedPart(size: int) -> str:
    """How the cache says what part of an image arrived (both ways of forwarding)."""
    return rf"(\d+) (?:of {size} bytes|bytes of a cut-through image) arrived"


class _DaemonTest(SynchronousTestCase):
    #: Extra proxy options: how it forwards (default: cut through).
    FORWARDING: tuple[str, ...] = ()

    def startCache(
        self, base: str, port: int, *args: str, fileLimit: int | None = None, hardLimit: bool = False
    ) -> Daemon:
        return Daemon(
            self, "criu-cache", base, "--address", "127.0.0.1", "--port", str(port), *args,
            fileLimit=fileLimit, hardLimit=hardLimit,
        ).start()

    def startProxy(
        self, base: str, port: int, *args: str, fileLimit: int | None = None, hardLimit: bool = False
    ) -> Daemon:
        return Daemon(
            self, "criu-proxy", base, "--address", "127.0.0.1", "--port", str(port), *self.FORWARDING, *args,
            fileLimit=fileLimit, hardLimit=hardLimit,
        ).start()

    def startPair(
        self, cacheArgs: tuple[str, ...] = (), proxyArgs: tuple[str, ...] = (), fileLimit: int | None = None
    ) -> tuple[Daemon, Daemon, int]:
        base = shortTempDir(self)
        port = freePort()
        cache = self.startCache(base, port, *cacheArgs, fileLimit=fileLimit)
        proxy = self.startProxy(base, port, *proxyArgs, fileLimit=fileLimit)
        proxy.waitForLog(r"ProxySession#info\] connected to the cache")
        cache.waitForLog(r"proxy connected from")
        return proxy, cache, port

    def finishDump(self, proxy: Daemon, cache: Daemon, sessionId: int = 1, images: int | None = None) -> None:
        """criu finishes its dump: wait until the cache has session C{sessionId} delivered."""
        LocalImageClient(proxy.socketPath, timeout=STEP).finishDump()
        count = r"\d+" if images is None else str(images)
        cache.waitForLog(
            rf"session {sessionId} delivered \(the proxy ended its dump\): {count} images, \d+ bytes"
        )

    def finishRestore(self, cache: Daemon, sessionId: int = 1, images: int | None = None) -> None:
        """criu finishes its restore: the cache confirms session C{sessionId} restored."""
        LocalImageClient(cache.socketPath, timeout=STEP).finishRestore()
        count = r"\d+" if images is None else str(images)
        cache.waitForLog(
            rf"session complete: {count} images, \d+ bytes \(session {sessionId} restored: criu's finish\)"
        )

    def dumpSmall(self, proxy: Daemon, cache: Daemon, count: int = 3) -> dict[str, bytes]:
        """C{parent} and a few small images, until the cache has them all."""
        pushSnapshotId(proxy.socketPath)
        proxy.waitForLog(r"the cache speaks twisted-criu's link extension \(version 4\)")
        images = {f"core-{i}.img": randomBytes(1000 * (i + 1) + 7, ("small", i)) for i in range(count)}
        for name, data in images.items():
            writeImage(proxy.socketPath, name, data)
        for name, data in images.items():
            cache.waitForLog(rf"received {SNAP}/{re.escape(name)} \({len(data)} bytes\)")
        # Under 1 MiB, an image goes whole once complete, cut-through or not
        # (twisted_criu.link.livewrites): the big ones show the difference.
        cutThrough = re.findall(r"forwarded (\S+) \(\d+ bytes, cut through\)", proxy.log())
        self.assertEqual(cutThrough, [], proxy.log())
        return images


class ProxyKilledTests(_DaemonTest):
    """(a) The proxy is SIGKILLed in the middle of forwarding a 200 MiB image."""

    def test_proxyKilledMidTransfer(self) -> None:
        proxy, cache, port = self.startPair(cacheArgs=("--timeout", "2"))
        small = self.dumpSmall(proxy, cache)
        size = 200 * MiB
        big = randomBytes(size, "big")

        # A restore is already waiting for the big image: session 1 is still
        # dumping, so the read waits for its delivery.
        waiting = Background(readImage, cache.socketPath, "pages-1.img")
        cache.waitForLog(r"a restore waits for session 1, whose dump is still arriving")

        # Freeze the cache so the proxy gets stuck inside the image, then
        # kill the proxy there.
        cache.signal(signal.SIGSTOP)
        try:
            writeImage(proxy.socketPath, "pages-1.img", big)
            proxy.waitForLog(rf"stored {SNAP}/pages-1.img \({size} bytes\)")
            waitUntil(
                self,
                lambda: linkQueues(port)[1] > 64 << 10,
                "the proxy has pushed part of pages-1.img into the link",
            )
            proxy.kill()
            killed = time.monotonic()
        finally:
            cache.signal(signal.SIGCONT)

        lost = cache.waitForLog(
            rf"link lost in the middle of {SNAP}/pages-1.img: {arrivedPart(size)}; kept for its proxy to resume"
        )
        arrived = int(lost.group(1))
        self.assertTrue(0 < arrived < size, arrived)
        cache.waitForLog(
            r"link to the proxy lost; waiting 2.0 s for it to come back"
            r" \(session 1 is in the middle of its dump\)"
        )

        # The proxy does not come back within --timeout: the dump was never
        # delivered, so session 1 is aborted and the waiting read gets
        # ENOENT, never the bytes that arrived.  (Not before --timeout; at
        # the abort, or, as the abort falls within the first restoreGrace
        # = 5 s after the cache started, up to 5 s after it.)
        self.assertIsNone(waiting.result(), "an image of an undelivered dump was served")
        assert waiting.ended is not None
        waited = waiting.ended - killed
        self.assertTrue(1.9 <= waited <= 2 + 5 + 3, f"ENOENT {waited:.2f} s after the kill")
        cache.waitForLog(
            r"session 1 aborted: its proxy did not come back within 2 s and its dump was"
            r" never delivered; it will never be restored"
        )
        cache.waitForLog(
            rf"discarded the {arrived} bytes kept of {SNAP}/pages-1.img \(session 1\): the session is aborted"
        )

        # Nothing of the aborted dump is ever served, not even the images
        # that were complete before the kill.
        self.assertTrue(cache.running())
        for name in [*small, "pages-1.img"]:
            self.assertIsNone(readImage(cache.socketPath, name), f"{name} of the aborted dump was served")
        self.assertEqual(LocalImageClient(cache.socketPath, timeout=STEP).snapshotIds(), [])
        self.assertEqual(
            [m.group(0) for m in cache.lines(r"served \S+ \(\d+ bytes\).*")], [],
            "the cache served an image of the aborted dump",
        )

        # A new proxy (same port) can deliver a new dump, which is served
        # (its own images, nothing of session 1's).
        again = self.startProxy(shortTempDir(self), port)
        again.waitForLog(r"connected to the cache")
        redo = {name: randomBytes(len(data), ("redo", name)) for name, data in small.items()}
        redo["pages-1.img"] = randomBytes(8 * MiB, "redo")
        pushSnapshotId(again.socketPath)
        for name, data in redo.items():
            writeImage(again.socketPath, name, data)
        self.finishDump(again, cache, sessionId=2, images=len(redo) + 1)
        assertImages(self, cache.socketPath, redo)
        self.assertEqual(LocalImageClient(cache.socketPath, timeout=STEP).snapshotIds(), [SNAP])
        self.finishRestore(cache, sessionId=2, images=len(redo) + 1)
        again.waitForLog(r"session 1 is over; its images are dropped")
        self.assertEqual(errorLines(again.log()), [])


class CacheKilledTests(_DaemonTest):
    """(b) The cache is SIGKILLed and restarted on the same port."""

    PROXY_ARGS = ("--max-retry-delay", "1")

    def restartAndCheck(
        self,
        proxy: Daemon,
        cache: Daemon,
        images: dict[str, bytes],
        downFor: float = 2.5,
        delivered: bool = False,
    ) -> None:
        """
        Leave the cache down a while, restart it, check the resend and the
        restore.  C{delivered}: the cache was killed after the dump was
        delivered (else in the middle of it).
        """
        proxy.waitForLog(r"cannot reach the cache at tcp:host=127.0.0.1:port=\d+( \(link key\))?: .*refused.*; will retry", count=2)
        time.sleep(max(0.0, downFor - 2))
        cache.start()  # same port, same directory
        proxy.waitForLog(r"ProxySession#info\] connected to the cache", count=2)
        cache.waitForLog(r"proxy connected from")

        # Backoff: attempts count up, each delay as --max-retry-delay 1 allows.
        retries = re.findall(r"Scheduling retry (\d+) to connect .* in ([\d.]+) seconds", proxy.log())
        self.assertGreaterEqual(len(retries), 2, proxy.log())
        self.assertEqual([int(n) for n, _ in retries], list(range(1, len(retries) + 1)))
        for _, delay in retries:
            self.assertTrue(1.0 <= float(delay) < 2.0, retries)

        # Everything the proxy holds is sent again, once.
        for name, data in images.items():
            cache.waitForLog(rf"received {re.escape(name)} \({len(data)} bytes\)")
        served = {k.split("/", 1)[1]: v for k, v in images.items() if "/" in k}
        if delivered:
            # The proxy still holds the delivered dump: it ends the resent
            # dump with its marker, and the new cache has it delivered again.
            count = len(images)
            self.assertEqual(len(cache.lines(r"session \d+ started")), 1, cache.log())
            cache.waitForLog(
                rf"session 1 delivered \(the proxy ended its dump\): {count} images, \d+ bytes"
            )
        else:
            # The dump is not finished: the restarted cache serves none of
            # it yet (a read waits for the delivery).
            early = Background(readImage, cache.socketPath, next(iter(served)))
            time.sleep(0.5)
            self.assertFalse(early.done, "the cache served an image of a dump still arriving")
            writeLater = randomBytes(5000, "late")
            writeImage(proxy.socketPath, "late.img", writeLater)
            served["late.img"] = writeLater
            count = len(images) + 1
            self.finishDump(proxy, cache, images=count)
            proxy.waitForLog(r"session complete: forwarded")
            self.assertEqual(early.result(), served[next(iter(served))])
        self.assertFalse(cache.lines(r"session \d+ aborted"), cache.log())
        assertImages(self, cache.socketPath, served)
        self.assertEqual(LocalImageClient(cache.socketPath, timeout=STEP).snapshotIds(), [SNAP])
        self.finishRestore(cache, images=count)
        # The cache told the proxy (SESSION_DONE): it drops its copy.
        proxy.waitForLog(r"session 1 is over; its images are dropped")
        self.assertEqual(errorLines(cache.log()), [])

    def test_cacheKilledAfterDelivery(self) -> None:
        """The cache dies after the dump was delivered, before any restore."""
        proxy, cache, port = self.startPair(proxyArgs=self.PROXY_ARGS)
        small = self.dumpSmall(proxy, cache)
        self.finishDump(proxy, cache, images=len(small) + 1)
        proxy.waitForLog(r"session complete: forwarded")
        cache.kill()
        images = {f"{SNAP}/{k}": v for k, v in small.items()}
        images["parent"] = wire.encodeSnapshotId(SNAP)
        self.restartAndCheck(proxy, cache, images, delivered=True)

    def test_cacheKilledMidForward(self) -> None:
        proxy, cache, port = self.startPair(proxyArgs=self.PROXY_ARGS)
        small = self.dumpSmall(proxy, cache)
        big = randomBytes(32 * MiB, "big")
        writeImage(proxy.socketPath, "pages-1.img", big)
        cache.waitForLog(rf"received {SNAP}/pages-1.img \({len(big)} bytes\)")
        # A large image is cut through (the link takes it while criu
        # writes it) unless the proxy forwards only complete images.
        forwarded = re.search(rf"forwarded {SNAP}/pages-1\.img \(\d+ bytes(, cut through)?\)", proxy.log())
        self.assertIsNotNone(forwarded, proxy.log())
        assert forwarded is not None
        self.assertEqual(bool(forwarded.group(1)), not self.FORWARDING, forwarded.group(0))

        # The cache dies while pages-2.img is on its way.
        huge = randomBytes(64 * MiB, "huge")
        cache.signal(signal.SIGSTOP)
        writeImage(proxy.socketPath, "pages-2.img", huge)
        waitUntil(self, lambda: linkQueues(port)[1] > 64 << 10, "pages-2.img is in the link")
        cache.kill()
        proxy.waitForLog(rf"link lost while forwarding {SNAP}/pages-2.img(?: \(cut through\))?: ")

        images = {f"{SNAP}/{k}": v for k, v in small.items()}
        images[f"{SNAP}/pages-1.img"] = big
        images[f"{SNAP}/pages-2.img"] = huge
        images["parent"] = wire.encodeSnapshotId(SNAP)
        self.restartAndCheck(proxy, cache, images)

    def test_cacheKilledWhileIdle(self) -> None:
        """
        The link is idle when the cache dies: the proxy must still say so
        (a warning from twisted_criu), not only Twisted's "Scheduling retry".
        """
        proxy, cache, port = self.startPair(proxyArgs=self.PROXY_ARGS)
        small = self.dumpSmall(proxy, cache)
        cache.kill()
        proxy.waitForLog(r"Scheduling retry 1 ")
        images = {f"{SNAP}/{k}": v for k, v in small.items()}
        images["parent"] = wire.encodeSnapshotId(SNAP)
        self.restartAndCheck(proxy, cache, images)
        lostLines = re.findall(
            r"^.*\[twisted_criu\.[\w.]+#(?:warn|error)\].*(?:lost|closed|dropped|down).*$",
            proxy.log(), re.M,
        )
        self.assertTrue(lostLines, f"the proxy did not log the lost link:\n{proxy.log()}")


class NetworkStallTests(_DaemonTest):
    """
    (c) A relay between proxy and cache stops forwarding in the middle of
    an image, sockets left open.  With --timeout 2 both ends drop the link;
    the proxy reconnects through the relay (forwarding again) and resends.
    """

    TIMEOUT = 2.0

    def startStalled(self) -> tuple[Daemon, Daemon, Relay, dict[str, bytes]]:
        base = shortTempDir(self)
        port = freePort()
        cache = self.startCache(base, port, "--timeout", str(self.TIMEOUT))
        relay = Relay(self, port)
        proxy = self.startProxy(
            base, relay.port, "--timeout", str(self.TIMEOUT), "--max-retry-delay", "0.2"
        )
        proxy.waitForLog(r"connected to the cache")
        cache.waitForLog(r"proxy connected from")
        small = self.dumpSmall(proxy, cache)
        return proxy, cache, relay, small

    def stallInside(self, proxy: Daemon, relay: Relay, name: str, data: bytes) -> None:
        relay.stallAfter(8 * MiB)
        writeImage(proxy.socketPath, name, data)
        self.assertTrue(relay.stalled.wait(STEP), "the relay never stalled")

    def assertBothDropped(self, proxy: Daemon, cache: Daemon, name: str, size: int) -> dict[str, float]:
        """Both ends log the stall; returns when each noticed, after the stall."""
        assert NetworkStallTests.TIMEOUT == 2.0
        seen = {}
        cache.waitForLog(
            r"link stalled: no bytes from the proxy for 2.0 s in the middle of a frame; dropping it"
        )
        seen["cache"] = time.monotonic()
        lost = cache.waitForLog(
            rf"link lost in the middle of {SNAP}/{name}: {arrivedPart(size)}; kept for its proxy to resume"
        )
        self.assertTrue(0 < int(lost.group(1)) <= 8 * MiB, lost.group(0))
        proxy.waitForLog(
            rf"link stalled: no progress forwarding {SNAP}/{name} for 2.0 s"
            rf" \((\d+) of (?:{size}|its) bytes sent\); dropping it"
        )
        seen["proxy"] = time.monotonic()
        return seen

    def assertNotAborted(self, cache: Daemon) -> None:
        """The proxy came back within the cache's --timeout: its session lives on."""
        self.assertEqual([m.group(0) for m in cache.lines(r"session \d+ aborted.*")], [])

    def test_stallBothEndsDropAndRecover(self) -> None:
        proxy, cache, relay, small = self.startStalled()
        big = randomBytes(64 * MiB, "big")
        self.stallInside(proxy, relay, "pages-1.img", big)
        self.assertBothDropped(proxy, cache, "pages-1.img", len(big))

        # The proxy comes back through the relay and sends everything again,
        # within the cache's --timeout: the session's dump goes on.
        proxy.waitForLog(r"connected to the cache", count=2)
        cache.waitForLog(rf"received {SNAP}/pages-1.img \({len(big)} bytes\)")
        # Only the rest of the image: from where the cache's kept part ends.
        resumed = proxy.waitForLog(rf"resuming {SNAP}/pages-1.img at byte (\d+): the cache kept that much")
        self.assertEqual(resumed.group(1), cache.waitForLog(rf"resuming {SNAP}/pages-1.img \(session 1\) at byte (\d+)").group(1))
        self.assertEqual(len(relay.connections), 2)
        self.assertEqual(len(cache.lines(r"session \d+ started")), 1, cache.log())

        # criu finishes its dump: the cache has it delivered, and serves it whole.
        images = {**small, "pages-1.img": big}
        self.finishDump(proxy, cache, images=len(images) + 1)
        assertImages(self, cache.socketPath, images)
        self.finishRestore(cache, images=len(images) + 1)
        self.assertNotAborted(cache)

    def test_stallWaitingRestoreGetsTheImage(self) -> None:
        """
        A restore already waiting for the image when the link stalls: both
        ends drop the link after --timeout, the proxy comes back well within
        the cache's --timeout, and once the dump is delivered the restore
        gets the complete image.
        """
        proxy, cache, relay, small = self.startStalled()
        big = randomBytes(64 * MiB, "big")
        waiting = Background(readImage, cache.socketPath, "pages-1.img")
        cache.waitForLog(r"a restore waits for session 1, whose dump is still arriving")
        self.stallInside(proxy, relay, "pages-1.img", big)
        # criu finishes its dump while the link is stalled.
        LocalImageClient(proxy.socketPath, timeout=STEP).finishDump()
        seen = self.assertBothDropped(proxy, cache, "pages-1.img", len(big))
        assert relay.stalledAt is not None
        proxyAfter = seen["proxy"] - relay.stalledAt
        cacheAfter = seen["cache"] - relay.stalledAt
        got = waiting.result()
        gaveUp = cache.lines(r"session \d+ aborted.*")
        timing = (
            f"after the stall the cache dropped the link at {cacheAfter:.2f} s, the proxy at"
            f" {proxyAfter:.2f} s; cache gave up: {[m.group(0) for m in gaveUp]}"
        )
        self.assertIsNotNone(got, f"the waiting restore got ENOENT; {timing}")
        assert got is not None
        self.assertEqual((len(got), sha(got)), (len(big), sha(big)), timing)
        self.assertLessEqual(proxyAfter, self.TIMEOUT + 1.0, f"the proxy dropped late; {timing}")
        # It was served once the resent dump was delivered, not before.
        delivered = cache.waitForLog(
            r"session 1 delivered \(the proxy ended its dump\): 5 images, \d+ bytes"
        )
        self.assertLess(delivered.start(), cache.waitForLog(rf"served {SNAP}/pages-1.img ").start())
        assertImages(self, cache.socketPath, small)
        self.finishRestore(cache, images=len(small) + 2)
        self.assertNotAborted(cache)


READER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from twisted_criu.testing.criu import LocalImageClient
reader = LocalImageClient(sys.argv[2], timeout=30).openRead("snap1", "pages-1.img")
got = 0
while got < (1 << 20):
    chunk = reader.read((1 << 20) - got)
    if not chunk:
        break
    got += len(chunk)
print(got, flush=True)
time.sleep(60)
"""


class RestoreKilledTests(_DaemonTest):
    """(d) A restore process is SIGKILLed in the middle of reading an image."""

    def test_readerKilledMidRead(self) -> None:
        proxy, cache, port = self.startPair()
        small = self.dumpSmall(proxy, cache)
        big = randomBytes(64 * MiB, "big")
        writeImage(proxy.socketPath, "pages-1.img", big)
        cache.waitForLog(rf"received {SNAP}/pages-1.img \({len(big)} bytes\)")
        self.finishDump(proxy, cache, images=len(small) + 2)
        fdsBefore = len(cache.fds())

        reader = subprocess.Popen(
            [sys.executable, "-c", READER, str(REPO), cache.socketPath],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )

        def stopReader() -> None:
            if reader.poll() is None:
                reader.kill()
            reader.wait(10)

        self.addCleanup(stopReader)
        assert reader.stdout is not None
        ready = select.select([reader.stdout], [], [], STEP)[0]
        self.assertTrue(ready, "the reader never read its first MiB")
        self.assertEqual(int(reader.stdout.readline()), MiB)
        reader.kill()
        reader.wait(10)

        cache.waitForLog(rf"reader of {SNAP}/pages-1.img went away: ")
        self.assertFalse(cache.lines(rf"served {SNAP}/pages-1.img"))

        # The cache keeps serving: the image whole to the next reader, the others too.
        others = [Background(readImage, cache.socketPath, "pages-1.img") for _ in range(2)]
        assertImages(self, cache.socketPath, small)
        for other in others:
            got = other.result()
            assert got is not None
            self.assertEqual((len(got), sha(got)), (len(big), sha(big)))
        cache.waitForLog(rf"served {SNAP}/pages-1.img \({len(big)} bytes\)", count=2)
        waitUntil(self, lambda: len(cache.fds()) == fdsBefore, "the cache closed the dead reader's pipe")
        # The restore that read on is the same restore of session 1: criu's finish confirms it.
        self.assertEqual(len(cache.lines(r"a restore reads session 1")), 1, cache.log())
        self.finishRestore(cache, images=len(small) + 2)
        self.assertEqual(errorLines(cache.log()), [])


class SilentClientTests(_DaemonTest):
    """(e) criu clients that connect and never (or only half) speak."""

    def openSilent(self, daemon: Daemon) -> list[tuple[Daemon, socket.socket]]:
        """Two criu connections to C{daemon} that say nothing, or half a length prefix."""
        silent = []
        for opening in (b"", b"\x10\x00"):  # nothing; half a length prefix
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(s.close)
            s.connect(daemon.socketPath)
            s.sendall(opening)
            silent.append((daemon, s))
        return silent

    def assertStillOpen(self, silent: list[tuple[Daemon, socket.socket]]) -> None:
        for _, s in silent:
            s.setblocking(False)
            self.assertRaises(BlockingIOError, s.recv, 1)

    def test_silentClientsAreClosedAndBlockNobody(self) -> None:
        timeout = 2.0
        args = ("--client-timeout", str(timeout))
        proxy, cache, port = self.startPair(cacheArgs=args, proxyArgs=args)
        silent = self.openSilent(proxy) + self.openSilent(cache)
        opened = time.monotonic()

        # A read that sent its request waits past the client timeout (for
        # the dump to be delivered).
        waiting = Background(readImage, cache.socketPath, "late.img")

        # Meanwhile everybody else is served at once: criu's writes to the
        # proxy, the link, and the cache takes the read's request.
        small = self.dumpSmall(proxy, cache)
        cache.waitForLog(r"a restore waits for ")
        busy = time.monotonic() - opened
        self.assertLess(busy, timeout, "the others were held up by the silent clients")
        self.assertStillOpen(silent)
        self.assertFalse(waiting.done, "the read did not wait for the dump's delivery")

        # After --client-timeout the silent ones are closed, and logged.
        for daemon, s in silent:
            s.settimeout(timeout + 5)
            try:
                self.assertEqual(s.recv(1), b"")
            except ConnectionResetError:
                pass
        closedAfter = time.monotonic() - opened
        self.assertTrue(timeout - 0.5 <= closedAfter <= timeout + 5, closedAfter)
        for daemon in (proxy, cache):
            daemon.waitForLog(
                r"bad request from criu, closing its connection: no request within 2.0 s", count=2
            )

        late = randomBytes(3000, "late")
        time.sleep(max(0.0, timeout + 0.5 - (time.monotonic() - opened)))
        self.assertFalse(waiting.done, "the waiting read ended before the dump was delivered")
        writeImage(proxy.socketPath, "late.img", late)
        images = {**small, "late.img": late}
        self.finishDump(proxy, cache, images=len(images) + 1)
        self.assertEqual(waiting.result(), late)

        # The restore is served at once too, with silent clients connected.
        more = self.openSilent(cache)
        reopened = time.monotonic()
        assertImages(self, cache.socketPath, images)
        busy = time.monotonic() - reopened
        self.assertLess(busy, timeout, "the restore was held up by the silent clients")
        self.assertStillOpen(more)
        self.finishRestore(cache, images=len(images) + 1)
        self.assertTrue(proxy.running() and cache.running())


class ProxyKilledStoreAndForwardTests(ProxyKilledTests):
    """The same with images forwarded only once complete (as to a C cache)."""

    FORWARDING = ("--store-and-forward",)


class CacheKilledStoreAndForwardTests(CacheKilledTests):
    FORWARDING = ("--store-and-forward",)


class NetworkStallStoreAndForwardTests(NetworkStallTests):
    FORWARDING = ("--store-and-forward",)
