"""
What the link's TLS costs, and what the record fast path saves.

One process, one reactor, two ends on loopback: a sender writes SIZE bytes
in 1 MiB writes (as the proxy forwards an image), a receiver hashes nothing
and counts them.  Three ways, each RUNS times, medians printed:

- plain TCP (no TLS at all: the floor);
- TLS 1.3 with the link key through Twisted's own TLSMemoryBIOProtocol;
- the same TLS through twisted_criu.flow._fasttls (what the daemons use).

CPU-seconds per GB are the process's (both ends together); the ratio is the
fast path's against Twisted's TLS in the same run.

    .venv/bin/python bench/tls_records.py [--size 1G] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted_criu.flow._fasttls import FastTLSMemoryBIOFactory  # noqa: E402
from twisted_criu.link.key import loadKey  # noqa: E402
from twisted_criu.twistd.options import parseSize  # noqa: E402

CHUNK = os.urandom(1 << 20)


class Counter(Protocol):
    def __init__(self, size: int, done: Deferred[None]) -> None:
        self.size, self.done, self.received = size, done, 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= self.size and not self.done.called:
            self.done.callback(None)


@implementer(IPushProducer)
class Sender(Protocol):
    """Writes C{size} bytes, 1 MiB at a time, as fast as the transport takes them."""

    def __init__(self, size: int) -> None:
        self.size, self.sent, self.paused = size, 0, False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < self.size:
            self.transport.write(CHUNK)
            self.sent += len(CHUNK)

    def stopProducing(self) -> None:
        self.paused = True


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@inlineCallbacks
def transfer(size: int, wrap: Callable[[Any, bool], Any] | None) -> Any:
    done: Deferred[None] = Deferred()
    server: Any = Factory.forProtocol(lambda: Counter(size, done))
    client: Any = Factory.forProtocol(lambda: Sender(size))
    if wrap is not None:
        server, client = wrap(server, False), wrap(client, True)
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server)
    started, wall = cpu(), time.monotonic()
    protocol = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(client)
    yield done
    seconds, used = time.monotonic() - wall, cpu() - started
    protocol.transport.loseConnection()
    yield port.stopListening()
    return seconds, used


@inlineCallbacks
def main(args: argparse.Namespace) -> Any:
    key = loadKey(os.path.join(tempfile.mkdtemp(), "link.key"), create=True)

    def twistedTLS(factory: Any, isClient: bool) -> Any:
        creator = key.clientCreator() if isClient else key.serverCreator()
        return TLSMemoryBIOFactory(creator, isClient, factory)

    def fastTLS(factory: Any, isClient: bool) -> Any:
        creator = key.clientCreator() if isClient else key.serverCreator()
        return FastTLSMemoryBIOFactory(creator, isClient, factory)

    ways = [("plain TCP", None), ("TLS, Twisted's records", twistedTLS), ("TLS, fast records", fastTLS)]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in ways}
    gb = args.size / 1e9
    for run in range(args.runs):
        for name, wrap in ways:
            seconds, used = yield transfer(args.size, wrap)
            results[name].append((seconds, used))
            print(f"run {run + 1}: {name:24} {gb / seconds:6.3f} GB/s  {used / gb:5.2f} cpu-s/GB", flush=True)
    print(f"\nmedians of {args.runs} runs, {args.size / (1 << 30):.2f} GiB each (both ends in one process):")
    medians = {}
    for name, _ in ways:
        seconds = statistics.median(s for s, _ in results[name])
        perGB = statistics.median(u for _, u in results[name]) / gb
        medians[name] = perGB
        print(f"  {name:24} {gb / seconds:6.3f} GB/s  {perGB:5.2f} cpu-s/GB")
    fast, twisted = medians["TLS, fast records"], medians["TLS, Twisted's records"]
    print(f"  fast records / Twisted's records: {fast / twisted:.2f} of the CPU")
    print(f"  TLS cost over plain TCP: Twisted's {twisted - medians['plain TCP']:.2f}, fast {fast - medians['plain TCP']:.2f} cpu-s/GB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parseSize, default=1 << 30)
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()

    def run() -> None:
        main(options).addErrback(lambda f: f.printTraceback()).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
