# -*- test-case-name: tests.test_storage -*-
"""Spill directories: one private directory per store, and removing those a crashed daemon left."""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil

_PREFIX = "twisted-criu-spill-"
_LOCK = ".lock"


def openSpillFile(directory: str) -> tuple[int, str]:
    """
    A new private file (0600, random name) in C{directory}, for direct I/O
    where the filesystem allows it.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    path = os.path.join(directory, f"{secrets.token_hex(8)}.img")
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600), path
    except OSError:  # EINVAL: no direct I/O here (older tmpfs, some FUSE)
        return os.open(path, flags, 0o600), path


def removeStaleSpillDirs(parent: str) -> list[str]:
    """
    Remove spill directories under C{parent} whose daemon is gone (nobody
    holds their lock); returns the paths removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not name.startswith(_PREFIX) or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            fd = os.open(os.path.join(path, _LOCK), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # not ours, or being created right now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live daemon holds it
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
