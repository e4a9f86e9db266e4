# -*- test-case-name: tests.test_transactions,tests.test_sessions -*-
"""Waiting for the cache's HELLO on the proxy's link (the post-dump hook's SYNC needs it)."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed

from twisted_criu.errors import HookRefused
from twisted_criu.interfaces import ISendingLink

#: How long a new link waits for the cache's HELLO before treating the
#: cache as one of CRIU's C caches (counted from the first header sent).
HELLO_GRACE = 2.0


class HelloWaiters:
    """
    Callers of L{extendedLink} waiting for a link on which the cache said
    HELLO; a cache that never says it on a link that sent images is one of
    CRIU's C caches, which cannot confirm a dump.
    """

    def __init__(self, clock: Any, current: Callable[[], ISendingLink | None]) -> None:
        self._clock = clock
        self._current = current
        self._waiters: list[Deferred[ISendingLink]] = []
        self._checks: list[Any] = []

    def extendedLink(self) -> Deferred[ISendingLink]:
        """The link's connection once the cache said HELLO on it."""
        sender = self._current()
        if sender is not None and not sender.lost and sender.extended:
            return succeed(sender)

        def cancel(d: Deferred[ISendingLink]) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        d: Deferred[ISendingLink] = Deferred(cancel)
        self._waiters.append(d)
        self._checks.append(self._clock.callLater(HELLO_GRACE, self._noHello, d))
        return d

    def hello(self, sender: ISendingLink) -> None:
        """The cache said HELLO on C{sender}."""
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(sender)

    def stop(self) -> None:
        for call in self._checks:
            if call.active():
                call.cancel()
        self._checks = []

    def _noHello(self, d: Deferred[ISendingLink]) -> None:
        self._checks = [c for c in self._checks if c.active()]
        sender = self._current()
        if d.called or sender is None or sender.lost or sender.extended:
            return
        if sender.helloWait(self._clock.seconds()) >= HELLO_GRACE and (
            sender.imagesSent or not sender.idle
        ):
            self._waiters.remove(d)
            d.errback(
                HookRefused(
                    "the cache never said HELLO: it is one of CRIU's C caches, which cannot"
                    " confirm a dump; run criu without twisted-criu-hook"
                )
            )
        else:
            self._checks.append(self._clock.callLater(HELLO_GRACE, self._noHello, d))
