"""
The systemd units under C{systemd/}: each passes C{systemd-analyze
verify}; the socket-activated services find their sockets where their
socket units put them; and real migrations go through services run as
their units say (see L{tests.slow.systemdunits}): a C{criu --remote}
one through a socket-activated cache (systemd-socket-activate) and a
proxy run by its plain unit, a C{criu --stream} one through a
socket-activated proxy and a cache run by its plain unit.  Each daemon
tells C{$NOTIFY_SOCKET} it is ready (C{Type=notify}), and an activated
one leaves its socket files as systemd made them.

Needs Debian's systemd package (systemd-analyze, systemd-escape,
systemd-socket-activate), which admin/test installs if it is missing;
systemd need not be running.  Only loopback addresses are used.
"""

from __future__ import annotations

import configparser
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from twisted_criu.testing.criu import LocalImageClient, StreamClient
from twisted_criu.testing.processes import freePort
from twisted_criu.twistd import cache_tap, proxy_tap

from . import systemdunits as units
from .test_process_failures import shortTempDir

MiB = 1 << 20

#: Every command the tests need, from Debian's systemd package but setpriv (util-linux).
COMMANDS = ("systemd-analyze", "systemd-escape", "systemd-socket-activate", "setpriv")


def requireCommands() -> None:
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        raise AssertionError(
            f"{', '.join(missing)} not found: install Debian's systemd package"
            " (apt-get install systemd; admin/test does it when it can)"
        )


def images() -> dict[str, bytes]:
    rng = random.Random(14)
    return {
        "inventory.img": rng.randbytes(300),
        "pages-1.img": rng.randbytes(3 * MiB + 17),
        "core-1.img": rng.randbytes(4096),
        "empty.img": b"",
    }


def verify(directory: Path, unitName: str) -> str:
    """What C{systemd-analyze verify} says about C{unitName} in C{directory} (empty if all is well)."""
    result = subprocess.run(
        ["systemd-analyze", "verify", str(directory / unitName)],
        capture_output=True, text=True, timeout=60,
    )
    said = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and not said:
        said = f"exit status {result.returncode}"
    return said


class VerifyTests(SynchronousTestCase):
    instance = "var-lib-criu-migration"

    def setUp(self) -> None:
        requireCommands()
        self.directory = Path(shortTempDir(self))
        for path in units.unitFiles():
            shutil.copy(path, self.directory)

    def test_everyUnitVerifies(self) -> None:
        """systemd-analyze verify finds nothing to say about any unit (warnings included)."""
        found = units.unitFiles()
        self.assertEqual(len(found), 6, [p.name for p in found])
        complaints = {}
        for path in found:
            name = units.UnitFile(path).instance(self.instance)
            said = verify(self.directory, name)
            if said:
                complaints[name] = said
        self.assertEqual(complaints, {})

    def test_verifyCatchesMistakes(self) -> None:
        """The check above would see a misspelt setting or a missing program."""
        original = (self.directory / "twisted-criu-cache@.service").read_text()
        (self.directory / "twisted-criu-cache@.service").write_text(
            original.replace("ProtectSystem=", "ProtectSystm=")
        )
        self.assertIn("Unknown key", verify(self.directory, f"twisted-criu-cache@{self.instance}.service"))
        (self.directory / "twisted-criu-cache@.service").write_text(
            original.replace("/usr/bin/env twistd", "/nonexistent/twistd")
        )
        self.assertIn("/nonexistent/twistd", verify(self.directory, f"twisted-criu-cache@{self.instance}.service"))


class LayoutTests(SynchronousTestCase):
    def test_activatedServicesTakeTheirSockets(self) -> None:
        """
        Each C{systemd:...:index=N} of an activated service is the N-th
        C{ListenStream=} of its socket unit, which is the socket the
        daemon would make for that option.
        """
        daemons = {"cache": cache_tap.Options, "proxy": proxy_tap.Options}
        for role, options in daemons.items():
            service = units.unit(f"twisted-criu-{role}-activated@.service")
            listen = units.unit(f"twisted-criu-{role}-activated@.socket").values("Socket", "ListenStream")
            expected = {
                "--local": options.socketName,
                "--stream-local": options.streamSocketName,
                "--control": options.controlSocketName,
            }
            command = service.value("Service", "ExecStart") or ""
            taken = {
                option: int(index)
                for option, index in re.findall(r"(--[a-z-]+) systemd:domain=\S+:index=(\d+)", command)
            }
            self.assertEqual(sorted(taken.values()), list(range(len(listen))), role)
            for option, index in taken.items():
                if option == "--listen":
                    self.assertEqual(listen[index], "127.0.0.1:9996", role)
                else:
                    self.assertEqual(listen[index], f"%f/{expected[option]}", (role, option))
            self.assertEqual(set(taken) - {"--listen"}, set(expected), role)

    def test_unitsShipInPackages(self) -> None:
        """setup.cfg installs every unit under share/twisted-criu/systemd."""
        config = configparser.ConfigParser()
        config.read(units.REPO / "setup.cfg")
        listed = config["options.data_files"]["share/twisted-criu/systemd"].split()
        self.assertEqual(sorted(listed), [f"systemd/{p.name}" for p in units.unitFiles()])


class ActivationTests(SynchronousTestCase):
    def setUp(self) -> None:
        requireCommands()
        self.base = shortTempDir(self)
        self.src = os.path.join(self.base, "src-dir")  # a "-" to escape in the instance name
        self.dst = os.path.join(self.base, "dst-dir")
        os.makedirs(self.src)
        os.makedirs(self.dst)

    def waitForSockets(self, daemon: units.UnitProcess, paths: list[str]) -> None:
        deadline = time.monotonic() + units.STEP
        while not all(os.path.exists(p) for p in paths):
            if daemon.process.poll() is not None:
                raise daemon.failure(f"exited ({daemon.process.returncode}) before listening")
            if time.monotonic() > deadline:
                raise daemon.failure(f"made no {paths} within {units.STEP:g} s")
            time.sleep(0.05)

    def applySocketMode(self, socketUnit: str, paths: list[str]) -> dict[str, int]:
        """
        What systemd does with the socket unit's C{SocketMode=} (which
        systemd-socket-activate cannot do): the files' modes, after.
        """
        mode = int(units.unit(socketUnit).value("Socket", "SocketMode") or "0666", 8)
        for path in paths:
            os.chmod(path, mode)
        modes = units.socketModes(paths)
        self.assertEqual(set(modes.values()), {0o600}, f"{socketUnit}: SocketMode=")
        return modes

    def assertNotStarted(self, daemon: units.UnitProcess) -> None:
        """Still systemd-socket-activate, waiting for a first connection: no daemon yet."""
        self.assertEqual(os.path.basename(daemon.command()[0]), "systemd-socket-activate")
        self.assertIsNone(daemon.notify.pending())

    def test_remoteThroughActivatedCache(self) -> None:
        """
        criu --remote: a proxy run by twisted-criu-proxy@.service reaches a
        cache socket-activated by twisted-criu-cache-activated@.socket on
        its link port (a drop-in's address), which then serves the images
        byte-exact on img-cache.sock.  The cache keeps the socket files as
        systemd made them, when it starts and when it stops.
        """
        port = freePort()
        cacheSocket = units.unit("twisted-criu-cache-activated@.socket")
        addresses = units.listenStreams(cacheSocket, units.escapePath(self.dst))
        self.assertEqual(addresses[0], "127.0.0.1:9996")
        addresses[0] = f"127.0.0.1:{port}"
        cache = units.UnitProcess(
            self, self.base, "twisted-criu-cache-activated@.service", self.dst, "",
            socketUnit="twisted-criu-cache-activated@.socket", addresses=addresses,
        )
        paths = addresses[1:]
        self.waitForSockets(cache, paths)
        modes = self.applySocketMode("twisted-criu-cache-activated@.socket", paths)
        self.assertNotStarted(cache)

        proxy = units.UnitProcess(
            self, self.base, "twisted-criu-proxy@.service", self.src,
            f"--address 127.0.0.1 --port {port}",
        )
        proxy.ready()
        cache.ready()  # activated by the proxy's link
        proxy.checkPrivileges()
        cache.checkPrivileges()
        self.assertIn("criu-cache", cache.command())
        self.assertEqual(units.socketModes(paths), modes)

        sent = images()
        dump = LocalImageClient(os.path.join(self.src, "img-proxy.sock"), timeout=units.STEP)
        dump.pushSnapshotId("snap1")
        for name, data in sent.items():
            dump.write("snap1", name, data)
        dump.finishDump()
        restore = LocalImageClient(addresses[1], timeout=units.STEP)
        self.assertEqual(restore.snapshotIds(), ["snap1"])
        got = {name: restore.read("snap1", name) for name in sent}
        restore.finishRestore()
        self.assertEqual(got, sent)

        cache.stoppedCleanly()
        self.assertEqual(cache.notify.pending(), b"STOPPING=1")
        self.assertEqual(units.socketModes(paths), modes, "the socket files systemd made are still there")
        proxy.stoppedCleanly()
        cache.checkLog()
        proxy.checkLog()

    def test_streamThroughActivatedProxy(self) -> None:
        """
        criu --stream: criu's first connection starts a proxy activated by
        twisted-criu-proxy-activated@.socket, which forwards the images to a
        cache run by twisted-criu-cache@.service; criu restore --stream
        reads them byte-exact.  With C{--once} the proxy exits by itself
        after the session, leaving the socket files for the next one.
        """
        port = freePort()
        cache = units.UnitProcess(
            self, self.base, "twisted-criu-cache@.service", self.dst, f"--port {port}",
        )
        cache.ready()
        proxy = units.UnitProcess(
            self, self.base, "twisted-criu-proxy-activated@.service", self.src,
            f"--address 127.0.0.1 --port {port} --once",
            socketUnit="twisted-criu-proxy-activated@.socket",
        )
        paths = units.listenStreams(units.unit("twisted-criu-proxy-activated@.socket"), proxy.instance)
        self.waitForSockets(proxy, paths)
        modes = self.applySocketMode("twisted-criu-proxy-activated@.socket", paths)
        self.assertNotStarted(proxy)

        sent = images()
        capture = StreamClient(os.path.join(self.src, "streamer-capture.sock"), timeout=units.STEP)
        self.addCleanup(capture.close)
        for name, data in sent.items():
            capture.write(name, data)
        proxy.ready()  # activated by criu's connection
        proxy.checkPrivileges()
        cache.checkPrivileges()
        self.assertIn("criu-proxy", proxy.command())
        self.assertEqual(units.socketModes(paths), modes)
        capture.close()
        serve = StreamClient(os.path.join(self.dst, "streamer-serve.sock"), timeout=units.STEP)
        self.addCleanup(serve.close)
        got = {name: serve.read(name) for name in sent}
        serve.close()
        self.assertEqual(got, sent)

        self.assertEqual(proxy.process.wait(units.STEP), 0, "--once: the proxy exits after its session")
        self.assertEqual(units.socketModes(paths), modes, "the socket files systemd made are still there")
        cache.stoppedCleanly()
        cache.checkLog()
        proxy.checkLog()
