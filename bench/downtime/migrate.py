# -*- test-case-name: tests.slow.test_criu_downtime -*-
"""
One migration of the workload, each way the benchmark compares:

 - L{baseline}: what users do today, C{criu dump -D} into tmpfs, C{tar c |
   socat} over the shaped link into C{socat | tar x} (another tmpfs
   directory), C{criu restore -D} from there;
 - L{throughDaemons}: C{criu dump --stream} into a C{twistd criu-proxy},
   over the shaped link (TLS with a link key, the default) to a C{twistd
   criu-cache}, C{criu restore --stream} from it, both criu commands with
   C{--action-script twisted-criu-hook}, as the demo runs them.

Downtime runs from the start of criu dump to the restored redis's first
PONG; then its C{DEBUG DIGEST} must be the original's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.downtime.memory import PeakMemory
from bench.downtime.netns import Namespace
from bench.downtime.redis import FirstAnswer, RedisClient, RedisServer, killRestored
from twisted_criu.testing.processes import TWISTD, childEnvironment, dieWithParent, tail

#: The link's port inside the namespace (the namespace is ours alone).
LINK_PORT = 9996
#: socat's buffer, as bench/run.py's baseline uses.
SOCAT_BUFFER = 1 << 20


class MigrationFailed(Exception):
    """A step of a migration failed; the message says which, with a log tail."""


@dataclass
class Tools:
    """What a migration runs: binaries, and the flags the proxy is given per mode."""

    criu: str
    redis: str
    hook: Path
    timeout: float = 300.0
    proxyArgs: dict[str, list[str]] = field(default_factory=dict)


def cpuSeconds(pid: int) -> float:
    """User + system CPU seconds of a running process, from C{/proc/PID/stat}."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def waitRusage(process: subprocess.Popen[bytes], timeout: float, what: str) -> float:
    """Reap C{process} (which must exit 0): CPU seconds of it and the children it waited for."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise MigrationFailed(f"{what} still ran after {timeout:g} s")
        time.sleep(0.005)
    if process.returncode != 0:
        raise MigrationFailed(f"{what} exited {process.returncode}")
    return usage.ru_utime + usage.ru_stime


def listensOn(procNetTcp: str, port: int) -> bool:
    """Whether a C{/proc/PID/net/tcp} text has a socket listening on C{port}."""
    for line in procNetTcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            return True
    return False


def listening(pid: int, port: int) -> bool:
    """Whether a TCP socket listens on C{port} in the network namespace of process C{pid}."""
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            return listensOn(f.read(), port)
    except OSError:
        return False


def runCriu(tools: Tools, argv: list[str], directory: Path) -> None:
    result = subprocess.run([tools.criu, *argv], stdin=subprocess.DEVNULL, capture_output=True, timeout=tools.timeout)
    if result.returncode != 0:
        log = directory / argv[argv.index("-o") + 1]
        raise MigrationFailed(
            f"criu {argv[0]} failed (exit {result.returncode}); its log ends:\n{tail(str(log), 15)}"
        )


class Run:
    """One migration's work directory, workload, namespace, and timings."""

    def __init__(self, tools: Tools, namespace: Namespace, directory: Path, workload: RedisServer) -> None:
        self.tools = tools
        self.namespace = namespace
        self.directory = directory
        self.workload = workload
        self.started = 0.0
        self.wire = (0, 0)
        #: Seconds from the start to the end of each step (dump, transfer, restore).
        self.phases: dict[str, float] = {}
        #: Watches for the restored redis's first answer, from the restore's start.
        self.answer: FirstAnswer | None = None

    def mark(self, phase: str) -> None:
        """C{phase} ends now."""
        self.phases[phase] = time.monotonic() - self.started

    def startClock(self) -> None:
        self.wire = (self.namespace.wireBytes(), self.namespace.qdiscBytes() or 0)
        self.started = time.monotonic()

    def finish(self, digest: str) -> dict[str, Any]:
        """Wait for the restored redis; check its data; the downtime and bytes on the wire."""
        if self.answer is None:
            self.answer = FirstAnswer(self.workload.socketPath, self.tools.timeout)
        answered = self.answer.wait()
        downtime = answered - self.started
        client = RedisClient(self.workload.socketPath, timeout=self.tools.timeout)
        try:
            restored = client.digest()
        finally:
            client.close()
        if restored != digest:
            raise MigrationFailed(
                f"the restored redis's DEBUG DIGEST is {restored}, not the data set's {digest}: data lost or changed"
            )
        qdisc = self.namespace.qdiscBytes()
        return {
            "downtime_s": downtime,
            "wire_bytes": self.namespace.wireBytes() - self.wire[0],
            "qdisc_bytes": None if qdisc is None else qdisc - self.wire[1],
            "digest": restored,
            "phases_s": {**self.phases, "answered": downtime},
        }

    def dump(self, *extra: str) -> None:
        src = self.directory / "src"
        runCriu(self.tools, ["dump", *extra, "-t", str(self.workload.pid), "-D", str(src), "-o", "dump.log"], src)
        self.mark("dump")
        self.workload.reap()

    def restore(self, *extra: str) -> None:
        dst = self.directory / "dst"
        # The process serves once criu resumes it, before criu's
        # post-resume scripts run and it exits: watch from the start.
        self.answer = FirstAnswer(self.workload.socketPath, self.tools.timeout)
        try:
            runCriu(self.tools, ["restore", *extra, "-d", "-D", str(dst), "-o", "restore.log"], dst)
        except BaseException:
            self.answer.cancel()
            raise
        self.mark("restore")

    def cleanUp(self) -> None:
        self.workload.kill()
        killRestored(self.workload.pid)


def baseline(run: Run, digest: str) -> dict[str, Any]:
    """C{criu dump -D} to tmpfs, C{tar | socat} over the link, C{criu restore -D}."""
    src, dst = run.directory / "src", run.directory / "dst"
    ns = run.namespace.prefix()
    receiver = subprocess.Popen(
        ns + ["sh", "-c", f"socat -u -b{SOCAT_BUFFER} TCP-LISTEN:{LINK_PORT},bind=127.0.0.1,reuseaddr - | tar x -C '{dst}'"],
        stdin=subprocess.DEVNULL, preexec_fn=dieWithParent,
    )
    sender: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 30
        while not listening(receiver.pid, LINK_PORT):
            if receiver.poll() is not None or time.monotonic() > deadline:
                raise MigrationFailed("the receiving socat did not listen")
            time.sleep(0.01)
        run.startClock()
        run.dump()
        sender = subprocess.Popen(
            ns + ["sh", "-c", f"tar c -C '{src}' . | socat -u -b{SOCAT_BUFFER} - TCP:127.0.0.1:{LINK_PORT}"],
            stdin=subprocess.DEVNULL, preexec_fn=dieWithParent,
        )
        sent = waitRusage(sender, run.tools.timeout, "tar c | socat (sending)")
        received = waitRusage(receiver, run.tools.timeout, "socat | tar x (receiving)")
        run.mark("transfer")
        run.restore()
        result = run.finish(digest)
    finally:
        for process in (sender, receiver):
            if process is not None and process.returncode is None:
                process.kill()
                process.wait()
    result["cpu_s"] = {"sender": sent, "receiver": received}
    return result


class Daemon:
    """A C{twistd -n criu-proxy|criu-cache} in the namespace (C{ip netns exec} keeps its pid)."""

    def __init__(self, run: Run, tapname: str, images: Path, socket: str, args: list[str]) -> None:
        self.tapname = tapname
        self.socketPath = images / socket
        self.logPath = run.directory / f"{tapname}.log"
        self.process = subprocess.Popen(
            run.namespace.prefix()
            + [sys.executable, "-c", TWISTD, "-n", "--pidfile=", f"--logfile={self.logPath}", tapname, *args],
            cwd=run.directory, env=childEnvironment(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(run.directory / f"{tapname}.err", "wb"),
            preexec_fn=dieWithParent, start_new_session=True,
        )

    def ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.socketPath.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise MigrationFailed(f"{self.tapname} did not start; its log ends:\n{tail(str(self.logPath), 15)}")
            time.sleep(0.02)

    def cpu(self) -> float:
        return cpuSeconds(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def throughDaemons(run: Run, digest: str, mode: str) -> dict[str, Any]:
    """C{criu dump --stream} -> criu-proxy -> link -> criu-cache -> C{criu restore --stream}."""
    src, dst = run.directory / "src", run.directory / "dst"
    key = ["--link-key", str(run.directory / "link.key")]
    port = ["--port", str(LINK_PORT)]
    cache = Daemon(run, "criu-cache", dst, "streamer-serve.sock", [*port, "-D", str(dst), *key])
    daemons = [cache]
    try:
        cache.ready(30)
        proxy = Daemon(
            run, "criu-proxy", src, "streamer-capture.sock",
            [*port, "--address", "127.0.0.1", "-D", str(src), *key, *run.tools.proxyArgs.get(mode, [])],
        )
        daemons.append(proxy)
        proxy.ready(30)
        before = [proxy.cpu(), cache.cpu()]
        hook = ["--stream", "--action-script", str(run.tools.hook)]
        peak = PeakMemory({"proxy": proxy.process.pid, "cache": cache.process.pid})
        try:
            run.startClock()
            run.dump(*hook)
            run.restore(*hook)
            result = run.finish(digest)
        finally:
            peaks = peak.stop()
        result["cpu_s"] = {"proxy": proxy.cpu() - before[0], "cache": cache.cpu() - before[1]}
        result["peak_memory_bytes"] = peaks
        result["startup_cpu_s"] = {"proxy": before[0], "cache": before[1]}
        return result
    except MigrationFailed as e:
        logs = "".join(f"\n--- {d.logPath} ---\n{tail(str(d.logPath), 10)}" for d in daemons)
        raise MigrationFailed(f"{e}{logs}") from None
    finally:
        for daemon in daemons:
            daemon.stop()


def becomeSubreaper() -> None:
    """Restored processes (orphaned when criu restore -d exits) become our children, to reap."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

