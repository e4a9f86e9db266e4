# -*- test-case-name: tests.test_sparecores -*-
"""
How many of this machine's cores sat idle between two samples, from
C{/proc/stat}: what C{--compress auto} has to compress with.  Compressing
on cores that criu, TLS and the link already keep busy slows the
migration down, however well the data compresses.
"""

from __future__ import annotations

import os

PROC_STAT = "/proc/stat"


def _idleAndTotal(path: str) -> tuple[int, int, int] | None:
    """Idle and total jiffies of all cores, and how many cores, or L{None} if unreadable."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    lines = text.splitlines()
    if not lines or not lines[0].startswith("cpu "):
        return None
    try:
        fields = [int(x) for x in lines[0].split()[1:9]]
    except ValueError:
        return None
    if len(fields) < 5:
        return None
    cores = sum(1 for line in lines[1:] if line.startswith("cpu")) or os.cpu_count() or 1
    return fields[3] + fields[4], sum(fields), cores  # idle + iowait


class SpareCores:
    """
    Call it for the idle cores (a float) since the last call (or since it
    was made); L{None} where C{/proc/stat} cannot be read or no time passed.
    """

    def __init__(self, path: str = PROC_STAT) -> None:
        self._path = path
        self._last = _idleAndTotal(path)

    def __call__(self) -> float | None:
        now = _idleAndTotal(self._path)
        last, self._last = self._last, now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return max(0.0, now[0] - last[0]) / (now[1] - last[1]) * now[2]
