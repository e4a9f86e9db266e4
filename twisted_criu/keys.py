# -*- test-case-name: tests.test_registry -*-
"""How images are addressed on both daemons, and named in logs."""

from __future__ import annotations

from typing import Tuple

ImageKey = Tuple[str, str]
"""(snapshot_id, name): how images are addressed on both daemons."""


def describe(key: ImageKey) -> str:
    """C{snapshot/name}, or C{name} alone for the empty snapshot id (C{--stream}, C{parent})."""
    snapshotId, name = key
    return f"{snapshotId}/{name}" if snapshotId else name
