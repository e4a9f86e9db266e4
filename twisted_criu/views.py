# -*- test-case-name: tests.test_chains -*-
"""What an operator sees of a session and its images: plain values, as JSON."""

from __future__ import annotations

from typing import Any

from attrs import frozen


@frozen
class ImageView:
    """An image as an operator sees it."""

    snapshotId: str
    name: str
    size: int
    #: Bytes of it spilled to disk (past the daemon's --memory-limit).
    spilled: int = 0


@frozen
class SessionView:
    """A session as an operator sees it."""

    id: str
    state: str
    current: bool
    kept: bool
    started: float
    snapshotIds: list[str]
    images: list[ImageView]

    @property
    def bytes(self) -> int:
        return sum(image.size for image in self.images)

    @property
    def spilledBytes(self) -> int:
        return sum(image.spilled for image in self.images)

    def toJSON(self, withImages: bool) -> dict[str, Any]:
        described: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "current": self.current,
            "kept": self.kept,
            "started": self.started,
            "snapshot_ids": self.snapshotIds,
            "image_count": len(self.images),
            "bytes": self.bytes,
            "spilled_bytes": self.spilledBytes,
        }
        if withImages:
            described["images"] = [
                {"snapshot_id": i.snapshotId, "name": i.name, "size": i.size, "spilled": i.spilled}
                for i in self.images
            ]
        return described


@frozen
class StoreView:
    """
    Where a daemon's image bytes are: in memory, or spilled to disk past its
    memory limit (L{None} for a store without one).  Counts every image it
    holds, those still arriving included.
    """

    memoryBytes: int
    spilledBytes: int
    memoryLimit: int | None

    def toJSON(self) -> dict[str, Any]:
        return {
            "memory_bytes": self.memoryBytes,
            "spilled_bytes": self.spilledBytes,
            "memory_limit_bytes": self.memoryLimit,
        }


@frozen
class LinkView:
    """The link's rate limit (C{--rate-limit}) and what it achieves, in bytes per second."""

    rateLimit: float
    burst: int
    achievedRate: float
    #: Bytes the link's sockets took since the daemon started (after TLS).
    sentBytes: int

    def toJSON(self) -> dict[str, Any]:
        return {
            "rate_limit_bytes_per_second": self.rateLimit,
            "burst_bytes": self.burst,
            "achieved_bytes_per_second": round(self.achievedRate, 1),
            "sent_bytes": self.sentBytes,
        }
