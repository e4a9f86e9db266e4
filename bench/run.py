#!/usr/bin/env python3
"""
Benchmark of twisted-criu: move a checkpoint-sized image set through a real
criu-proxy and criu-cache on loopback, and the same bytes through three
socat hops (UNIX -> TCP -> UNIX) as a baseline.

Run from the repository root, with the project installed:

    python bench/run.py [options]        (or: ./admin/bench [options])

See bench/README.md for what is measured and how to read the output.
Everything binds 127.0.0.1 or UNIX sockets; every wait is bounded; every
child process is killed (by its pid) on error; temp dirs are removed.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import mmap
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, NoReturn, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if importlib.util.find_spec("twisted_criu") is None:  # not installed: use the working tree
    sys.path.insert(0, REPO)

from twisted_criu import __version__ as TWISTED_CRIU_VERSION
from twisted_criu import wire
from twisted_criu.testing.criu import (
    PIPE,
    LocalImageClient,
    LocalProtocolError,
    passReadEnd,
    passWriteEnd,
    readReply,
)
from twisted_criu.testing.processes import childEnvironment, dieWithParent, tail

#: twistd's console-script entry point (twisted.scripts.twistd has no
#: __main__ guard, so "python -m twisted.scripts.twistd" would do nothing).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"

MiB = 1 << 20
GB = 1e9  # throughput and CPU/GB use decimal gigabytes

#: One block of random bytes, stamped with (file, block) in its first 16
#: bytes, makes every MiB of every image distinct at almost no cost.
BLOCK = MiB
#: Size of the source-side copies (read/mmap) and of the reused read buffer.
IO_SIZE = 4 * MiB

SNAPSHOT_ID = "bench"


class BenchError(Exception):
    """The benchmark failed; the message says why."""


def say(message: str = "") -> None:
    print(message, flush=True)


def warn(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -- sizes --------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parseSize(text: str) -> int:
    """C{512M}, C{16K}, C{1G}, C{16KiB}, C{4096}: binary units."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 16K, 1G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# -- the image set --------------------------------------------------------------


@dataclass
class Image:
    name: str
    path: str
    size: int
    crc: int  # zlib.crc32 of the whole file, computed while generating it
    large: bool


def _stamp(buf: bytearray, offset: int, fileIndex: int, block: int) -> None:
    buf[offset : offset + 16] = fileIndex.to_bytes(8, "little") + block.to_bytes(8, "little")


def generateFile(path: str, size: int, fileIndex: int, random: bytes) -> int:
    """Write C{size} cheap pseudo-random bytes to C{path}; return their CRC-32."""
    per = IO_SIZE // BLOCK
    template = bytearray(random * per)
    view = memoryview(template)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    crc = 0
    try:
        if size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                pass
        offset = 0
        block = 0
        while offset < size:
            n = min(IO_SIZE, size - offset)
            for i in range(0, n, BLOCK):
                _stamp(template, i, fileIndex, block)
                block += 1
            chunk = view[:n]
            crc = zlib.crc32(chunk, crc)
            while chunk:
                written = os.pwrite(fd, chunk, offset)
                offset += written
                chunk = chunk[written:]
    finally:
        os.close(fd)
    return crc


def textBlock(size: int) -> bytes:
    """
    C{size} bytes of cache-like records (JSON lines: counters and states,
    plus random session ids and signatures), which zstd level 1 shrinks
    about 2.6x, like a typical in-memory cache.
    """
    states = [b"active", b"pending", b"expired", b"checkout"]
    out = bytearray()
    i = 0
    while len(out) < size:
        out += b'{"id":%d,"user":"user:%06d","session":"%s","sig":"%s","state":"%s","cart":[%d,%d],"ts":%d}\n' % (
            i, i * 7919 % 10**6, os.urandom(12).hex().encode(), base64.b64encode(os.urandom(24)),
            states[i % 4], i * 31 % 1000, i * 17 % 1000, 1700000000 + i * 13,
        )
        i += 1
    return bytes(out[:size])


def imageNames(large: int, small: int) -> list[tuple[str, bool]]:
    names = [(f"small-{i:03d}.img", False) for i in range(small)]
    names += [(f"pages-{i + 1}.img", True) for i in range(large)]
    return names


def generateImages(directory: str, args: argparse.Namespace) -> list[Image]:
    random = textBlock(BLOCK) if args.content == "text" else os.urandom(BLOCK)
    images = []
    for index, (name, large) in enumerate(imageNames(args.large, args.small)):
        size = args.large_size if large else args.small_size
        path = os.path.join(directory, name)
        crc = generateFile(path, size, index, random)
        images.append(Image(name, path, size, crc, large))
    return images


def pickTempRoot(requested: str | None, needed: int) -> str:
    if requested:
        return requested
    try:
        st = os.statvfs("/dev/shm")
        if os.access("/dev/shm", os.W_OK) and st.f_bavail * st.f_frsize > needed * 1.2 + 256 * MiB:
            return "/dev/shm"
    except OSError:
        pass
    return tempfile.gettempdir()


def memAvailable() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -- child processes --------------------------------------------------------------


def _dieWithBenchmark() -> None:
    """In the child: SIGKILL if the benchmark dies, so nothing outlives it."""
    dieWithParent(signal.SIGKILL)


def memfdKiB(pid: int) -> int:
    """Memory held in a process's memfds (allocated blocks), in KiB."""
    seen: dict[tuple[int, int], int] = {}  # a memfd open twice counts once
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            if os.readlink(path).startswith("/memfd:"):
                st = os.stat(path)
                seen[(st.st_dev, st.st_ino)] = st.st_blocks // 2
        except OSError:
            pass  # closed meanwhile
    return sum(seen.values())


@dataclass
class Usage:
    """What wait4() says about a child that exited: exact and cheap."""

    cpu: float  # ru_utime + ru_stime, seconds
    utime: float
    stime: float
    maxrssKiB: int
    minflt: int
    majflt: int
    nvcsw: int
    nivcsw: int

    @classmethod
    def of(cls, ru: Any) -> Usage:
        return cls(
            ru.ru_utime + ru.ru_stime, ru.ru_utime, ru.ru_stime, ru.ru_maxrss,
            ru.ru_minflt, ru.ru_majflt, ru.ru_nvcsw, ru.ru_nivcsw,
        )


class Child:
    """
    A child process (its own session, SIGKILLed if we die) reaped by a thread
    blocked in os.wait4(), which records the exact exit time and rusage.
    """

    def __init__(self, name: str, argv: Sequence[str], cwd: str, outPath: str,
                 logPath: str | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.cwd = cwd
        self.outPath = outPath
        self.logPath = logPath
        self.process: subprocess.Popen[bytes] | None = None
        self.exited = threading.Event()
        self.exitTime: float | None = None
        self.exitCode: int | None = None
        self.usage: Usage | None = None
        self.killed = False
        #: VmHWM (peak RSS of the process's own memory, KiB), polled while it
        #: runs. wait4()'s ru_maxrss is not used for peaks: exec() folds the
        #: forking parent's RSS into it (the benchmark's own ~25-40 MiB).
        self.peakRssKiB = 0
        #: The largest VmRSS + memfd bytes seen (KiB): the daemons keep
        #: in-memory images in memfds, which are not mapped, so not in RSS.
        self.peakMemoryKiB = 0

    def start(self) -> None:
        with open(self.outPath, "wb") as out:
            self.process = subprocess.Popen(
                self.argv, cwd=self.cwd, env=childEnvironment(),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=_dieWithBenchmark, start_new_session=True,
            )
        threading.Thread(target=self._reap, name=f"reap-{self.name}", daemon=True).start()
        threading.Thread(target=self._watchPeak, name=f"hwm-{self.name}", daemon=True).start()

    def _watchPeak(self) -> None:
        assert self.process is not None
        path = f"/proc/{self.process.pid}/status"
        samples = 0
        while not self.exited.is_set():
            try:
                rssKiB = 0
                with open(path) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peakRssKiB = max(self.peakRssKiB, int(line.split()[1]))
                        elif line.startswith("VmRSS:"):
                            rssKiB = int(line.split()[1])
                if samples % 5 == 0:  # every 100 ms: one stat() per descriptor
                    total = rssKiB + memfdKiB(self.process.pid)
                    self.peakMemoryKiB = max(self.peakMemoryKiB, total)
                samples += 1
            except (OSError, ValueError):
                pass
            self.exited.wait(0.02)

    def _reap(self) -> None:
        assert self.process is not None
        _, status, ru = os.wait4(self.process.pid, 0)
        self.exitTime = time.perf_counter()
        self.exitCode = os.waitstatus_to_exitcode(status)
        self.usage = Usage.of(ru)
        self.process.returncode = self.exitCode  # we reaped it, not Popen
        self.exited.set()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait(self, timeout: float) -> bool:
        return self.exited.wait(max(0.0, timeout))

    def kill(self) -> None:
        if self.process is not None and not self.exited.is_set():
            self.killed = True
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL; always reaped before returning (bounded)."""
        if self.process is None or self.exited.is_set():
            return
        try:
            os.kill(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not self.wait(grace):
            self.kill()
            self.wait(10)

    def failure(self, what: str) -> BenchError:
        parts = [f"{self.name} {what}"]
        for path in (self.logPath, self.outPath):
            text = tail(path) if path else ""
            if text:
                parts.append(f"--- last lines of {path} ---\n{text}")
        return BenchError("\n".join(parts))


class Watchdog:
    """Kill the given children when the deadline passes: unblocks every wait."""

    def __init__(self, seconds: float, children: list[Child]) -> None:
        self.seconds = seconds
        self.children = children
        self.fired = False
        self.started = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self.deadline = time.monotonic() + seconds

    def start(self) -> Watchdog:
        self.deadline = time.monotonic() + self.seconds
        self.started = True
        self._timer.start()
        return self

    def remaining(self) -> float:
        return max(0.1, self.deadline - time.monotonic())

    def _fire(self) -> None:
        self.fired = True
        for child in list(self.children):
            child.kill()

    def cancel(self) -> None:
        self._timer.cancel()


def freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def waitFor(condition: Callable[[], bool], child: Child, what: str, timeout: float,
            interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if child.exited.is_set():
            raise child.failure(f"exited with code {child.exitCode} before {what}")
        if time.monotonic() > deadline:
            raise child.failure(f"did not get ready ({what}) within {timeout:g} s")
        time.sleep(interval)


def tcpListening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port (without connecting to it)?"""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[1] == want and fields[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def procCpu(pid: int) -> float:
    """utime + stime of a live process so far, from /proc/PID/stat (clock ticks)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def procRssKiB(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class LinkWatcher:
    """
    Notes when the proxy closes its TCP link to the cache: by then it has
    handed every byte to the kernel (the cache gets them a moment later).

    Reading /proc/net/tcp is expensive (milliseconds of CPU per read on a
    big host), so it is read only to find the link's socket inode; then the
    proxy's file descriptor for it is watched with readlink (microseconds),
    every millisecond once armed (after the dump finish).
    """

    def __init__(self, port: int, pid: int) -> None:
        self.port = port
        self.pid = pid
        self.closedAt: float | None = None
        self._fdPath: str | None = None
        self._target = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="link-watcher", daemon=True)

    def established(self) -> bool:
        """Find the proxy's socket for an established link to 127.0.0.1:port."""
        want = f"0100007F:{self.port:04X}"
        inodes = set()
        try:
            with open("/proc/net/tcp") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[2] == want and fields[3] == "01":
                        inodes.add(fields[9])
        except OSError:
            return False
        fdDir = f"/proc/{self.pid}/fd"
        try:
            for fd in os.listdir(fdDir):
                try:
                    target = os.readlink(os.path.join(fdDir, fd))
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    self._fdPath, self._target = os.path.join(fdDir, fd), target
                    return True
        except OSError:
            pass
        return False

    def _open(self) -> bool:
        assert self._fdPath is not None
        try:
            return os.readlink(self._fdPath) == self._target
        except OSError:
            return False

    def arm(self) -> None:
        if not self._thread.is_alive() and self.closedAt is None:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._open():
                self.closedAt = time.perf_counter()
                return
            self._stop.wait(0.001)

    def wait(self, timeout: float) -> bool:
        if self._thread.is_alive():
            self._thread.join(timeout)
        return self.closedAt is not None

    def stop(self) -> None:
        self._stop.set()


def findPySpy() -> str | None:
    candidate = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.access(candidate, os.X_OK):
        return candidate
    return shutil.which("py-spy")


# -- criu's side of the local protocol (pipe variant) ----------------------------


def _request(path: str, name: str, mode: int, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(wire.LocalRequest(name, SNAPSHOT_ID, mode).toBytes())
    except BaseException:
        sock.close()
        raise
    return sock


def openPipeWrite(path: str, name: str, timeout: float) -> int:
    """As criu dump: request a write, pass a pipe's read end; return the write end."""
    sock = _request(path, name, wire.O_WRONLY, timeout)
    try:
        return passReadEnd(sock)
    finally:
        sock.close()


def openPipeRead(path: str, name: str, timeout: float) -> int | None:
    """As criu restore: request a read, wait for the reply, pass a pipe's write end."""
    sock = _request(path, name, wire.O_RDONLY, timeout)
    try:
        try:
            reply = readReply(sock)
        except LocalProtocolError as e:
            raise BenchError(f"{name}: {e}") from None
        if reply.error == wire.ENOENT:
            return None
        if reply.error:
            raise BenchError(f"{name}: the cache answered error {reply.error}")
        return passWriteEnd(sock)
    finally:
        sock.close()


class Pacer:
    """Holds a writer to C{rate} bytes per second (0: as fast as it goes)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.start = time.perf_counter()

    def wrote(self, total: int) -> None:
        if self.rate:
            ahead = total / self.rate - (time.perf_counter() - self.start)
            if ahead > 0:
                time.sleep(ahead)


def sendFile(image: Image, out: int, method: str, toSocket: bool = False, rate: int = 0) -> None:
    """Copy a source file into C{out} (a pipe, or a socket) with C{method}."""
    fd = os.open(image.path, os.O_RDONLY)
    pacer = Pacer(rate if image.large else 0)
    try:
        size = image.size
        offset = 0
        if method == "splice":
            # Kernel-side: page-cache pages go into the pipe (sendfile for a socket).
            while offset < size:
                count = min(IO_SIZE, size - offset)
                if toSocket:
                    n = os.sendfile(out, fd, offset, count)
                else:
                    n = os.splice(fd, out, count, offset_src=offset)
                if not n:
                    raise BenchError(f"{image.path} shrank while being sent")
                offset += n
                pacer.wrote(offset)  # (returns at once without --write-rate)
        elif method == "mmap":
            if size:
                with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
                    view = memoryview(m)
                    try:
                        while offset < size:
                            offset += os.write(out, view[offset : offset + IO_SIZE])
                    finally:
                        view.release()
        else:  # read: large reads into a reused buffer, large writes
            buf = bytearray(IO_SIZE)
            view = memoryview(buf)
            while offset < size:
                n = os.readv(fd, [view])
                if not n:
                    raise BenchError(f"{image.path} shrank while being sent")
                chunk = view[:n]
                while chunk:
                    chunk = chunk[os.write(out, chunk) :]
                offset += n
    finally:
        os.close(fd)


def checkedRead(fd: int, image: Image, view: memoryview) -> None:
    """Read C{fd} to EOF into a reused buffer, checking size and CRC-32."""
    crc = 0
    size = 0
    while n := os.readv(fd, [view]):
        crc = zlib.crc32(view[:n], crc)
        size += n
    if size != image.size or crc != image.crc:
        raise BenchError(
            f"{image.name}: read back {size} bytes crc32 {crc:08x}, "
            f"wrote {image.size} bytes crc32 {image.crc:08x}"
        )


# -- one twisted-criu run --------------------------------------------------------


@dataclass
class DaemonResult:
    cpu: float  # whole life, exact (wait4)
    startupCpu: float  # before the first write (/proc/PID/stat, 10 ms ticks)
    startupRssKiB: int  # VmRSS before the first write
    utime: float
    stime: float
    maxrssKiB: int  # peak RSS: VmHWM polled every 20 ms while it ran
    ruMaxrssKiB: int  # wait4's ru_maxrss: includes the forking parent's RSS
    peakMemoryKiB: int  # peak of RSS + memfds (images held in memory), every 100 ms
    minflt: int
    nvcsw: int
    nivcsw: int
    exitAfter: float  # seconds from the first write


@dataclass
class TwistedResult:
    total: int
    dump: float  # first write .. dump finish sent (all bytes taken by the proxy)
    cached: float  # first write .. the proxy closed the link (everything forwarded)
    proxyExit: float  # first write .. the proxy process exited
    restoreStart: float  # first write .. restore begins
    restore: float  # restore begins .. restore finish acknowledged
    e2e: float  # first write .. last byte read back
    proxy: DaemonResult
    cache: DaemonResult
    clientCpu: float

    @property
    def gbps(self) -> float:
        return self.total / GB / self.e2e

    @property
    def transferCpu(self) -> float:
        """CPU of both daemons minus what they spent starting up."""
        return self.proxy.cpu - self.proxy.startupCpu + self.cache.cpu - self.cache.startupCpu

    @property
    def cpuPerGB(self) -> float:
        return self.transferCpu / (self.total / GB)

    @property
    def totalCpuPerGB(self) -> float:
        return (self.proxy.cpu + self.cache.cpu) / (self.total / GB)

    def asDict(self) -> dict[str, Any]:
        return {
            "dump_s": self.dump, "cached_s": self.cached, "proxy_exit_s": self.proxyExit,
            "total_cpu_s_per_GB": self.totalCpuPerGB,
            "restore_start_s": self.restoreStart, "restore_s": self.restore,
            "e2e_s": self.e2e, "e2e_GBps": self.gbps,
            "cpu_s_per_GB": self.cpuPerGB, "client_cpu_s": self.clientCpu,
            "proxy": vars(self.proxy), "cache": vars(self.cache),
        }


def daemonArgv(tapname: str, logPath: str, profile: str | None, tapArgs: list[str]) -> list[str]:
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", f"--logfile={logPath}"]
    if profile:
        argv += [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
    if not {"--plain-link", "--tls", "--link-key"} & set(tapArgs):
        # The default, secured link, with a key of the run's own (not /etc's).
        tapArgs = [*tapArgs, "--link-key", os.path.join(os.path.dirname(logPath), "..", "link.key")]
    return argv + [tapname] + tapArgs


def startSpy(pySpy: str, target: Child, output: str, runDir: str, args: argparse.Namespace) -> Child:
    argv = [pySpy, "record", "--pid", str(target.pid), "--rate", str(args.py_spy_rate),
            "--format", "raw", "--output", output, "--nonblocking"]
    if args.py_spy_native:
        argv.remove("--nonblocking")  # native unwinding needs the process paused
        argv.append("--native")
    spy = Child(f"py-spy({target.name})", argv, runDir, os.path.join(runDir, f"py-spy-{target.name}.out"))
    spy.start()
    return spy


def runTwisted(run: int, images: list[Image], workDir: str, args: argparse.Namespace,
               pySpy: str | None) -> TwistedResult:
    runDir = os.path.join(workDir, f"run-{run}")
    src = os.path.join(runDir, "src")
    dst = os.path.join(runDir, "dst")
    for d in (runDir, src, dst):
        os.mkdir(d)

    def profileFile(tap: str) -> str | None:
        if not args.profile:
            return None
        return os.path.join(os.path.abspath(args.profile), f"{tap}-run{run}.pstats")

    children: list[Child] = []
    spies: list[Child] = []
    watchers: list[LinkWatcher] = []
    watchdog = Watchdog(args.timeout, children)
    try:
        # The cache first (a proxy that finds no cache retries with backoff).
        cacheSock = os.path.join(dst, "img-cache.sock")
        for attempt in range(3):
            port = freePort()
            cacheLog = os.path.join(runDir, "criu-cache.log")
            cache = Child(
                "criu-cache",
                daemonArgv("criu-cache", cacheLog, profileFile("criu-cache"),
                           ["--once", "--port", str(port), "--address", "127.0.0.1", "-D", dst]
                           + args.cache_args),
                runDir, os.path.join(runDir, "criu-cache.out"), cacheLog,
            )
            children.append(cache)
            cache.start()
            try:
                waitFor(lambda: os.path.exists(cacheSock), cache, "img-cache.sock", 30)
                break
            except BenchError:
                if attempt == 2 or "Address already in use" not in tail(cacheLog):
                    raise
                cache.stop()
                children.remove(cache)
        proxySock = os.path.join(src, "img-proxy.sock")
        proxyLog = os.path.join(runDir, "criu-proxy.log")
        proxy = Child(
            "criu-proxy",
            daemonArgv("criu-proxy", proxyLog, profileFile("criu-proxy"),
                       ["--once", "--port", str(port), "--address", "127.0.0.1", "-D", src]
                       + args.proxy_args),
            runDir, os.path.join(runDir, "criu-proxy.out"), proxyLog,
        )
        children.append(proxy)
        proxy.start()
        waitFor(lambda: os.path.exists(proxySock), proxy, "img-proxy.sock", 30)
        if pySpy:
            outDir = os.path.abspath(args.py_spy)
            for daemon in (proxy, cache):
                spies.append(startSpy(pySpy, daemon, os.path.join(outDir, f"{daemon.name}-run{run}.txt"),
                                      runDir, args))
        if args.attach:
            for daemon in (proxy, cache):
                argv = [a.format(pid=daemon.pid, name=daemon.name, run=run) for a in shlex.split(args.attach)]
                tool = Child(f"attach({daemon.name})", argv, os.getcwd(),
                             os.path.join(runDir, f"attach-{daemon.name}.out"))
                tool.start()
                spies.append(tool)
        if spies:
            time.sleep(1.0)  # let the profilers attach before the clock starts
        watchdog.start()
        link = LinkWatcher(port, proxy.pid)
        watchers.append(link)
        waitFor(link.established, proxy, "connected to the cache", 30, interval=0.05)
        result = _migrate(images, proxy, cache, proxySock, cacheSock, link, watchdog, args)
    except BaseException as e:
        watchdog.cancel()
        for child in children:
            child.kill()
        for child in children:
            child.wait(10)
        if watchdog.fired or (watchdog.started and time.monotonic() >= watchdog.deadline - 0.1):
            raise BenchError(
                f"run {run}: twisted-criu did not finish within {args.timeout:g} s (--timeout)"
                + "".join(f"\n{c.failure('(killed) log:')}" for c in children)
            ) from None
        if isinstance(e, OSError):
            for child in children:
                if child.exited.is_set() and not child.killed:
                    raise child.failure(f"died (exit code {child.exitCode}): {e}") from None
            raise BenchError(f"talking to the daemons failed: {e}") from None
        raise
    finally:
        watchdog.cancel()
        for watcher in watchers:
            watcher.stop()
        for child in children:
            child.stop()
        for spy in spies:
            if not spy.wait(30):
                spy.stop()
        if not args.keep:
            shutil.rmtree(runDir, ignore_errors=True)
    return result


def _migrate(images: list[Image], proxy: Child, cache: Child, proxySock: str,
             cacheSock: str, link: LinkWatcher, watchdog: Watchdog,
             args: argparse.Namespace) -> TwistedResult:
    total = sum(i.size for i in images)
    smalls = [i for i in images if not i.large]
    larges = [i for i in images if i.large]
    timeout = watchdog.remaining
    proxyClient = LocalImageClient(proxySock, PIPE, timeout=timeout())
    cacheClient = LocalImageClient(cacheSock, PIPE, timeout=timeout())
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    def write(image: Image) -> None:
        fd = openPipeWrite(proxySock, image.name, timeout())
        try:
            sendFile(image, fd, args.source_io, rate=args.write_rate)
        finally:
            os.close(fd)

    startup = {d.name: (procCpu(d.pid), procRssKiB(d.pid)) for d in (proxy, cache)}

    # -- dump: what criu dump --remote does, in the pipe variant
    t0 = time.perf_counter()
    proxyClient.pushSnapshotId(SNAPSHOT_ID)
    ids = proxyClient.snapshotIds()
    if ids[-1:] != [SNAPSHOT_ID]:
        raise BenchError(f"the proxy's parent list is {ids!r}")
    half = len(smalls) // 2
    for image in smalls[:half]:
        write(image)
    if args.sequential or len(larges) < 2:
        for image in larges:
            write(image)
    else:  # criu overlaps its page pipes: all large images at once
        errors: list[BaseException] = []

        def writer(image: Image) -> None:
            try:
                write(image)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(i,), name=i.name) for i in larges]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout())
            if t.is_alive():
                raise BenchError(f"writing {t.name} did not finish")
        if errors:
            raise errors[0]
    for image in smalls[half:]:
        write(image)
    proxyClient.finishDump()
    tDump = time.perf_counter()
    link.arm()

    # -- restore: what criu restore --remote does
    if args.restore_after == "forward":
        if not link.wait(timeout()):
            raise BenchError("the proxy did not close its link after forwarding")
    tRestore = time.perf_counter()
    if SNAPSHOT_ID not in cacheClient.snapshotIds():
        raise BenchError("the cache's parent list lacks the snapshot id")
    buf = bytearray(IO_SIZE)
    view = memoryview(buf)
    for image in smalls + larges:  # criu reads the pages last
        fd = openPipeRead(cacheSock, image.name, timeout())
        if fd is None:
            raise BenchError(f"{image.name}: the cache says ENOENT")
        try:
            checkedRead(fd, image, view)
        finally:
            os.close(fd)
    tLast = time.perf_counter()
    cacheClient.finishRestore()
    tEnd = time.perf_counter()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)

    for daemon in (proxy, cache):
        if not daemon.wait(timeout()):
            raise daemon.failure(f"still running {args.timeout:g} s after the run started")
        if daemon.exitCode != 0:
            raise daemon.failure(f"exited with code {daemon.exitCode}")

    def daemonResult(d: Child) -> DaemonResult:
        u = d.usage
        assert u is not None and d.exitTime is not None
        cpu, rss = startup[d.name]
        return DaemonResult(u.cpu, cpu, rss, u.utime, u.stime, d.peakRssKiB, u.maxrssKiB,
                            d.peakMemoryKiB, u.minflt, u.nvcsw, u.nivcsw, d.exitTime - t0)

    assert proxy.exitTime is not None
    if not link.wait(5):
        raise BenchError("could not see the proxy close its link")
    assert link.closedAt is not None
    return TwistedResult(
        total=total,
        dump=tDump - t0,
        cached=link.closedAt - t0,
        proxyExit=proxy.exitTime - t0,
        restoreStart=tRestore - t0,
        restore=tEnd - tRestore,
        e2e=tLast - t0,
        proxy=daemonResult(proxy),
        cache=daemonResult(cache),
        clientCpu=(cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
    )


# -- one socat baseline run ------------------------------------------------------


@dataclass
class SocatResult:
    total: int
    seconds: float  # first byte sent .. last byte received
    cpu: float  # both socats
    maxrssKiB: int  # the larger of the two socats' peak RSS (VmHWM)

    @property
    def gbps(self) -> float:
        return self.total / GB / self.seconds

    @property
    def cpuPerGB(self) -> float:
        return self.cpu / (self.total / GB)

    def asDict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "GBps": self.gbps, "cpu_s": self.cpu,
                "cpu_s_per_GB": self.cpuPerGB, "maxrss_KiB": self.maxrssKiB}


class StreamSink:
    """Accept one connection, read it to EOF into a reused buffer, check every image."""

    def __init__(self, listener: socket.socket, images: list[Image]) -> None:
        self.listener = listener
        self.images = images
        self.error: BaseException | None = None
        self.endTime: float | None = None
        self.thread = threading.Thread(target=self._run, name="sink", daemon=True)

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(None)
                self._consume(conn)
            self.endTime = time.perf_counter()
        except BaseException as e:
            self.error = e

    def _consume(self, conn: socket.socket) -> None:
        images = self.images
        view = memoryview(bytearray(IO_SIZE))
        index, left, crc = 0, images[0].size if images else 0, 0

        def finishImages() -> None:
            nonlocal index, left, crc
            while index < len(images) and left == 0:
                image = images[index]
                if crc != image.crc:
                    raise BenchError(f"socat baseline: {image.name} arrived with crc32 {crc:08x}, "
                                     f"expected {image.crc:08x}")
                index += 1
                crc = 0
                left = images[index].size if index < len(images) else 0

        finishImages()
        while n := conn.recv_into(view):
            pos = 0
            while pos < n:
                if index >= len(images):
                    raise BenchError("socat baseline: more bytes than were sent")
                take = min(left, n - pos)
                crc = zlib.crc32(view[pos : pos + take], crc)
                pos += take
                left -= take
                finishImages()
        if index < len(images):
            raise BenchError(f"socat baseline: stream ended inside {images[index].name}")


def runSocat(run: int, images: list[Image], workDir: str, args: argparse.Namespace) -> SocatResult:
    runDir = os.path.join(workDir, f"socat-{run}")
    os.mkdir(runDir)
    total = sum(i.size for i in images)
    front = os.path.join(runDir, "front.sock")  # source -> socat #1
    back = os.path.join(runDir, "back.sock")  # socat #2 -> sink
    block = f"-b{args.socat_block}"
    children: list[Child] = []
    watchdog = Watchdog(args.timeout, children)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(back)
        listener.listen(1)
        listener.settimeout(args.timeout)
        sink = StreamSink(listener, images)
        sink.thread.start()
        for attempt in range(3):
            port = freePort()
            relay2 = Child("socat-tcp-unix",
                           [args.socat, block, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
                            f"UNIX-CONNECT:{back}"],
                           runDir, os.path.join(runDir, "socat2.out"))
            children.append(relay2)
            relay2.start()
            try:
                waitFor(lambda: tcpListening(port), relay2, f"listening on 127.0.0.1:{port}", 30,
                        interval=0.05)
                break
            except BenchError:
                if attempt == 2:
                    raise
                relay2.stop()
                children.remove(relay2)
        relay1 = Child("socat-unix-tcp",
                       [args.socat, block, f"UNIX-LISTEN:{front}", f"TCP:127.0.0.1:{port}"],
                       runDir, os.path.join(runDir, "socat1.out"))
        children.append(relay1)
        relay1.start()
        waitFor(lambda: os.path.exists(front), relay1, "front.sock", 30)
        watchdog.start()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(watchdog.remaining())
            sock.connect(front)
            sock.settimeout(None)
            t0 = time.perf_counter()
            for image in images:
                sendFile(image, sock.fileno(), args.source_io, toSocket=True, rate=args.write_rate)
            sock.shutdown(socket.SHUT_WR)
            sink.thread.join(watchdog.remaining())
        if sink.thread.is_alive():
            raise BenchError("the socat baseline's sink did not finish")
        if sink.error is not None:
            raise sink.error
        assert sink.endTime is not None
        seconds = sink.endTime - t0
        for child in children:
            if not child.wait(watchdog.remaining()):
                raise child.failure("did not exit after the transfer")
            if child.exitCode != 0:
                raise child.failure(f"exited with code {child.exitCode}")
        usages = [c.usage for c in children if c.usage is not None]
        return SocatResult(total, seconds, sum(u.cpu for u in usages),
                           max(c.peakRssKiB for c in children))
    except BaseException as e:
        watchdog.cancel()
        for child in children:
            child.kill()
        if watchdog.fired or (watchdog.started and time.monotonic() >= watchdog.deadline - 0.1):
            raise BenchError(f"run {run}: the socat baseline did not finish within "
                             f"{args.timeout:g} s (--timeout)") from None
        if isinstance(e, OSError):
            raise BenchError(f"socat baseline failed: {e}"
                             + "".join(f"\n{c.failure('log:')}" for c in children)) from None
        raise
    finally:
        watchdog.cancel()
        listener.close()
        for child in children:
            child.stop()
        if not args.keep:
            shutil.rmtree(runDir, ignore_errors=True)


# -- profiles -------------------------------------------------------------------


def _shortPath(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", REPO + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def summarizeCProfile(path: str, top: int) -> list[str]:
    import pstats

    stats = pstats.Stats(path)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = func if filename == "~" else f"{func} ({_shortPath(filename)}:{line})"
        rows.append((tt, ct, nc, where))
    lines = [f"    {'tottime':>8} {'%':>5} {'cumtime':>8} {'ncalls':>9}  function   (total {total:.2f} s)"]
    for tt, ct, nc, where in sorted(rows, reverse=True)[:top]:
        lines.append(f"    {tt:8.3f} {100 * tt / total:5.1f} {ct:8.3f} {nc:9d}  {where}")
    return lines


def summarizePySpy(path: str, top: int) -> list[str]:
    """Top 'self' frames and top inclusive frames of a py-spy raw (collapsed) file."""
    selfCounts: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";")]
            selfCounts[frames[-1]] = selfCounts.get(frames[-1], 0) + n
            for fr in set(frames):
                incl[fr] = incl.get(fr, 0) + n
    if not total:
        return ["    (no samples)"]
    lines = [f"    self%  function   ({total} samples; idle time in epoll is not sampled)"]
    for fr, n in sorted(selfCounts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / total:5.1f}  {fr}")
    lines.append("    incl%  function")
    for fr, n in sorted(incl.items(), key=lambda kv: -kv[1])[: top + 8]:
        lines.append(f"    {100 * n / total:5.1f}  {fr}")
    return lines


# -- reporting ------------------------------------------------------------------


def twistedLine(r: TwistedResult) -> str:
    p, c = r.proxy, r.cache
    return (
        f"e2e {r.e2e:6.2f} s = {r.gbps:5.3f} GB/s   dump {r.dump:5.2f} s  cached {r.cached:5.2f} s  "
        f"restore {r.restore:5.2f} s  (proxy exit {r.proxyExit:5.2f} s)\n"
        f"                cpu-s proxy {p.cpu:5.2f} (startup {p.startupCpu:4.2f})  cache {c.cpu:5.2f} "
        f"(startup {c.startupCpu:4.2f})  => {r.cpuPerGB:5.2f} cpu-s/GB moving data "
        f"({r.totalCpuPerGB:5.2f} with startup)\n"
        f"                peak rss proxy {p.maxrssKiB / 1024:7.1f} MiB (idle {p.startupRssKiB / 1024:5.1f})  "
        f"cache {c.maxrssKiB / 1024:7.1f} MiB (idle {c.startupRssKiB / 1024:5.1f})  "
        f"minor faults proxy {p.minflt:,} cache {c.minflt:,}\n"
        f"                peak memory (rss + memfd images) proxy {p.peakMemoryKiB / 1024:7.1f} MiB  "
        f"cache {c.peakMemoryKiB / 1024:7.1f} MiB"
    )


def socatLine(r: SocatResult) -> str:
    return (f"{r.seconds:6.2f} s = {r.gbps:5.3f} GB/s | socat x2 {r.cpu:5.2f} cpu-s "
            f"({r.cpuPerGB:4.2f} cpu-s/GB), max rss {r.maxrssKiB / 1024:.1f} MiB")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def versionOf(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(pattern, out)
    return m.group(1) if m else "?"


def report(args: argparse.Namespace, images: list[Image], tempRoot: str,
           twisted: list[TwistedResult], socats: list[SocatResult], profiles: dict[str, list[str]]) -> dict[str, Any]:
    total = sum(i.size for i in images)
    summary: dict[str, Any] = {}
    say()
    say(f"medians of {len(twisted)} run(s)  (GB = 10^9 bytes; rss = peak, VmHWM)")
    if twisted:
        def med(get: Callable[[TwistedResult], float]) -> float:
            return median([get(r) for r in twisted])

        m = {
            "dump_s": med(lambda r: r.dump),
            "cached_s": med(lambda r: r.cached),
            "proxy_exit_s": med(lambda r: r.proxyExit),
            "restore_s": med(lambda r: r.restore),
            "e2e_s": med(lambda r: r.e2e),
            "e2e_GBps": med(lambda r: r.gbps),
            "proxy_cpu_s": med(lambda r: r.proxy.cpu),
            "cache_cpu_s": med(lambda r: r.cache.cpu),
            "proxy_startup_cpu_s": med(lambda r: r.proxy.startupCpu),
            "cache_startup_cpu_s": med(lambda r: r.cache.startupCpu),
            "cpu_s_per_GB": med(lambda r: r.cpuPerGB),
            "total_cpu_s_per_GB": med(lambda r: r.totalCpuPerGB),
            "proxy_maxrss_KiB": med(lambda r: r.proxy.maxrssKiB),
            "cache_maxrss_KiB": med(lambda r: r.cache.maxrssKiB),
            "proxy_peak_memory_KiB": med(lambda r: r.proxy.peakMemoryKiB),
            "cache_peak_memory_KiB": med(lambda r: r.cache.peakMemoryKiB),
            "proxy_idle_rss_KiB": med(lambda r: r.proxy.startupRssKiB),
            "cache_idle_rss_KiB": med(lambda r: r.cache.startupRssKiB),
            "proxy_minflt": med(lambda r: r.proxy.minflt),
            "cache_minflt": med(lambda r: r.cache.minflt),
            "client_cpu_s": med(lambda r: r.clientCpu),
        }
        summary["twisted_criu"] = m
        say(f"  twisted-criu  e2e {m['e2e_GBps']:.3f} GB/s ({m['e2e_s']:.2f} s)   "
            f"dump {m['dump_s']:.2f} s  cached {m['cached_s']:.2f} s  restore {m['restore_s']:.2f} s"
            f"  (proxy exit {m['proxy_exit_s']:.2f} s)")
        say(f"                cpu-s: proxy {m['proxy_cpu_s']:.2f} (startup {m['proxy_startup_cpu_s']:.2f}), "
            f"cache {m['cache_cpu_s']:.2f} (startup {m['cache_startup_cpu_s']:.2f}) "
            f"=> {m['cpu_s_per_GB']:.2f} cpu-s/GB moving data, {m['total_cpu_s_per_GB']:.2f} with startup"
            f"  (client {m['client_cpu_s']:.2f} s)")
        say(f"                peak rss: proxy {m['proxy_maxrss_KiB'] / 1024:.1f} MiB "
            f"(idle {m['proxy_idle_rss_KiB'] / 1024:.1f}), cache {m['cache_maxrss_KiB'] / 1024:.1f} MiB "
            f"(idle {m['cache_idle_rss_KiB'] / 1024:.1f})  for {human(total)} of images")
        say(f"                peak memory (rss + memfd images): proxy {m['proxy_peak_memory_KiB'] / 1024:.1f} MiB,"
            f" cache {m['cache_peak_memory_KiB'] / 1024:.1f} MiB")
        say(f"                minor page faults: proxy {m['proxy_minflt']:,.0f}, cache {m['cache_minflt']:,.0f}"
            f"  ({total / 4096:,.0f} pages of images)")
    if socats:
        s = {
            "seconds": median([r.seconds for r in socats]),
            "GBps": median([r.gbps for r in socats]),
            "cpu_s_per_GB": median([r.cpuPerGB for r in socats]),
            "maxrss_KiB": median([r.maxrssKiB for r in socats]),
        }
        summary["socat"] = s
        say(f"  socat x3 hops {s['GBps']:.3f} GB/s ({s['seconds']:.2f} s)   "
            f"{s['cpu_s_per_GB']:.2f} cpu-s/GB (both socats)")
    if twisted and socats:
        ratio = summary["twisted_criu"]["e2e_GBps"] / summary["socat"]["GBps"]
        perRun = median([t.gbps / s.gbps for t, s in zip(twisted, socats)])
        summary["ratio"] = ratio
        summary["ratio_median_of_runs"] = perRun
        say(f"  ratio twisted-criu / socat: {ratio:.3f}  (median of per-run ratios {perRun:.3f})")
    for name, lines in profiles.items():
        say()
        say(name)
        for line in lines:
            say(line)

    result = {
        "bench": "twisted-criu",
        "version": TWISTED_CRIU_VERSION,
        "revision": args.revision,
        "config": {
            "large": args.large, "large_size": args.large_size,
            "small": args.small, "small_size": args.small_size,
            "images": len(images), "total_bytes": total, "runs": args.runs,
            "source_io": args.source_io, "writes": "sequential" if args.sequential else "concurrent",
            "write_rate": args.write_rate,
            "restore_after": args.restore_after, "proxy_args": args.proxy_args,
            "cache_args": args.cache_args, "socat_block": args.socat_block,
            "temp_root": tempRoot, "profiled": bool(args.profile or args.py_spy or args.attach),
        },
        "machine": {
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "kernel": platform.release(),
        },
        "runs": [
            {"twisted_criu": t.asDict() if t else None, "socat": s.asDict() if s else None}
            for t, s in _zipLongest(twisted, socats)
        ],
        "median": summary,
    }
    return result


def gitRevision() -> str:
    """The commit the daemons ran from, '+dirty' if the tree has changes (read-only)."""
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "?"
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def _zipLongest(a: list[Any], b: list[Any]) -> list[tuple[Any, Any]]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else None, b[i] if i < len(b) else None) for i in range(n)]


# -- main -----------------------------------------------------------------------


def parseArguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description=(
            "Benchmark twisted-criu: generate an image set, move it through a real "
            "criu-proxy -> TCP -> criu-cache pair (twistd, --once, 127.0.0.1) the way "
            "criu dump/restore --remote do in the pipe variant, read every image back "
            "and check it (CRC-32); and move the same bytes through socat "
            "UNIX -> TCP -> UNIX as a baseline. Prints each run, the medians, the "
            "twisted-criu/socat ratio, and a JSON line last."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("image set (default: 1 GiB = 2 x 512 MiB + 40 x 16 KiB)")
    g.add_argument("--large", type=int, default=2, metavar="N", help="number of large pages images")
    g.add_argument("--large-size", type=parseSize, default=parseSize("512M"), metavar="SIZE",
                   help="size of each large image (binary units: K, M, G)")
    g.add_argument("--small", type=int, default=40, metavar="N", help="number of small images")
    g.add_argument("--small-size", type=parseSize, default=parseSize("16K"), metavar="SIZE",
                   help="size of each small image")
    g.add_argument("--content", choices=("random", "text"), default="random",
                   help="what the images hold: random bytes (incompressible), or cache-like"
                   " text records (zstd -1 shrinks them about 2.6x) [default: random]")
    g = parser.add_argument_group("how the benchmark plays criu")
    g.add_argument("--write-rate", type=parseSize, default=0, metavar="SIZE",
                   help="bytes per second each large image is written at, as a criu dumping a "
                   "process's memory would (splice source io; e.g. 500M); 0: as fast as possible")
    g.add_argument("--sequential", action="store_true",
                   help="write the large images one after the other (default: all at once, "
                   "one thread each, like criu's overlapping page pipes)")
    g.add_argument("--source-io", choices=("splice", "read", "mmap"), default="splice",
                   help="how the client reads the source files into the pipe: splice (kernel "
                   "moves page-cache pages; sendfile for the socat baseline), read (4 MiB "
                   "reads into a reused buffer + write) or mmap (write from a mapping)")
    g.add_argument("--restore-after", choices=("dump", "forward"), default="dump",
                   help="start reading from the cache right after the dump finish (criu-like: "
                   "reads of images still in flight wait) or only once the proxy has exited")
    g = parser.add_argument_group("runs")
    g.add_argument("--runs", type=int, default=3, metavar="N", help="repetitions of each measurement")
    g.add_argument("--skip-socat", action="store_true", help="do not run the socat baseline")
    g.add_argument("--skip-twisted", action="store_true", help="only run the socat baseline")
    g.add_argument("--socat", default=shutil.which("socat") or "/usr/bin/socat", help="socat binary")
    g.add_argument("--socat-block", type=parseSize, default=MiB, metavar="SIZE",
                   help="socat -b (its read/write size)")
    g.add_argument("--timeout", type=float, default=300, metavar="SECONDS",
                   help="give up on a run (and kill its processes) after this long")
    g.add_argument("--tmpdir", metavar="DIR",
                   help="where the images and sockets go (default: /dev/shm if it has room, else $TMPDIR)")
    g.add_argument("--keep", action="store_true", help="keep the work directory (images, daemon logs)")
    g = parser.add_argument_group("daemons")
    g.add_argument("--proxy-args", type=shlex.split, default=[], metavar="ARGS",
                   help="extra options appended to the criu-proxy command line, "
                   "e.g. \"--memory-limit 256M --spill-dir /var/tmp\"")
    g.add_argument("--cache-args", type=shlex.split, default=[], metavar="ARGS",
                   help="extra options appended to the criu-cache command line")
    g.add_argument("--profile", metavar="DIR",
                   help="run both daemons under cProfile (twistd --profiler=cprofile --savestats), "
                   "write DIR/criu-{proxy,cache}-runN.pstats and print their top functions "
                   "(slows the daemons: the numbers are then not comparable)")
    g.add_argument("--py-spy", metavar="DIR",
                   help="sample both daemons with py-spy (if installed) into "
                   "DIR/criu-{proxy,cache}-runN.txt (collapsed stacks) and print their top frames")
    g.add_argument("--py-spy-rate", type=int, default=250, metavar="HZ", help="py-spy samples per second")
    g.add_argument("--py-spy-native", action="store_true",
                   help="py-spy --native (C frames too; pauses the daemons at each sample)")
    g.add_argument("--attach", metavar="COMMAND",
                   help="run COMMAND next to each daemon once it is ready; {pid}, {name} "
                   "(criu-proxy/criu-cache) and {run} are replaced, e.g. "
                   "\"perf record -e cpu-clock -g -o /tmp/{name}-{run}.perf -p {pid}\" "
                   "(it should exit when the daemon does)")
    g.add_argument("--top", type=int, default=20, metavar="N", help="functions listed per profile")
    g = parser.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", help="also write the final JSON line to FILE")
    args = parser.parse_args(argv)
    for name in ("large", "small"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative")
    if args.large * args.large_size + args.small * args.small_size <= 0:
        parser.error("the image set is empty")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.skip_socat and args.skip_twisted:
        parser.error("nothing to run")
    if not args.skip_socat and not os.access(args.socat, os.X_OK):
        parser.error(f"socat not found at {args.socat} (apt-get install socat, or --skip-socat)")
    return args


def _terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt()


def main(argv: Sequence[str] | None = None) -> int:
    args = parseArguments(argv)
    args.revision = gitRevision()
    images: list[Image] = []
    total = args.large * args.large_size + args.small * args.small_size
    tempRoot = pickTempRoot(args.tmpdir, total)
    pySpy = None
    if args.py_spy:
        pySpy = findPySpy()
        if pySpy is None:
            warn("--py-spy: py-spy is not installed (pip install py-spy); not sampling")
        else:
            os.makedirs(args.py_spy, exist_ok=True)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _terminated)
    workDir = tempfile.mkdtemp(prefix="twisted-criu-bench-", dir=tempRoot)
    twisted: list[TwistedResult] = []
    socats: list[SocatResult] = []
    try:
        say(f"twisted-criu {TWISTED_CRIU_VERSION} ({args.revision}) benchmark: {args.large} x {human(args.large_size)} "
            f"+ {args.small} x {human(args.small_size)} = {total:,} bytes ({human(total)})")
        available = memAvailable()
        if available is not None and available < 3.5 * total:
            warn(f"only {human(available)} of memory available: the images (tmpfs) plus the proxy "
                 f"and the cache (each holding up to {human(total)}) may not fit")
        t = time.perf_counter()
        imagesDir = os.path.join(workDir, "images")
        os.mkdir(imagesDir)
        images = generateImages(imagesDir, args)
        say(f"  images    {len(images)} files generated in {time.perf_counter() - t:.1f} s in {imagesDir}")
        say(f"  client    source io {args.source_io}, large writes "
            f"{'sequential' if args.sequential else 'concurrent'}"
            f"{f' at {human(args.write_rate)}/s each' if args.write_rate else ''}, restore starts after "
            f"{'the dump finish' if args.restore_after == 'dump' else 'the proxy exited'}, "
            f"CRC-32 verification on")
        say(f"  daemons   criu-proxy {shlex.join(args.proxy_args) or '(no extra args)'}; "
            f"criu-cache {shlex.join(args.cache_args) or '(no extra args)'}")
        if args.skip_socat:
            say("  baseline  skipped")
        else:
            socatVersion = versionOf([args.socat, "-V"], r"socat version (\S+)")
            say(f"  baseline  socat {socatVersion} -b{args.socat_block}: UNIX -> TCP -> UNIX (3 hops)")
        twistedVersion = versionOf(
            [sys.executable, "-c", "import twisted; print(twisted.__version__)"], r"(\S+)")
        say(f"  machine   {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"Twisted {twistedVersion}, kernel {platform.release()}")
        if args.profile or pySpy or args.attach:
            say("  NOTE      profiling is on: the daemons run slower; do not compare these numbers")
        say()
        for run in range(1, args.runs + 1):
            say(f"run {run}/{args.runs}")
            if not args.skip_twisted:
                r = runTwisted(run, images, workDir, args, pySpy)
                twisted.append(r)
                say(f"  twisted-criu  {twistedLine(r)}")
            if not args.skip_socat:
                s = runSocat(run, images, workDir, args)
                socats.append(s)
                say(f"  socat         {socatLine(s)}")
        profiles: dict[str, list[str]] = {}
        for run in range(1, args.runs + 1):
            for tap in ("criu-proxy", "criu-cache"):
                if args.profile:
                    path = os.path.join(args.profile, f"{tap}-run{run}.pstats")
                    if os.path.exists(path):
                        profiles[f"cProfile {tap} run {run} ({path}), by own time:"] = \
                            summarizeCProfile(path, args.top)
                if pySpy:
                    path = os.path.join(args.py_spy, f"{tap}-run{run}.txt")
                    if os.path.exists(path):
                        profiles[f"py-spy {tap} run {run} ({path}):"] = summarizePySpy(path, args.top)
        result = report(args, images, tempRoot, twisted, socats, profiles)
        line = json.dumps(result, sort_keys=True)
        if args.json:
            with open(args.json, "w") as f:
                f.write(line + "\n")
        say()
        say(line)
        return 0
    except BenchError as e:
        say()
        say(f"FAILED: {e}")
        return 1
    except KeyboardInterrupt:
        say()
        say("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            say(f"(kept {workDir})")
        else:
            shutil.rmtree(workDir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
