"""
Every mistake an operator makes with C{twisted-criu} gets one line on
standard error (a usage error a second one, pointing at C{--help}) and exit
status 2 (usage) or 1 (anything else); never a traceback.

The real command runs as a subprocess, a few at a time.  The peers it
meets run in this process on loopback: a cache holding the link key, a
C{--plain-link} cache, a cache whose C{--allow-from} leaves this host out,
and servers that drop every connection, stay silent, or close connections
at once.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from typing import Any, NamedTuple

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, DeferredSemaphore, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.test_cli_link import Dropper, PeersMixin, Silent, TurnAway, refusedPort
from tests.test_tls import TLSMigration
from twisted_criu.link.key import loadKey

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Commands run at once (each is a Python process starting up, most of
#: a second of CPU: the whole table takes about 45 s on two cores).
PARALLEL = 4


class Mistake(NamedTuple):
    """A command line, the status it must exit with, what its error says, how soon."""

    argv: tuple[str, ...]
    status: int
    says: str
    within: float | None = None


class Outcome(NamedTuple):
    out: str
    err: str
    status: int
    seconds: float


def commandEnvironment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


@inlineCallbacks
def runCommand(argv: tuple[str, ...]) -> Any:
    """Run C{twisted-criu ARGV...} as a user would; its L{Outcome}."""
    started = reactor.seconds()
    out, err, status = yield getProcessOutputAndValue(
        sys.executable, ["-m", "twisted_criu.cli", *argv], env=commandEnvironment(), path=REPO
    )
    return Outcome(out.decode(), err.decode(), status, reactor.seconds() - started)


class TableMixin:
    """Walks a table of mistakes and reports every row that is wrong."""

    @inlineCallbacks
    def walk(self, table: list[Mistake]) -> Any:
        semaphore = DeferredSemaphore(PARALLEL)
        outcomes = yield DeferredList(
            [semaphore.run(runCommand, mistake.argv) for mistake in table], fireOnOneErrback=True
        )
        wrong = []
        for mistake, (_, outcome) in zip(table, outcomes):
            problem = self.judge(mistake, outcome)
            if problem:
                wrong.append(f"twisted-criu {' '.join(mistake.argv)}: {problem}\n    stderr: {outcome.err!r}")
        if wrong:
            raise AssertionError(f"{len(wrong)} of {len(table)} rows wrong:\n" + "\n".join(wrong))

    def judge(self, mistake: Mistake, outcome: Outcome) -> str | None:
        lines = outcome.err.splitlines()
        argv = mistake.argv
        command = f"twisted-criu {argv[0]}" if argv and argv[0] in _COMMANDS else "twisted-criu"
        if "Traceback" in outcome.err:
            return "a traceback"
        if outcome.status != mistake.status:
            return f"exit status {outcome.status}, not {mistake.status}"
        if len(lines) != (2 if mistake.status == 2 else 1):
            return f"{len(lines)} lines on stderr"
        if not lines[0].startswith(f"{command}: ") or mistake.says not in lines[0]:
            return f"the line does not say {command}: ...{mistake.says}..."
        if mistake.status == 2 and lines[1] != f"({command} --help shows the options)":
            return "no pointer to --help"
        if mistake.within is not None and outcome.seconds > mistake.within:
            return f"took {outcome.seconds:.1f} s, more than {mistake.within:g} s"
        return None


_COMMANDS = ("ls", "pull", "extract", "drop", "push")


class UsageMistakeTests(TableMixin, TestCase):
    """Command lines that are wrong before anything is tried: status 2."""

    timeout = 120

    def test_usageMistakes(self) -> Any:
        base = tempfile.mkdtemp(prefix="cli-")
        self.addCleanup(shutil.rmtree, base, True)
        dump = os.path.join(base, "dump")
        os.makedirs(dump)
        with open(os.path.join(dump, "pages-1.img"), "wb") as f:
            f.write(b"pages")
        missing = os.path.join(base, "missing")
        host = ("--address", "127.0.0.1")
        return self.walk(
            [
                Mistake((), 2, "give a command: ls, pull, extract, drop or push"),
                Mistake(("bogus",), 2, "no command 'bogus': give ls, pull"),
                Mistake(("ls", "--bogus"), 2, "no option --bogus"),
                Mistake(("ls", "--from", "bogus:xyz"), 2, "--from bogus:xyz: Unknown endpoint type: 'bogus'"),
                Mistake(("ls", "--timeout", "soon"), 2, "--timeout: not a number of seconds: 'soon'"),
                Mistake(("pull",), 2, "give DIR: the directory to write the images to"),
                Mistake(("pull", "a", "b"), 2, "unexpected argument 'b' (it takes DIR)"),
                Mistake(("pull", "a", "--session"), 2, "--session needs a value"),
                Mistake(("extract",), 2, "give DIR"),
                Mistake(("drop",), 2, "give SESSION: the session to drop"),
                Mistake(("push", dump), 2, "give the cache: --address HOST (and --port) or --to ENDPOINT"),
                Mistake(("push", dump, *host, "--to", "tcp:host=h:port=1"), 2, "not both"),
                Mistake(("push", dump, *host, "--port", "abc"), 2, "--port: not a port number: 'abc'"),
                Mistake(("push", dump, *host, "--port", "70000"), 2, "--port: port 70000 out of range"),
                Mistake(("push", dump, *host, "--timeout", "0"), 2, "--timeout: not a positive number of seconds"),
                Mistake(("push", missing, *host), 2, f"{missing} is not a directory"),
                Mistake(("push", dump, "--to", "bogus:xyz"), 2, "--to bogus:xyz: Unknown endpoint type: 'bogus'"),
                Mistake(("push", dump, *host, "--link-key", missing), 2, f"--link-key {missing}: no link key there"),
                Mistake(("push", dump, *host, "--tls", "--tls-cacert", missing), 2, f"--tls-cacert {missing}: cannot read it"),
                Mistake(("push", dump, *host, "--plain-link", "--tls"), 2, "--plain-link and --tls: give one"),
            ]
        )


class RuntimeMistakeTests(TableMixin, PeersMixin, TestCase):
    """Command lines that fail when tried: status 1, and soon."""

    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.keyed = TLSMigration(self)
        yield self.keyed.startCache()
        self.plain = TLSMigration(self)
        yield self.plain.startCache("--plain-link")
        self.fenced = TLSMigration(self)
        yield self.fenced.startCache("--allow-from", "192.0.2.1")
        self.servers = {
            name: self.startServer(protocol)
            for name, protocol in (("dropper", Dropper), ("silent", Silent), ("away", TurnAway))
        }

    def test_runtimeMistakes(self) -> Any:
        base = self.keyed.base
        dump = os.path.join(base, "dump")
        os.makedirs(dump)
        with open(os.path.join(dump, "pages-1.img"), "wb") as f:
            f.write(os.urandom(1 << 16))
        empty = os.path.join(base, "empty")
        os.makedirs(empty)
        stale = os.path.join(base, "stale.sock")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(stale)  # a daemon that is gone left its socket
        otherKey = os.path.join(base, "other.key")
        loadKey(otherKey, create=True)
        target = os.path.join(base, "pulled")
        refused = str(refusedPort())
        keyed, plain = str(self.keyed.port), str(self.plain.port)
        dropper, silent, away = (str(self.servers[n]) for n in ("dropper", "silent", "away"))
        local = ("--address", "127.0.0.1")
        return self.walk(
            [
                Mistake(("ls", "--from", os.path.join(base, "missing")), 1, "no such socket or directory"),
                Mistake(("ls", "--from", empty), 1, f"--from {empty}: no control socket"),
                Mistake(("ls", "--from", stale), 1, "connection refused (is the daemon still running?)"),
                Mistake(("ls", "--from", f"tcp:127.0.0.1:{refused}"), 1, "connection refused"),
                Mistake(("ls", "--from", "tcp:nosuchhost.invalid:80"), 1, "no such host (DNS lookup failed)"),
                Mistake(("ls", "--from", f"tcp:127.0.0.1:{silent}", "--timeout", "1"), 1, "did not answer for 1 s (--timeout)", 15),
                Mistake(("pull", target, "--from", f"tcp:127.0.0.1:{dropper}"), 1, "closed the connection without an answer"),
                Mistake(("pull", target, "--from", self.keyed.dst), 1, "the daemon holds no images"),
                Mistake(("pull", target, "--from", self.keyed.dst, "--session", "9"), 1, "--session 9: no such session"),
                Mistake(("drop", "9", "--from", self.keyed.dst), 1, "no session 9"),
                Mistake(("push", empty, *local, "--plain-link"), 1, f"no *.img files in {empty}"),
                Mistake(("push", dump, *local, "--port", refused, "--timeout", "60"), 1, "refused the connection: is criu-cache running there", 15),
                Mistake(("push", dump, "--address", "nosuchhost.invalid", "--timeout", "60"), 1, "no such host (DNS lookup failed)"),
                Mistake(("push", dump, *local, "--port", plain, "--timeout", "60"), 1, "speaks plain TCP: give --plain-link", 15),
                Mistake(("push", dump, *local, "--port", keyed, "--plain-link", "--timeout", "60"), 1, "speaks TLS: drop --plain-link", 15),
                Mistake(("push", dump, *local, "--port", keyed, "--link-key", otherKey, "--timeout", "60"), 1, "holds a different link key", 15),
                Mistake(("push", dump, *local, "--port", away, "--timeout", "60"), 1, "closes connections from this host at once", 15),
                Mistake(("push", dump, *local, "--port", str(self.fenced.port), "--timeout", "60"), 1, "is this host in its --allow-from?", 15),
                Mistake(("push", dump, *local, "--port", dropper, "--plain-link", "--timeout", "2"), 1, "dropped the link", 15),
                Mistake(("push", dump, *local, "--port", silent, "--timeout", "2"), 1, "within 2 s", 15),
            ]
        )
