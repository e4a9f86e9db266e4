# -*- test-case-name: tests.slow.test_packaging -*-
"""
The images a loopback demo migrates: a synthetic set with criu's names and
typical sizes (random bytes), their SHA-256s, and the order criu writes and
reads them in.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

from attrs import frozen

#: Bytes per read/write when moving an image through the daemons.
CHUNK = 1 << 20

#: A pid that appears in the synthetic image names, as criu names them.
FAKE_PID = 4247

#: The synthetic small images: (name, size) in criu's dump order (see the
#: criu-traces recordings: inventory is always written last).
SMALL_IMAGES: tuple[tuple[str, int], ...] = (
    ("seccomp.img", 12),
    ("files.img", 1385),
    (f"ids-{FAKE_PID}.img", 36),
    ("fdinfo-2.img", 44),
    (f"pagemap-{FAKE_PID}.img", 206),
    # pages-1.img (--size MiB) goes here
    (f"core-{FAKE_PID}.img", 2544),
    (f"mm-{FAKE_PID}.img", 1421),
    (f"fs-{FAKE_PID}.img", 18),
    ("pstree.img", 26),
    ("timens-0.img", 34),
    ("pipes-data.img", 0),  # zero-length images are legal and must round-trip
    ("inventory.img", 44),
)

#: The one image of the synthetic set whose size is chosen (C{--size}).
PAGES_IMAGE = "pages-1.img"


@frozen
class Image:
    """One image file to migrate, and what it must come back as."""

    name: str
    path: str
    size: int
    sha256: str


def sha256File(path: str) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def syntheticNames() -> list[str]:
    """The synthetic set's names in criu's dump order."""
    names = [name for name, _ in SMALL_IMAGES]
    names.insert(names.index(f"pagemap-{FAKE_PID}.img") + 1, PAGES_IMAGE)
    return names


def generateImages(directory: str, pagesMiB: float) -> None:
    """Write a synthetic image set: criu's names and typical sizes, random bytes."""
    pages = (PAGES_IMAGE, int(pagesMiB * (1 << 20)))
    names = list(SMALL_IMAGES)
    names.insert(names.index((f"pagemap-{FAKE_PID}.img", 206)) + 1, pages)
    for name, size in names:
        with open(os.path.join(directory, name), "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, CHUNK))
                f.write(chunk)
                left -= len(chunk)


def dumpOrder(names: Sequence[str]) -> list[str]:
    """criu writes inventory.img last."""
    return sorted(names, key=lambda n: n == "inventory.img")


def restoreOrder(names: Sequence[str]) -> list[str]:
    """criu reads inventory.img first and the pages last."""
    return sorted(
        names, key=lambda n: (n != "inventory.img", n.startswith("pages-"))
    )
