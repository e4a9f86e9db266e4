# -*- test-case-name: tests.test_resume -*-
"""
The cache's kept parts: images whose link broke in the middle (link
version 4), kept unpublished for their session for a grace period, so
that the proxy, back on a new link, sends only the rest.

A kept part is an image's writer, never committed: nothing of it is
published or served.  Its bytes stay in the store (and count against its
room) until the proxy resumes it, starts it over, or does not come back
within the grace; or until its session ends.

The proxy's RESUME marker is answered with the kept parts and with the
images the session holds whole (L{heldWhole}), which the proxy need not
send again.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import define
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from twisted_criu import wire
from twisted_criu.interfaces import IImageWriter, ISnapshotRegistry
from twisted_criu.keys import ImageKey, describe

#: How long a kept part waits for its proxy, by default (C{--resume-grace}).
RESUME_GRACE = 60.0


def heldWhole(registry: ISnapshotRegistry) -> list[wire.LinkStatus]:
    """One RESUME_AT with C{images=1} per image C{registry} holds whole, with its size."""
    statuses = []
    for key in registry.keys():
        image = registry.get(key)
        if image is not None:
            statuses.append(
                wire.LinkStatus(
                    wire.LinkStatusKind.RESUME_AT, images=1, size=image.size, name=key[1], snapshotId=key[0]
                )
            )
    return statuses


@define
class _Kept:
    writer: IImageWriter
    timer: IDelayedCall | None


class KeptParts:
    """
    Partly received images by session id and key, each until its grace
    is over.

    @param clock: times the grace.
    @param grace: seconds a part waits for its proxy (0: nothing is kept).
    """

    log = Logger()

    def __init__(self, clock: Any, grace: float = RESUME_GRACE) -> None:
        self._clock = clock
        self.grace = grace
        self._parts: dict[str, dict[ImageKey, _Kept]] = {}

    @property
    def held(self) -> int:
        """Bytes kept, over every session."""
        return sum(kept.writer.size for parts in self._parts.values() for kept in parts.values())

    def keep(self, sessionId: str, key: ImageKey, writer: IImageWriter) -> bool:
        """
        Keep C{writer}, the part of C{key} received before its link broke.
        False if nothing is kept (no grace): the caller discards it.
        """
        if self.grace <= 0:
            return False
        parts = self._parts.setdefault(sessionId, {})
        old = parts.pop(key, None)
        if old is not None:
            self._drop(old)
        timer = self._clock.callLater(self.grace, self._expired, sessionId, key)
        parts[key] = _Kept(writer, timer)
        self.log.warn(
            "kept the {size} bytes received of {image} (session {id}) for {grace} s:"
            " its proxy may resume it",
            size=writer.size,
            image=describe(key),
            id=sessionId,
            grace=f"{self.grace:g}",
        )
        return True

    def statuses(self, sessionId: str) -> list[wire.LinkStatus]:
        """One RESUME_AT per image kept for C{sessionId}."""
        return [
            wire.LinkStatus(
                wire.LinkStatusKind.RESUME_AT, size=kept.writer.size, name=key[1], snapshotId=key[0]
            )
            for key, kept in self._parts.get(sessionId, {}).items()
        ]

    def take(self, sessionId: str, key: ImageKey, offset: int) -> IImageWriter | None:
        """
        A header of C{key} arrived for C{sessionId}: the kept part it
        continues (it had exactly C{offset} bytes).  A part not continued
        (a header with no offset, or another offset) is discarded; with an
        C{offset}, L{None} means the link must be dropped.
        """
        kept = self._pop(sessionId, key)
        if kept is not None and offset and kept.writer.size == offset:
            self.log.info(
                "resuming {image} (session {id}) at byte {offset}",
                image=describe(key),
                id=sessionId,
                offset=offset,
            )
            return kept.writer
        if kept is not None:
            size = kept.writer.size
            if not offset:
                self._discard(sessionId, key, kept, "its proxy sends it from the start", self.log.info)
                return None
            self._drop(kept)
            self.log.error(
                "the proxy resumes {image} (session {id}) at byte {offset}, but {size} bytes of it"
                " are kept: discarded; dropping the link",
                image=describe(key),
                id=sessionId,
                offset=offset,
                size=size,
            )
        elif offset:
            self.log.error(
                "the proxy resumes {image} (session {id}) at byte {offset}, but nothing of it is"
                " kept; dropping the link",
                image=describe(key),
                id=sessionId,
                offset=offset,
            )
        return None

    def discardSession(self, sessionId: str, why: str) -> None:
        """C{sessionId} ended: discard what is kept of it."""
        for key, kept in self._parts.pop(sessionId, {}).items():
            self._discard(sessionId, key, kept, why)

    def clear(self) -> None:
        """The cache stops: discard everything, quietly."""
        parts, self._parts = self._parts, {}
        for each in parts.values():
            for kept in each.values():
                self._drop(kept)

    def _expired(self, sessionId: str, key: ImageKey) -> None:
        kept = self._pop(sessionId, key)
        if kept is None:
            return
        kept.timer = None
        self._discard(sessionId, key, kept, f"its proxy did not come back within {self.grace:g} s")

    def _discard(
        self, sessionId: str, key: ImageKey, kept: _Kept, why: str, log: Callable[..., None] | None = None
    ) -> None:
        """Drop C{kept}, the part of C{key} kept for C{sessionId}, and say why."""
        size = kept.writer.size
        self._drop(kept)
        (log or self.log.warn)(
            "discarded the {size} bytes kept of {image} (session {id}): {why}",
            size=size,
            image=describe(key),
            id=sessionId,
            why=why,
        )

    def _pop(self, sessionId: str, key: ImageKey) -> _Kept | None:
        parts = self._parts.get(sessionId)
        if parts is None:
            return None
        kept = parts.pop(key, None)
        if not parts:
            del self._parts[sessionId]
        if kept is not None and kept.timer is not None and kept.timer.active():
            kept.timer.cancel()
        return kept

    @staticmethod
    def _drop(kept: _Kept) -> None:
        if kept.timer is not None and kept.timer.active():
            kept.timer.cancel()
        kept.writer.abort()
