"""
What the example scripts share: run an installed command as an operator
would and keep a transcript of it (the command line, then what it printed),
and pick lines out of a daemon's log.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from typing import Iterable, Sequence

#: The directory of this interpreter's console scripts (twisted-criu,
#: twisted-criu-hook, twistd): the .venv admin/docs builds with.
BIN = os.path.dirname(os.path.abspath(sys.executable))

#: twistd's log line: "TIMESTAMP [namespace#level] message".
_LOG_LINE = re.compile(r"^\S+ \[(?P<namespace>[^\]#]+)#(?P<level>\w+)\] (?P<message>.*)$")


class Transcript:
    """Commands and their output, written as a C{console} block's text."""

    def __init__(self, cwd: str) -> None:
        self.cwd = cwd
        self.lines: list[str] = []

    def run(
        self, argv: Sequence[str], status: int = 0, env: dict[str, str] | None = None
    ) -> str:
        """
        Run C{argv} (its first word a console script of L{BIN}), with
        C{env} added to the environment, record it, and return what it
        printed.

        @raise SystemExit: if it exits with anything but C{status}.
        """
        command = [os.path.join(BIN, argv[0]), *argv[1:]]
        done = subprocess.run(
            command, cwd=self.cwd, env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=120, check=False,
        )
        output = done.stdout + done.stderr
        if done.returncode != status:
            raise SystemExit(
                f"{shlex.join(argv)} exited {done.returncode}, not {status}:\n{output}"
            )
        shown = [f"{name}={shlex.quote(value)}" for name, value in (env or {}).items()]
        self.lines.append("$ " + " ".join([*shown, shlex.join(argv)]))
        self.lines.extend(output.rstrip("\n").splitlines())
        return output

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            f.write("\n".join(self.lines) + "\n")
        self.lines = []


def logLines(path: str, wanted: Iterable[str]) -> list[str]:
    """
    The lines of twistd log C{path} whose message contains one of C{wanted},
    as C{[namespace#level] message} (the timestamp left out).
    """
    patterns = list(wanted)
    found = []
    with open(path) as f:
        for line in f:
            match = _LOG_LINE.match(line.rstrip("\n"))
            if match and any(p in match["message"] for p in patterns):
                found.append(
                    f"[{match['namespace']}#{match['level']}] {match['message']}"
                )
    return found


def writeLines(path: str, lines: Iterable[str]) -> None:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
