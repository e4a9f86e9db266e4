# -*- test-case-name: tests.test_images -*-
"""
Pipes handed over by criu with SCM_RIGHTS, as non-blocking reactor citizens.

A L{PipeReader} is a push producer of the bytes criu writes into a pipe;
a L{PipeWriter} is a consumer that writes into a pipe criu reads.  Both
close their descriptor when done and report how they ended.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Any, Callable

from twisted.internet import abstract, error, main
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu.errors import ProtocolError, StoreFailed
from twisted_criu.flow._fastpath import bufferEmpty
from twisted_criu.interfaces import IKernelSink, IKernelSource

#: How much one read from a pipe may return.
PIPE_READ_SIZE = 1 << 18

#: How much one splice or sendfile may move.
SPLICE_SIZE = 1 << 20

#: The capacity criu's pipes are given (the default is 64 KiB: a reactor
#: round trip, and a wake-up of criu, per 64 KiB moved).
PIPE_SIZE = 1 << 20

_F_GETPIPE_SZ = 1032
_F_SETPIPE_SZ = 1031


def enlargePipe(fd: int, size: int = PIPE_SIZE) -> int:
    """
    Give the pipe C{fd} a capacity of C{size} if it has less, as far as
    the system lets us (an unprivileged user's pipes may not grow past
    C{/proc/sys/fs/pipe-max-size}, nor past its pipe page budget): its
    capacity after.
    """
    try:
        current: int = fcntl.fcntl(fd, _F_GETPIPE_SZ)
        if current >= size:
            return current
        return int(fcntl.fcntl(fd, _F_SETPIPE_SZ, size))
    except OSError:
        try:
            return int(fcntl.fcntl(fd, _F_GETPIPE_SZ))
        except OSError:
            return 0


def checkPipe(fd: int) -> None:
    """
    Refuse a passed descriptor that is not a pipe (a file, a socket, a
    device: nothing criu would pass).

    @raise ProtocolError: if it is not.
    """
    mode = os.fstat(fd).st_mode
    if not stat.S_ISFIFO(mode):
        raise ProtocolError(f"the passed descriptor is not a pipe (mode {mode:#o})")


class PipeReader(abstract.FileDescriptor):
    """
    Read a pipe to EOF, handing every chunk to C{dataReceived}.

    C{ended(reason)} is called once: with
    L{ConnectionDone<twisted.internet.error.ConnectionDone>} at EOF, with
    L{StoreFailed} if C{dataReceived} or C{spliceInto} raised L{OSError}
    (the store could not take the bytes), with another failure if reading
    failed or L{stopProducing} was called.

    If C{spliceInto} is given, it is called instead as C{spliceInto(fd,
    count)} to move up to C{count} bytes out of the pipe without copying them
    through Python (see L{os.splice}); it returns how many moved, 0 at EOF.
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        fd: int,
        dataReceived: Callable[[bytes], None],
        ended: Callable[[Failure], None],
        readSize: int = PIPE_READ_SIZE,
        spliceInto: Callable[[int, int], int] | None = None,
    ) -> None:
        super().__init__(reactor)
        os.set_blocking(fd, False)
        enlargePipe(fd)
        self._fd = fd
        self._dataReceived = dataReceived
        self._spliceInto = spliceInto
        self._ended: Callable[[Failure], None] | None = ended
        self.readSize = readSize
        self.connected = 1
        self.bytesRead = 0
        self.startReading()

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> Any:
        if self._spliceInto is not None:
            return self._spliceSome(self._spliceInto)
        try:
            data = os.read(self._fd, self.readSize)
        except BlockingIOError:
            return None
        except OSError as e:
            return error.ConnectionLost(e.strerror)
        if not data:
            return main.CONNECTION_DONE
        self.bytesRead += len(data)
        try:
            self._dataReceived(data)
        except OSError as e:  # the store could not take it (disk full, no descriptor)
            return StoreFailed(e)
        return None

    def _spliceSome(self, spliceInto: Callable[[int, int], int]) -> Any:
        try:
            moved = spliceInto(self._fd, SPLICE_SIZE)
        except BlockingIOError:
            return None
        except OSError as e:
            return StoreFailed(e)
        if not moved:
            return main.CONNECTION_DONE
        self.bytesRead += moved
        return None

    def writeSomeData(self, data: bytes) -> int:  # pragma: no cover
        raise NotImplementedError("a PipeReader is read-only")

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        ended, self._ended = self._ended, None
        if ended is not None:
            ended(reason)

    def stopProducing(self) -> None:
        """Abandon the pipe (criu sees EPIPE or simply no reader)."""
        if self.connected:
            self.connectionLost(Failure(main.CONNECTION_LOST))

    #: Give up on the pipe at once (both ends of criu's pipes can).
    abandon = stopProducing


@implementer(IKernelSink)
class PipeWriter(abstract.FileDescriptor):
    """
    A consumer writing into a pipe;
    L{loseConnection<twisted.internet.abstract.FileDescriptor.loseConnection>}
    closes it once the buffer is flushed, so the reader sees EOF.

    C{ended(reason)} is called once: with
    L{ConnectionDone<twisted.internet.error.ConnectionDone>} after a clean
    close, with L{ConnectionLost<twisted.internet.error.ConnectionLost>} if
    the reader went away (EPIPE).
    """

    def __init__(
        self, reactor: IReactorFDSet, fd: int, ended: Callable[[Failure], None]
    ) -> None:
        super().__init__(reactor)
        os.set_blocking(fd, False)
        enlargePipe(fd)
        self._fd = fd
        self._ended: Callable[[Failure], None] | None = ended
        self.connected = 1
        self.bytesWritten = 0
        self._source: IKernelSource | None = None
        self._sourceLeft = 0
        self._sourceDone: Deferred[None] | None = None

    def fileno(self) -> int:
        return self._fd

    def sendFile(self, source: IKernelSource, count: int) -> Deferred[None]:
        """
        Copy C{count} bytes from C{source} into the pipe in the kernel, as
        the reader makes room (and the source's disk delivers).  Fires when
        all are in; fails with
        L{ConnectionLost<twisted.internet.error.ConnectionLost>} if the
        reader went away, or L{EOFError} if the source ended early.  Nothing
        may be written meanwhile.
        """
        assert self._source is None and bufferEmpty(self)
        done: Deferred[None] = Deferred()
        if not count:
            done.callback(None)
            return done
        self._source, self._sourceLeft, self._sourceDone = source, count, done
        self.startWriting()
        return done

    def doWrite(self) -> Any:
        if self._source is None:
            return super().doWrite()
        source = self._source
        readable = source.whenReadable()
        if readable is not None:
            self.stopWriting()  # not the pipe: the disk

            def ready(_: None) -> None:
                if self._source is source and self.connected:
                    self.startWriting()

            readable.addCallback(ready)
            return None
        try:
            sent = source.sendfile(self._fd, min(self._sourceLeft, SPLICE_SIZE))
        except BlockingIOError:
            return None
        except OSError as e:
            return error.ConnectionLost(e.strerror)
        if not sent:
            self._endSource(Failure(EOFError(f"source ended {self._sourceLeft} bytes early")))
            return None
        self.bytesWritten += sent
        self._sourceLeft -= sent
        if not self._sourceLeft:
            self._endSource(None)
        return None

    def _endSource(self, failure: Failure | None) -> None:
        done, self._source, self._sourceDone = self._sourceDone, None, None
        self.stopWriting()
        if done is not None:
            if failure is None:
                done.callback(None)
            else:
                done.errback(failure)

    def writeSomeData(self, data: bytes) -> int | BaseException:
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno == errno.EINTR:
                return 0
            return error.ConnectionLost(e.strerror)
        self.bytesWritten += written
        return written

    def _postLoseConnection(self) -> Any:
        return main.CONNECTION_DONE

    def abortConnection(self) -> None:
        """Close now, dropping what is buffered: the reader sees a short file."""
        if self.connected:
            self.connectionLost(Failure(error.ConnectionAborted()))

    #: Give up on the pipe at once (both ends of criu's pipes can).
    abandon = abortConnection

    def doRead(self) -> Any:  # pragma: no cover - never registered for reading
        return None

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        if self._sourceDone is not None:
            self._endSource(Failure(error.ConnectionLost(reason.getErrorMessage())))
        ended, self._ended = self._ended, None
        if ended is not None:
            ended(reason)
