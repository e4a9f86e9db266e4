"""
Produce the command output shown in docs/cli.md from a real run.

    .venv/bin/python docs/examples/cli.py [OUTPUT_DIR]

(default OUTPUT_DIR: docs/examples/output, next to this script).  It starts
a real criu-cache with --keep on loopback, in a temporary directory, with a
link key of its own there; writes a small dump directory (a few *.img files
of random bytes: the cache does not look inside images); then runs the
twisted-criu command as an operator would, from that directory, and writes
each command line and what it printed (stdout, then stderr, and a non-zero
exit status) to OUTPUT_DIR/cli-NAME.txt.  Everything shown, timings
included, is what this run measured.  It needs nothing but the project's
Python dependencies.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from twisted_criu.testing.processes import Daemon, childEnvironment, freePort, waitForSockets  # noqa: E402

#: The dump pushed: what criu dump -D would leave, in miniature.
DUMP = {"pages-1.img": 6 << 20, "pagemap-1.img": 4096, "core-1.img": 512, "inventory.img": 64}


def run(work: str, outDir: str, name: str, *argv: str) -> None:
    """Run C{twisted-criu ARGV...} in C{work}; write the session to cli-NAME.txt."""
    done = subprocess.run(
        [sys.executable, "-m", "twisted_criu.cli", *argv],
        cwd=work, env=childEnvironment(), capture_output=True, text=True, timeout=120,
    )
    shown = f"$ twisted-criu {shlex.join(argv)}\n{done.stdout}{done.stderr}"
    if done.returncode:
        shown += f"$ echo $?\n{done.returncode}\n"
    with open(os.path.join(outDir, f"cli-{name}.txt"), "w") as f:
        f.write(shown)
    print(shown, end="")


def main() -> None:
    outDir = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "output"))
    os.makedirs(outDir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cli-example-") as work:
        os.environ["TWISTED_CRIU_LINK_KEY"] = os.path.join(work, "link.key")
        dst = os.path.join(work, "dst")
        dump = os.path.join(work, "dump")
        os.makedirs(dst)
        os.makedirs(dump)
        for image, size in DUMP.items():
            with open(os.path.join(dump, image), "wb") as f:
                f.write(os.urandom(size))
        port = freePort()
        cache = Daemon("criu-cache", work, dst, "cache-control.sock")
        cache.start(["-D", "dst", "--port", str(port), "--keep"], cwd=work)
        try:
            waitForSockets([cache], 30)
            address = ("--address", "127.0.0.1", "--port", str(port))
            run(work, outDir, "push", "push", "dump", *address)
            run(work, outDir, "ls", "ls", "--from", "dst")
            run(work, outDir, "ls-long", "ls", "--from", "dst", "-l")
            run(work, outDir, "pull", "pull", "restored", "--from", "dst")
            run(work, outDir, "drop", "drop", "1", "--from", "dst")
            run(work, outDir, "error-plain-link", "push", "dump", *address, "--plain-link")
            run(work, outDir, "error-refused", "push", "dump", "--address", "127.0.0.1", "--port", str(freePort()))
            run(work, outDir, "error-no-daemon", "ls", "--from", "dump")
            run(work, outDir, "error-usage", "pull", "--from", "dst")
        finally:
            cache.stop()


if __name__ == "__main__":
    main()
