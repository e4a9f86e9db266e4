# -*- test-case-name: tests.slow.test_criu,tests.slow.test_criu_demo -*-
"""
A real criu as child processes, for the demo and the real-criu tests:
L{Criu} runs C{criu dump|restore --stream} (L{CriuRun}), with an
L{ActionScript} that runs C{twisted-criu-hook} (L{HOOK}) and can hold criu
at an action or make one fail; L{findCriu} is the binary the tests use.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from twisted_criu.testing.processes import tailOf, waitUntil

#: criu's action script from the transactional migration: installed beside
#: this interpreter.
HOOK = Path(sys.executable).parent / "twisted-criu-hook"


def findCriu() -> str:
    """The criu to run: C{TWISTED_CRIU_CRIU}, else the one on PATH."""
    criu = os.environ.get("TWISTED_CRIU_CRIU") or shutil.which("criu")
    if not criu:
        raise AssertionError(
            "no criu: run admin/get-criu and set TWISTED_CRIU_CRIU, or use"
            " admin/test --no-real-criu on a machine where criu cannot run"
        )
    return criu



_SCRIPT = """#!/bin/sh
# criu's --action-script (twisted_criu.testing.realcriu).  criu runs it for each
# action, named by CRTOOLS_SCRIPT_ACTION.  It logs the action; with
# $dir/pause-ACTION it waits (telling so with $dir/paused-ACTION) until
# that file is gone; with $dir/fail-ACTION it removes that file and fails
# the action; else it becomes the hook (exec: the hook's parent is criu,
# whose pid it keeps what pre-restore learns under for post-resume).
dir={dir}
hook={hook}
action=${{CRTOOLS_SCRIPT_ACTION:-}}
echo "$action" >>"$dir/actions.log"
if [ -e "$dir/pause-$action" ]; then
    : >"$dir/paused-$action"
    i=0
    while [ -e "$dir/pause-$action" ] && [ "$i" -lt 2400 ]; do
        sleep 0.05
        i=$((i + 1))
    done
fi
if [ -e "$dir/fail-$action" ]; then
    rm -f "$dir/fail-$action"
    echo "$action: failed on purpose" >>"$dir/actions.log"
    exit 1
fi
exec "$hook"
"""


class ActionScript:
    """
    criu's C{--action-script}: logs each action, then runs C{hook}
    (C{twisted-criu-hook}, or C{true} when C{hook} is C{None}); L{pause}
    holds criu at an action (before the hook runs), L{failOnce} fails one
    (instead of running the hook).
    """

    def __init__(self, directory: Path, hook: Path | None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "action-script"
        self.logPath = directory / "actions.log"
        self.path.write_text(
            _SCRIPT.format(dir=shlex.quote(str(directory)), hook=shlex.quote(str(hook or "true")))
        )
        self.path.chmod(0o755)

    def actions(self) -> list[str]:
        """The actions criu ran the script for so far, in order."""
        try:
            text = self.logPath.read_text()
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if line and ":" not in line]

    def pause(self, action: str) -> None:
        (self.directory / f"pause-{action}").touch()

    def failOnce(self, action: str) -> None:
        (self.directory / f"fail-{action}").touch()

    def waitFor(self, action: str, run: CriuRun, timeout: float = 60) -> None:
        """Wait until criu ran the script for C{action}."""

        def seen() -> bool:
            if action in self.actions():
                return True
            if run.process.poll() is not None:
                raise AssertionError(f"criu {run.action} exited ({run.process.returncode}) before {action}")
            return False

        waitUntil(seen, timeout, f"criu {run.action} to reach {action}", interval=0.02)

    def waitPaused(self, action: str, run: CriuRun, timeout: float = 60) -> None:
        """Wait until the script holds criu at C{action}."""

        def paused() -> bool:
            if (self.directory / f"paused-{action}").exists():
                return True
            if run.process.poll() is not None:
                raise AssertionError(
                    f"criu {run.action} exited ({run.process.returncode}) before pausing at {action}"
                )
            return False

        waitUntil(paused, timeout, f"criu {run.action} to pause at {action}", interval=0.02)

    def release(self, action: str) -> None:
        (self.directory / f"pause-{action}").unlink(missing_ok=True)

    def releaseAll(self) -> None:
        for path in self.directory.glob("pause-*"):
            path.unlink(missing_ok=True)

    def describe(self) -> str:
        return tailOf(self.logPath, 40)


class CriuRun:
    """One C{criu dump|restore} child process; its log is C{DIRECTORY/LOG}."""

    def __init__(self, action: str, process: subprocess.Popen[bytes], logPath: Path, outPath: Path) -> None:
        self.action = action
        self.process = process
        self.logPath = logPath
        self.outPath = outPath

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float = 120) -> int:
        """Its exit status; fails if it runs longer than C{timeout} seconds."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"criu {self.action} still runs after {timeout:g} s\n{self.describe()}")

    def logCount(self, text: str) -> int:
        """How many times C{text} is in its log so far."""
        try:
            return self.logPath.read_text(errors="replace").count(text)
        except FileNotFoundError:
            return 0

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def describe(self, lines: int = 25) -> str:
        return tailOf(self.outPath, 10) + tailOf(self.logPath, lines)


class Criu:
    """
    Runs C{criu dump|restore --stream} (logs in the images directory,
    C{-v4}), with C{--action-script} an L{ActionScript} or the path of a
    program (such as L{HOOK}) if given.
    """

    def __init__(self, binary: str, base: Path, actionScript: ActionScript | Path | None = None) -> None:
        self.binary = binary
        self.base = base
        self.actionScript = actionScript
        self.runs: list[CriuRun] = []

    def start(self, action: str, directory: Path, *args: str) -> CriuRun:
        log = f"{action}-{sum(run.action == action for run in self.runs) + 1}.log"
        argv = [self.binary, action, "--stream", *args, "-D", str(directory), "-o", log, "-v4"]
        if isinstance(self.actionScript, ActionScript):
            argv += ["--action-script", str(self.actionScript.path)]
        elif self.actionScript is not None:
            argv += ["--action-script", str(self.actionScript)]
        outPath = self.base / f"criu-{log}.out"
        with open(outPath, "wb") as out:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        run = CriuRun(action, process, directory / log, outPath)
        self.runs.append(run)
        return run

    def dump(self, directory: Path, pid: int) -> CriuRun:
        return self.start("dump", directory, "-t", str(pid))

    def restore(self, directory: Path) -> CriuRun:
        return self.start("restore", directory, "-d")

    def killAll(self) -> None:
        for run in self.runs:
            run.kill()

    def describe(self) -> str:
        return "".join(
            f"criu {run.action} (exit {run.process.returncode}):\n{run.describe()}" for run in self.runs
        )
