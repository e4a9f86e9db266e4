"""
The outputs docs/demo.md shows, from real runs of the demo:

    python docs/examples/demo.py OUTPUT_DIR

(from the root of a checkout, with the interpreter twisted-criu is
installed in, e.g. .venv/bin/python; the docs build runs it).  It runs
what C{./admin/demo} runs once its .venv is set up (C{./admin/demo} execs
C{twisted_criu.testing.demo.main(prog="admin/demo")} with this
interpreter) and writes into OUTPUT_DIR:

  - C{real.txt}: C{./admin/demo}: a real process migrated by the real
    criu.  Where criu cannot run on the building machine (not root, no
    criu, C{criu check} fails) that run is the synthetic demo, and its
    first line says why;
  - C{synthetic.txt}: C{./admin/demo --synthetic --size 16};
  - C{help.txt}: C{./admin/demo --help};
  - C{fallback.txt}: the first lines of a run whose criu does not exist
    (C{TWISTED_CRIU_CRIU=/nonexistent/criu}): the fallback line.

Each run binds loopback and UNIX sockets only and removes its work
directory; a run that fails stops the script with its output.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

#: What ./admin/demo execs once .venv is set up.
DEMO = [sys.executable, "-c", "import sys; from twisted_criu.testing.demo import main; sys.exit(main(prog='admin/demo'))"]


def run(args: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The transcript of C{./admin/demo ARGS} (C{env} added to the environment)."""
    done = subprocess.run(
        [*DEMO, *args],
        # COLUMNS: --help wraps at 80 columns wherever the docs are built.
        env=dict(os.environ, COLUMNS="80", **(env or {})),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    shown = " ".join(f"{name}={shlex.quote(value)}" for name, value in (env or {}).items())
    command = " ".join(filter(None, [shown, shlex.join(["./admin/demo", *args])]))
    if done.returncode != 0:
        raise SystemExit(f"{command} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return [f"$ {command}", *done.stdout.rstrip("\n").splitlines()]


def write(path: str, lines: list[str]) -> None:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(output: str) -> None:
    write(os.path.join(output, "real.txt"), run([]))
    write(os.path.join(output, "synthetic.txt"), run(["--synthetic", "--size", "16"]))
    write(os.path.join(output, "help.txt"), run(["--help"]))
    fallback = run(["--size", "1"], env={"TWISTED_CRIU_CRIU": "/nonexistent/criu"})
    write(os.path.join(output, "fallback.txt"), fallback[:4] + ["..."])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python docs/examples/demo.py OUTPUT_DIR")
    main(sys.argv[1])
