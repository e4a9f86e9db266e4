# -*- test-case-name: tests.test_pacing -*-
"""Pause whatever feeds an image writer while the writer's disk is behind."""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IPushProducer, IReactorFDSet
from twisted.python.failure import Failure

from twisted_criu.flow.pipes import PipeReader
from twisted_criu.interfaces import IImageWriter, IPacedWriter, ISpliceSink


def pauseWhileBehind(writer: IImageWriter, producer: IPushProducer) -> None:
    """
    If C{writer} says its disk is behind, pause C{producer} (a transport, a
    pipe) until it has caught up.  Call it after each write.
    """
    if not IPacedWriter.providedBy(writer):
        return
    caughtUp = writer.whenCaughtUp()
    if caughtUp is None:
        return
    producer.pauseProducing()
    caughtUp.addCallback(lambda _: producer.resumeProducing())


def readPipeInto(
    reactor: IReactorFDSet, fd: int, writer: IImageWriter, ended: Callable[[Failure], None]
) -> PipeReader:
    """
    Read the pipe C{fd} to its end into C{writer} (spliced, if the writer
    can), pausing while the writer's disk is behind.
    """

    def write(data: bytes) -> None:
        writer.write(data)
        pauseWhileBehind(writer, pipe)

    spliceInto: Callable[[int, int], int] | None = None
    if ISpliceSink.providedBy(writer):
        splice = writer.spliceFrom

        def spliced(source: int, count: int) -> int:
            moved = splice(source, count)
            pauseWhileBehind(writer, pipe)
            return moved

        spliceInto = spliced

    pipe = PipeReader(reactor, fd, write, ended, spliceInto=spliceInto)
    return pipe
