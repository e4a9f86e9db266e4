"""
The commands' own help, for the options reference:

    python docs/examples/usage.py OUTPUT_DIR

Writes what C{twistd criu-proxy --help}, C{twistd criu-cache --help},
C{twisted-criu COMMAND --help} and C{twisted-criu-hook --help} print, one
file each (C{criu-proxy.txt}, C{twisted-criu-push.txt}, ...).
"""

from __future__ import annotations

import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from _transcript import Transcript

COMMANDS = {
    "criu-proxy": ["twistd", "criu-proxy", "--help"],
    "criu-cache": ["twistd", "criu-cache", "--help"],
    "twisted-criu": ["twisted-criu", "--help"],
    **{
        f"twisted-criu-{command}": ["twisted-criu", command, "--help"]
        for command in ("ls", "pull", "drop", "push")
    },
    "twisted-criu-hook": ["twisted-criu-hook", "--help"],
}

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/examples/usage.py OUTPUT_DIR")
    def one(name: str) -> None:
        shell = Transcript(scratch)
        shell.run(COMMANDS[name])
        shell.write(os.path.join(sys.argv[1], name + ".txt"))

    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(4) as pool:
        list(pool.map(one, COMMANDS))
