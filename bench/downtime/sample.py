# -*- test-case-name: tests.test_downtime -*-
"""
How well a process's memory compresses: a sample of its resident private
pages (those criu dumps), read through C{/proc/PID/mem}, compressed with
the C{zstd} command at level 1, in blocks of L{BLOCK} compressed
separately, as a link compressing chunk by chunk would.
"""

from __future__ import annotations

import struct
import subprocess
from typing import Iterator

PAGE = 4096
#: Bytes per sampled block.
BLOCK = 1 << 20
#: Bit 63 of a pagemap entry: the page is in RAM.
PRESENT = 1 << 63


def writableMappings(maps: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each private writable mapping in a C{/proc/PID/maps} text, but the special ones."""
    for line in maps.splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        path = fields[5] if len(fields) > 5 else ""
        if fields[1].startswith("rw") and fields[1].endswith("p") and path in ("", "[heap]", "[stack]"):
            yield start, end


def samplePoints(ranges: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """
    Up to C{limit} bytes of (address, length) blocks of at most L{BLOCK},
    spread evenly over C{ranges} as if they were one run of memory.
    """
    total = sum(end - start for start, end in ranges)
    count = max(1, limit // BLOCK)
    step = max(BLOCK, total // count)
    points = []
    for k in range(count):
        virtual = k * step
        for start, end in ranges:
            if virtual < end - start:
                address = start + virtual
                points.append((address, min(BLOCK, end - address)))
                break
            virtual -= end - start
    return points


def residentPages(pid: int, points: list[tuple[int, int]]) -> bytes:
    """The resident pages of C{points} in process C{pid}, concatenated."""
    out = []
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap, open(f"/proc/{pid}/mem", "rb") as mem:
        for address, length in points:
            pages = length // PAGE
            pagemap.seek(address // PAGE * 8)
            entries = struct.unpack(f"<{pages}Q", pagemap.read(pages * 8))
            for index, entry in enumerate(entries):
                if entry & PRESENT:
                    mem.seek(address + index * PAGE)
                    try:
                        out.append(mem.read(PAGE))
                    except OSError:
                        pass
    return b"".join(out)


def zstdRatio(data: bytes, level: int = 1) -> float:
    """Uncompressed / compressed size of C{data} in blocks of L{BLOCK}, with the zstd command."""
    compressed = 0
    for offset in range(0, len(data), BLOCK):
        block = data[offset : offset + BLOCK]
        result = subprocess.run(["zstd", f"-{level}", "-c", "-q"], input=block, capture_output=True, check=True)
        compressed += len(result.stdout)
    return len(data) / compressed if compressed else 0.0


def memoryRatio(pid: int, limit: int = 64 << 20) -> tuple[float, int]:
    """zstd-1 ratio of up to C{limit} bytes of process C{pid}'s resident private memory, and the sample's size."""
    with open(f"/proc/{pid}/maps") as f:
        ranges = list(writableMappings(f.read()))
    data = residentPages(pid, samplePoints(ranges, limit))
    return zstdRatio(data), len(data)
