"""
The unit files under C{systemd/}, read as systemd reads them, and their
services run the way systemd would run them, without systemd as PID 1:
the command line of C{ExecStart=} with its specifiers and variables
expanded, its C{Environment=}, C{UMask=}, C{NoNewPrivileges=} and
C{CapabilityBoundingSet=} (through setpriv(1)), and for a socket unit, its
C{ListenStream=} sockets made and handed over by systemd-socket-activate(1)
(in their order, named as systemd names them).  What a mount namespace
does (C{ProtectSystem=} and the like) is not reproduced here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from twisted_criu.testing.processes import TWISTD, dieWithParent, tail

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"

#: What the daemons' units run, as systemd finds it on the unit's PATH.
TWISTD_COMMAND = ["/usr/bin/env", "twistd"]

#: The longest one step (a daemon starting, an image arriving) may take.
STEP = 30.0

#: The numbers of the capabilities the units keep (linux/capability.h).
CAPABILITIES = {"CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_NET_BIND_SERVICE": 10}


class UnitFile:
    """One unit file: its settings, in order, by section."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name
        self.settings: dict[str, list[tuple[str, str]]] = {}
        section = ""
        logical = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not logical and (not line or line[0] in "#;"):
                continue
            if line.endswith("\\"):  # continued on the next line
                logical += line[:-1] + " "
                continue
            line, logical = logical + line, ""
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                self.settings.setdefault(section, [])
                continue
            key, equals, value = line.partition("=")
            if not equals:
                raise ValueError(f"{path}: not a setting: {raw!r}")
            self.settings[section].append((key.strip(), value.strip()))

    def values(self, section: str, key: str) -> list[str]:
        """Every value of C{key}, an empty assignment resetting the list (as systemd does)."""
        found: list[str] = []
        for name, value in self.settings.get(section, []):
            if name == key:
                found = [] if value == "" else found + [value]
        return found

    def value(self, section: str, key: str) -> str | None:
        found = self.values(section, key)
        return found[-1] if found else None

    def instance(self, instance: str) -> str:
        """C{twisted-criu-cache@INSTANCE.service} for this template."""
        stem, suffix = self.name.rsplit(".", 1)
        assert stem.endswith("@"), f"{self.name} is not a template"
        return f"{stem}{instance}.{suffix}"


def unitFiles() -> list[Path]:
    return sorted(p for p in UNITS.iterdir() if p.suffix in (".service", ".socket"))


def unit(name: str) -> UnitFile:
    return UnitFile(UNITS / name)


def escapePath(path: str) -> str:
    """The instance name of C{path}, as the docs say to make it."""
    return subprocess.run(
        ["systemd-escape", "--path", path], check=True, capture_output=True, text=True
    ).stdout.strip()


def expandSpecifiers(text: str, instance: str) -> str:
    """C{%i}, C{%I}, C{%f} and C{%%} of a path-escaped instance."""
    unescaped = subprocess.run(
        ["systemd-escape", "--unescape", "--path", instance], check=True, capture_output=True, text=True
    ).stdout.strip()
    values = {"i": instance, "I": unescaped.lstrip("/"), "f": unescaped, "%": "%"}

    def one(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise ValueError(f"specifier %{match.group(1)} is not reproduced here")
        return values[match.group(1)]

    return re.sub(r"%(.)", one, text)


def environment(service: UnitFile, environmentFile: dict[str, str]) -> dict[str, str]:
    """The service's C{Environment=}, then what C{environmentFile} sets (read later, so it wins)."""
    env: dict[str, str] = {}
    for line in service.values("Service", "Environment"):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = value
    env.update(environmentFile)
    return env


def execStart(service: UnitFile, instance: str, env: dict[str, str]) -> list[str]:
    """
    The command systemd runs for the service: C{$VAR} alone is split into
    words, C{${VAR}} is replaced within a word; twistd is this Python's.
    """
    line = service.value("Service", "ExecStart")
    assert line is not None, f"{service.name} has no ExecStart="
    argv: list[str] = []
    for word in shlex.split(line):
        alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if alone:
            argv += env.get(alone.group(1), "").split()
            continue
        word = expandSpecifiers(word, instance)  # at load time, before the environment
        argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word))
    if argv[: len(TWISTD_COMMAND)] != TWISTD_COMMAND:
        raise AssertionError(f"{service.name} does not run {' '.join(TWISTD_COMMAND)}: {argv}")
    return [sys.executable, "-c", TWISTD, *argv[len(TWISTD_COMMAND) :]]


def privileges(service: UnitFile) -> list[str]:
    """setpriv(1) with the service's C{NoNewPrivileges=} and C{CapabilityBoundingSet=}."""
    wrapper = [shutil.which("setpriv") or "setpriv"]
    if service.value("Service", "NoNewPrivileges") == "yes":
        wrapper.append("--no-new-privs")
    capabilities = " ".join(service.values("Service", "CapabilityBoundingSet")).split()
    if capabilities:
        kept = ",".join("+" + c.removeprefix("CAP_").lower() for c in capabilities)
        wrapper += [f"--bounding-set=-all,{kept}", "--inh-caps=-all"]
    return wrapper + ["--"]


def umask(service: UnitFile) -> int:
    return int(service.value("Service", "UMask") or "0022", 8)


def listenStreams(socketUnit: UnitFile, instance: str) -> list[str]:
    """The socket unit's C{ListenStream=} addresses, in the order the service gets them."""
    return [expandSpecifiers(v, instance) for v in socketUnit.values("Socket", "ListenStream")]


def socketActivate(socketUnit: UnitFile, instance: str, addresses: list[str], env: dict[str, str]) -> list[str]:
    """
    systemd-socket-activate listening on C{addresses} (the unit's, or
    those a drop-in would give) with the names systemd gives them (the
    socket unit's C{FileDescriptorName=}, by default its name), passing
    C{env} to the service: what it runs follows.
    """
    name = socketUnit.value("Socket", "FileDescriptorName") or socketUnit.instance(instance)
    argv = ["systemd-socket-activate"]
    for address in addresses:
        argv += ["--listen", address]
    argv.append("--fdname=" + ":".join([name] * len(addresses)))
    for key, value in env.items():
        argv += ["--setenv", f"{key}={value}"]
    return argv


def daemonEnvironment() -> dict[str, str]:
    """What a daemon started here needs beyond the unit's environment: this checkout, the tests' link key."""
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        "TWISTED_CRIU_LINK_KEY": os.environ["TWISTED_CRIU_LINK_KEY"],
    }


class NotifySocket:
    """Where a C{Type=notify} service says it is ready, as systemd listens for it."""

    def __init__(self, test: SynchronousTestCase, path: str) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(path)
        test.addCleanup(self.socket.close)

    def pending(self) -> bytes | None:
        """A message sent and not yet read, if any."""
        self.socket.settimeout(0)
        try:
            return self.socket.recv(4096)
        except BlockingIOError:
            return None

    def next(self, timeout: float = STEP) -> bytes:
        self.socket.settimeout(timeout)
        try:
            return self.socket.recv(4096)
        except socket.timeout:
            raise AssertionError(f"nothing on NOTIFY_SOCKET within {timeout:g} s") from None


class UnitProcess:
    """
    A service of C{systemd/} run as its unit says, in C{base} (its log:
    C{NAME.log}), with its own C{NOTIFY_SOCKET}; socket-activated when
    C{socketUnit} is given, on C{addresses}.
    """

    def __init__(
        self,
        test: SynchronousTestCase,
        base: str,
        serviceName: str,
        imagesDir: str,
        options: str,
        socketUnit: str | None = None,
        addresses: list[str] | None = None,
    ) -> None:
        self.test = test
        self.service = unit(serviceName)
        self.instance = escapePath(imagesDir)
        role = "CACHE" if "cache" in serviceName else "PROXY"
        self.name = self.service.instance(self.instance)
        self.logPath = os.path.join(base, serviceName.split("@")[0] + ".log")
        self.notify = NotifySocket(test, os.path.join(base, serviceName.split("@")[0] + ".notify"))
        env = environment(self.service, {f"{role}_OPTIONS": options})
        env.update(daemonEnvironment(), NOTIFY_SOCKET=self.notify.path)
        argv = privileges(self.service) + execStart(self.service, self.instance, env)
        if socketUnit is not None:
            socket_ = unit(socketUnit)
            if addresses is None:
                addresses = listenStreams(socket_, self.instance)
            argv = socketActivate(socket_, self.instance, addresses, env) + argv
            env = {"PATH": os.environ["PATH"]}
        mask = umask(self.service)

        def child() -> None:
            os.umask(mask)
            dieWithParent()

        with open(self.logPath, "wb") as log:
            self.process = subprocess.Popen(
                argv, env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=child, start_new_session=True,
            )
        test.addCleanup(self.stop)

    def failure(self, what: str) -> AssertionError:
        return AssertionError(f"{self.name} {what}\n--- {self.logPath} ---\n{tail(self.logPath, 40)}")

    def ready(self) -> None:
        """Wait for READY=1 on its NOTIFY_SOCKET."""
        try:
            message = self.notify.next()
        except AssertionError as e:
            raise self.failure(f"did not say it was ready: {e}") from None
        if message != b"READY=1":
            raise self.failure(f"said {message!r}, not READY=1")

    def checkPrivileges(self) -> None:
        """It runs with the unit's capability bounding set and no new privileges."""
        with open(f"/proc/{self.process.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        allowed = 0
        for name in " ".join(self.service.values("Service", "CapabilityBoundingSet")).split():
            allowed |= 1 << CAPABILITIES[name]
        self.test.assertEqual(int(status["CapBnd"], 16), allowed, self.name)
        self.test.assertEqual(status["NoNewPrivs"].strip(), "1", self.name)

    def command(self) -> list[str]:
        """What the process runs now."""
        with open(f"/proc/{self.process.pid}/cmdline", "rb") as f:
            return [os.fsdecode(a) for a in f.read().split(b"\0") if a]

    def stop(self) -> int | None:
        """
        SIGTERM (what systemctl stop sends); its exit status.  twistd
        ends by raising the signal again, which systemd counts as a clean
        stop (as it does an exit status of 0).
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STEP)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise self.failure("did not stop on SIGTERM")
        return self.process.returncode

    def stoppedCleanly(self) -> None:
        self.test.assertIn(self.stop(), (0, -signal.SIGTERM), f"{self.name}: {self.logPath}")

    def checkLog(self) -> None:
        text = tail(self.logPath, 100000)
        self.test.assertNotIn("Traceback", text, f"{self.name}: {self.logPath}")


def socketModes(paths: list[str]) -> dict[str, int]:
    return {os.path.basename(p): stat.S_IMODE(os.stat(p).st_mode) for p in paths if os.path.exists(p)}
