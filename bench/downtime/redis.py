# -*- test-case-name: tests.test_downtime -*-
"""
The workload: a real C{redis-server} (no persistence, UNIX socket only,
C{DEBUG DIGEST} enabled) and a minimal blocking RESP client for it.

The server listens on no TCP port: criu 4.1.1 cannot dump an AF_INET socket
on kernels >= 6.16 (see C{admin/get-criu}), and a UNIX socket reaches it
from the root namespace, where it runs and is restored.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Sequence, Union

#: One RESP reply: a simple or bulk string, an integer, or C{None} (nil).
Reply = Union[bytes, int, None]


class RedisError(Exception):
    """redis answered with an error, or not as expected."""


def command(*args: bytes | str | int) -> bytes:
    """One command in RESP, the protocol C{redis-cli --pipe} sends."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class RedisClient:
    """A blocking RESP client on a UNIX socket: enough for PING, INFO and pipelined writes."""

    def __init__(self, path: str, timeout: float = 60.0, sock: socket.socket | None = None) -> None:
        """Connect to C{path} (or talk on C{sock}, already connected)."""
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                raise
        self.sock = sock
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
                return line
            self._fill()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise RedisError("redis closed the connection")
        self.buffer += data

    def reply(self) -> Reply:
        """Read one reply; raise L{RedisError} for an error reply."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            while len(self.buffer) < length + 2:
                self._fill()
            value, self.buffer = self.buffer[:length], self.buffer[length + 2 :]
            return value
        raise RedisError(f"unexpected reply {line[:60]!r}")

    def call(self, *args: bytes | str | int) -> Reply:
        self.sock.sendall(command(*args))
        return self.reply()

    def pipeline(self, payload: bytes, count: int) -> None:
        """Send C{count} commands at once (C{payload}), then read their C{count} replies."""
        self.sock.sendall(payload)
        for _ in range(count):
            self.reply()

    def usedMemory(self) -> int:
        """C{used_memory} from C{INFO memory}: the bytes redis allocated."""
        info = self.call("INFO", "memory")
        assert isinstance(info, bytes)
        for line in info.splitlines():
            if line.startswith(b"used_memory:"):
                return int(line.split(b":")[1])
        raise RedisError("INFO memory has no used_memory")

    def digest(self) -> str:
        """C{DEBUG DIGEST}: a hash of the whole data set."""
        value = self.call("DEBUG", "DIGEST")
        if not isinstance(value, bytes):
            raise RedisError(f"DEBUG DIGEST answered {value!r}")
        return value.decode()


def ping(path: str) -> bool:
    """Whether redis answers PING with PONG on C{path} right now."""
    try:
        client = RedisClient(path, timeout=5)
    except OSError:
        return False
    try:
        return client.call("PING") == b"PONG"
    except (OSError, RedisError):
        return False
    finally:
        client.close()


class FirstAnswer:
    """
    Polls PING on C{path} in a thread from now on: when redis first
    answered.  Started before C{criu restore}, it sees the restored process
    serve as soon as criu resumes it, not once criu has run its post-resume
    scripts and exited.
    """

    def __init__(self, path: str, timeout: float, interval: float = 0.002) -> None:
        self.path = path
        self.timeout = timeout
        self.answered: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)
        self._thread.start()

    def _poll(self, interval: float) -> None:
        deadline = time.monotonic() + self.timeout
        while not self._stop.is_set() and time.monotonic() <= deadline:
            if ping(self.path):
                self.answered = time.monotonic()
                return
            time.sleep(interval)

    def wait(self) -> float:
        """The C{time.monotonic()} redis first answered; L{RedisError} if it did not in time."""
        self._thread.join()
        if self.answered is None:
            raise RedisError(f"redis did not answer PING on {self.path} within {self.timeout:g} s")
        return self.answered

    def cancel(self) -> None:
        """Stop polling (the restore failed)."""
        self._stop.set()
        self._thread.join()


def serverArgv(binary: str, directory: Path) -> list[str]:
    """C{redis-server} as a plain cache: no TCP, no persistence, DEBUG allowed, logging to a file."""
    return [
        binary,
        "--port", "0",
        "--unixsocket", str(directory / "redis.sock"),
        "--unixsocketperm", "700",
        "--save", "",
        "--appendonly", "no",
        "--enable-debug-command", "yes",
        "--daemonize", "no",
        "--dir", str(directory),
        "--logfile", str(directory / "redis.log"),
    ]


class RedisServer:
    """
    One C{redis-server} in its own session (criu dumps a session leader
    without C{--shell-job}), a child of this process so that it is reaped as
    soon as criu dump kills it (criu restores it under the same pid).
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.directory = directory
        self.socketPath = str(directory / "redis.sock")
        self.process = subprocess.Popen(
            serverArgv(binary, directory),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=directory,
            start_new_session=True,
        )
        self.pid = self.process.pid

    def ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ping(self.socketPath):
            if self.process.poll() is not None:
                raise RedisError(f"redis-server exited ({self.process.returncode}) before it answered PING")
            if time.monotonic() > deadline:
                raise RedisError(f"redis-server did not answer PING within {timeout:g} s")
            time.sleep(0.02)

    def client(self) -> RedisClient:
        return RedisClient(self.socketPath)

    def reap(self, timeout: float = 30) -> None:
        """Wait for the original process to be gone (criu dump killed it)."""
        self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def killRestored(pid: int) -> None:
    """Kill a restored process (not our child unless we are its subreaper) and reap it if we can."""
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)


def replay(path: str, batches: Sequence[tuple[bytes, int]]) -> None:
    """Send pre-built batches of commands to the redis on C{path}."""
    client = RedisClient(path)
    try:
        for payload, count in batches:
            client.pipeline(payload, count)
    finally:
        client.close()
