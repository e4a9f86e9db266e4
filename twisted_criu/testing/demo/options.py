# -*- test-case-name: tests.slow.test_demo -*-
"""The demo's command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from twisted_criu import wire
from twisted_criu.testing.criu import PIPE, SEED

DESCRIPTION = """\
Migration demo on this machine.  It starts a twistd criu-cache and a twistd
criu-proxy (--once, linked over TLS on 127.0.0.1 with their own link key),
then migrates a real process with the real criu: a small Python program
holding --size MiB of random memory, dumped with `criu dump --stream
--action-script twisted-criu-hook` into the proxy and restored with `criu
restore --stream -d` from the cache.  It shows the process running again
with its memory intact, and the downtime.  criu comes from --criu,
TWISTED_CRIU_CRIU, admin/get-criu (in a checkout; its first run may build
criu 4.1.1 from source, once) or PATH, and needs root.  Where criu cannot
run (not root, no binary, `criu check` fails) it says so and runs the
synthetic demo instead: criu played by twisted_criu.testing.criu, every
image checked by SHA-256.  Everything binds loopback or UNIX sockets, and
it cleans up.
"""

#: The options that only the synthetic demo has (criu played by the demo).
SYNTHETIC_ONLY = ("images", "protocol", "variant", "snapshot_id")


def parseArguments(argv: Sequence[str] | None, prog: str | None = None) -> argparse.Namespace:
    """The options; exits 2 with a one-line error on a bad one."""
    if prog is None:
        name = os.path.basename(sys.argv[0])
        prog = name if name == "twisted-criu-demo" else "python -m twisted_criu.testing.demo"
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument(
        "--synthetic", action="store_true",
        help="criu played by the demo (no criu, no root needed); the options below"
        " marked (synthetic) imply it",
    )
    parser.add_argument(
        "--criu", metavar="PATH",
        help="the criu binary (default: TWISTED_CRIU_CRIU, admin/get-criu, or PATH)",
    )
    parser.add_argument(
        "--size", type=float, default=64, metavar="MIB",
        help="MiB of memory the process holds; (synthetic) size of pages-1.img (default: 64)",
    )
    parser.add_argument(
        "--images", metavar="DIR",
        help="(synthetic) send the files of this image directory instead of a synthetic set",
    )
    parser.add_argument(
        "--snapshot-id",
        help="(synthetic) the -D string criu would be given with --remote (default: snap1)",
    )
    parser.add_argument(
        "--protocol", choices=("remote", "stream"),
        help="(synthetic) criu's side: remote (criu-dev --remote: img-proxy.sock / "
        "img-cache.sock, one connection per image) or stream (released "
        "criu --stream: streamer-capture.sock / streamer-serve.sock); "
        "default: remote",
    )
    parser.add_argument(
        "--variant", choices=(PIPE, SEED),
        help="(synthetic) --remote only: pipe (criu-dev 2020, image bytes through "
        "SCM_RIGHTS pipes) or seed (2015, bytes on the socket); default: pipe",
    )
    parser.add_argument(
        "--memory-limit", metavar="SIZE",
        help="passed to both daemons: image bytes held in memory before "
        "spilling to disk, e.g. 16M (default: the daemons' default)",
    )
    parser.add_argument(
        "--timeout", type=float, default=120, metavar="SECONDS",
        help="give up if the migration takes longer (default: 120; getting criu is not counted)",
    )
    parser.add_argument(
        "--keep", action="store_true",
        help="keep the work directory (daemon and criu logs, images)",
    )
    args = parser.parse_args(argv)
    given = [f"--{name.replace('_', '-')}" for name in SYNTHETIC_ONLY if getattr(args, name) is not None]
    if args.size < 0:
        parser.error("--size must not be negative")
    if args.images is not None and not os.path.isdir(args.images):
        parser.error(f"--images: {args.images} is not a directory")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.snapshot_id is not None:
        try:
            wire.checkName(args.snapshot_id)
        except Exception as e:
            parser.error(f"--snapshot-id: {e}")
    if args.criu and (args.synthetic or given):
        parser.error(f"--criu runs the real demo; {given[0] if given else '--synthetic'} is for the synthetic one")
    # Why the run is synthetic (None: the real demo, if criu can run).
    args.syntheticBecause = "--synthetic" if args.synthetic else (f"{given[0]} given" if given else None)
    args.synthetic = args.syntheticBecause is not None
    args.snapshot_id = args.snapshot_id or "snap1"
    args.protocol = args.protocol or "remote"
    args.variant = args.variant or PIPE
    return args
