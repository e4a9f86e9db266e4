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
        }
        if withImages:
            described["images"] = [
                {"snapshot_id": i.snapshotId, "name": i.name, "size": i.size} for i in self.images
            ]
        return described
