# -*- test-case-name: tests.test_demo_findcriu -*-
"""
Whether the demo can run a real criu here, and which one.

L{locateCriu} returns a L{FoundCriu} or raises L{NoCriu}, whose message is
the one-line reason the demo gives for falling back on the synthetic run:
not root, no binary, or C{criu check} fails.  The binary is C{--criu},
else C{TWISTED_CRIU_CRIU}, else what C{admin/get-criu} provides (in a
checkout: it uses a criu on PATH that passes C{criu check}, or builds
criu 4.1.1 once and caches it), else the C{criu} on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import twisted_criu
from twisted_criu.testing.demo.output import say

#: C{admin/get-criu} of the checkout this package was imported from (absent
#: from an installed wheel).
GET_CRIU = Path(twisted_criu.__file__).resolve().parent.parent / "admin" / "get-criu"

#: The criu version C{admin/get-criu} builds.
CRIU_BUILT = "4.1.1"
#: Seconds C{criu check} may take.
CHECK_TIMEOUT = 120
#: Seconds C{admin/get-criu} may take (it may build criu).
GET_CRIU_TIMEOUT = 1800


class NoCriu(Exception):
    """No criu can run here; the message says why, in one line."""


class FoundCriu(NamedTuple):
    path: str
    #: C{criu --version}'s version, e.g. C{4.1.1}.
    version: str
    #: Where the path came from (C{--criu}, C{TWISTED_CRIU_CRIU}, ...).
    origin: str


def lastLine(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def label(path: str, origin: str) -> str:
    """How a message names C{path}, found through C{origin}."""
    if origin == "--criu":
        return f"--criu {path}"
    if origin == "TWISTED_CRIU_CRIU":
        return f"TWISTED_CRIU_CRIU={path}"
    return f"{path} (from {origin})"


def checkCriu(path: str, origin: str) -> FoundCriu:
    """C{PATH check} passes, or L{NoCriu} says why."""
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise NoCriu(f"{label(path, origin)} is not an executable file")
    try:
        result = subprocess.run(
            [path, "check"], capture_output=True, text=True, timeout=CHECK_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NoCriu(f"criu check did not run with {label(path, origin)}: {e}") from None
    if result.returncode != 0:
        raise NoCriu(
            f"criu check fails with {label(path, origin)} (exit {result.returncode}):"
            f" {lastLine(result.stdout + result.stderr)}"
        )
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    number = next((line.split(":", 1)[1].strip() for line in version.splitlines() if line.startswith("Version:")), "")
    return FoundCriu(path, number or "(unknown version)", origin)


def runGetCriu(getCriu: Path) -> str:
    """
    Run C{admin/get-criu}, showing its own progress lines live (the output
    of apt and make only if it fails).

    @return: the path it printed.
    @raise NoCriu: if it found or built no working criu.
    """
    say(f"criu: {getCriu.parent.name}/{getCriu.name} (a criu on PATH that passes criu check, else criu {CRIU_BUILT} built once)")
    other: list[str] = []
    try:
        process = subprocess.Popen(
            [str(getCriu)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
    except OSError as e:
        raise NoCriu(f"{getCriu} did not run: {e}") from None
    assert process.stderr is not None and process.stdout is not None
    try:
        for line in process.stderr:
            if line.startswith("get-criu:"):
                say(f"  {line.rstrip()}")
                if "get-criu: building" in line:
                    say(
                        "  (this first run installs any missing build dependencies, downloads criu's source and"
                        " compiles it: expect minutes; later runs reuse the binary)"
                    )
            else:
                other.append(line.rstrip())
        out = process.stdout.read()
        code = process.wait(GET_CRIU_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if code != 0 or not out.strip():
        for line in other[-20:]:
            say(f"    {line}")
        raise NoCriu(f"{getCriu.parent.name}/{getCriu.name} found no working criu (exit {code}; its output is above)")
    say()
    return lastLine(out)


def locateCriu(
    explicit: str | None,
    environ: Mapping[str, str] = os.environ,
    euid: int | None = None,
    getCriu: Path = GET_CRIU,
    which: Callable[[str], str | None] = shutil.which,
    runGetCriu: Callable[[Path], str] = runGetCriu,
    check: Callable[[str, str], FoundCriu] = checkCriu,
) -> FoundCriu:
    """
    The criu the real demo runs: C{explicit}, else C{TWISTED_CRIU_CRIU},
    else what C{getCriu} provides (if it exists), else C{criu} on PATH,
    provided it passes C{criu check}.

    @param explicit: C{--criu PATH}, if given.
    @raise NoCriu: if none can run here (the message says why).
    """
    if (os.geteuid() if euid is None else euid) != 0:
        raise NoCriu("not root: criu needs root to checkpoint and restore a process")
    if explicit:
        return check(explicit, "--criu")
    fromEnvironment = environ.get("TWISTED_CRIU_CRIU")
    if fromEnvironment:
        return check(fromEnvironment, "TWISTED_CRIU_CRIU")
    if getCriu.is_file() and os.access(getCriu, os.X_OK):
        return check(runGetCriu(getCriu), f"{getCriu.parent.name}/{getCriu.name}")
    onPath = which("criu")
    if onPath:
        return check(onPath, "PATH")
    raise NoCriu("no criu binary: install criu 3.15 or later (criu check must pass), or set TWISTED_CRIU_CRIU")
