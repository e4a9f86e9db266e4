# -*- test-case-name: tests.test_downtime -*-
"""
What the benchmark needs on this machine: C{redis-server}, C{socat},
C{zstd}, C{tar}, C{ip} and C{tc} (installed with apt-get when missing, as
C{admin/get-criu} installs its build dependencies), a working criu (as the
tests find it, else from C{admin/get-criu}), and whether this proxy has
C{--compress}.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from twisted_criu.testing.processes import TWISTD, childEnvironment

#: command -> the Debian package that provides it.
PACKAGES = {
    "redis-server": "redis-server",
    "socat": "socat",
    "zstd": "zstd",
    "tar": "tar",
    "ip": "iproute2",
    "tc": "iproute2",
}

ROOT = Path(__file__).resolve().parents[2]


class SetupError(Exception):
    """Something the benchmark needs is missing and could not be installed."""


def missingPackages(which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """The Debian packages whose commands are not on PATH, each once, in order."""
    missing: list[str] = []
    for name, package in PACKAGES.items():
        if which(name) is None and package not in missing:
            missing.append(package)
    return missing


def ensurePackages(say: Callable[[str], None]) -> None:
    """apt-get install the packages whose commands are missing."""
    missing = missingPackages()
    if not missing:
        return
    say(f"installing {' '.join(missing)} with apt-get (no service is started: the benchmark runs redis-server itself)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
        result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0 and argv[1] == "install":
            raise SetupError(f"apt-get install {' '.join(missing)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    still = missingPackages()
    if still:
        raise SetupError(f"still missing after apt-get install: {' '.join(still)}")


def findCriu() -> str:
    """C{TWISTED_CRIU_CRIU}, else a criu on PATH, else what C{admin/get-criu} prints."""
    criu = os.environ.get("TWISTED_CRIU_CRIU") or shutil.which("criu")
    if criu:
        return criu
    result = subprocess.run([str(ROOT / "admin" / "get-criu")], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise SetupError(f"no criu: admin/get-criu failed:\n{result.stderr[-2000:]}")
    return lines[-1]


def proxyHelp() -> str:
    """C{twistd criu-proxy --help}."""
    result = subprocess.run(
        [sys.executable, "-c", TWISTD, "criu-proxy", "--help"],
        env=childEnvironment(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
    )
    return result.stdout


def hasCompress(helpText: str) -> bool:
    """Whether the proxy's help lists C{--compress}."""
    return re.search(r"(^|\s)--compress(=|\s|$)", helpText, re.M) is not None
