# -*- test-case-name: tests.test_downtime -*-
"""
The daemons' peak memory during a migration: their resident pages (not
shared memory) plus the memfds and pipes they hold open, where image bytes
live (the proxy keeps criu's pages in pipes; C{VmHWM} counts neither).  A
thread samples it every L{INTERVAL} seconds.
"""

from __future__ import annotations

import os
import threading

from twisted_criu.storage.spill.heldpipes import pending

#: Seconds between samples.  Each costs a few system calls per descriptor
#: the daemons hold (the proxy holds a pipe per MiB: 10-20 ms of CPU for a
#: 512 MiB process); at 0.05 s the sampling slowed a 1 Gbit/s migration
#: down.  The daemons hold a session's images until its restore is
#: confirmed, a plateau of a second or more.
INTERVAL = 0.5


def residentExceptShared(status: str) -> int:
    """C{RssAnon + RssFile} of a C{/proc/PID/status} text, in bytes (mapped memfd pages are counted as memfds)."""
    total = 0
    for line in status.splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            total += int(line.split()[1]) << 10
    return total


def pipeBytes(path: str) -> int:
    """Bytes waiting in the pipe another process has open as C{path} (C{/proc/PID/fd/N})."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return pending(fd)
    finally:
        os.close(fd)


def heldBytes(pid: int) -> int:
    """
    Bytes in memory of the memfds and pipes C{pid} holds open (each once,
    however many descriptors it has).
    """
    directory = f"/proc/{pid}/fd"
    sizes: dict[tuple[int, int | str], int] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        path = os.path.join(directory, name)
        try:
            target = os.readlink(path)
            if target.startswith("/memfd:"):
                info = os.stat(path)
                sizes[info.st_dev, info.st_ino] = info.st_blocks * 512
            elif target.startswith("pipe:") and (0, target) not in sizes:  # (both ends: once)
                sizes[0, target] = pipeBytes(path)
        except OSError:
            continue  # closed meanwhile
    return sum(sizes.values())


def memoryOf(pid: int) -> int:
    """C{pid}'s memory now: resident (not shared) plus its memfds and pipes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return 0
    return residentExceptShared(status) + heldBytes(pid)


class PeakMemory:
    """Samples some processes' L{memoryOf} on a thread until L{stop}: the peaks."""

    def __init__(self, pids: dict[str, int], interval: float = INTERVAL) -> None:
        self._pids = pids
        self._interval = interval
        self.peaks = {name: memoryOf(pid) for name, pid in pids.items()}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stopped.wait(self._interval):
            for name, pid in self._pids.items():
                self.peaks[name] = max(self.peaks[name], memoryOf(pid))

    def stop(self) -> dict[str, int]:
        """Stop sampling (after one last sample): the peak of each, in bytes."""
        self._stopped.set()
        self._thread.join()
        for name, pid in self._pids.items():
            self.peaks[name] = max(self.peaks[name], memoryOf(pid))
        return dict(self.peaks)
