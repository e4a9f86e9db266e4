# -*- test-case-name: tests.test_chains -*-
"""What every C{twisted-criu} command shares: its error, options in any order."""

from __future__ import annotations

import sys
from typing import Sequence

from twisted.python import usage

from twisted_criu import __version__


class CommandError(Exception):
    """The command failed; the message says why (no traceback)."""


class AnyOrderOptions(usage.Options):
    """Options and arguments in any order (C{push DIR --address HOST})."""

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"twisted-criu {__version__}")
        sys.exit(0)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        args = list(sys.argv[1:] if options is None else options)
        takesValue = {f"--{name[:-1]}" for name in self.longOpt if name.endswith("=")}
        short = self.shortOpt
        takesValue |= {f"-{c}" for i, c in enumerate(short) if c != ":" and short[i + 1 : i + 2] == ":"}
        flags: list[str] = []
        positional: list[str] = []
        while args:
            arg = args.pop(0)
            if arg == "--":
                positional += args
                break
            if arg.startswith("-") and arg != "-":
                flags.append(arg)
                if arg in takesValue and args:
                    flags.append(args.pop(0))
            else:
                positional.append(arg)
        super().parseOptions(flags + positional)
