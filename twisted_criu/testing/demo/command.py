# -*- test-case-name: tests.slow.test_demo,tests.slow.test_criu_demo -*-
"""
C{admin/demo}: the real demo where criu can run, else the synthetic one
(saying why in one line); a work directory that is always removed (unless
C{--keep}), C{--timeout}, and Ctrl-C or SIGTERM cleaning up.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from types import FrameType
from typing import NoReturn, Sequence

from twisted_criu.testing.demo.findcriu import FoundCriu, NoCriu, locateCriu
from twisted_criu.testing.demo.options import parseArguments
from twisted_criu.testing.demo.output import DemoError, Timeout, say
from twisted_criu.testing.demo.real import runReal
from twisted_criu.testing.demo.synthetic import runSynthetic
from twisted_criu.testing.processes import DaemonError


def _alarm(signum: int, frame: FrameType | None) -> NoReturn:
    raise Timeout()


def _terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt()


def chooseCriu(criu: str | None) -> FoundCriu | None:
    """
    The criu to run, or C{None} (after saying why) for the synthetic demo.

    @raise DemoError: if C{--criu} names one that cannot run.
    """
    try:
        return locateCriu(criu)
    except NoCriu as e:
        if criu:
            raise DemoError(str(e)) from None
        say(f"criu cannot run here ({e}): running the synthetic demo instead (--synthetic skips this check)")
        say()
        return None


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The demo; its exit status (0: it worked)."""
    args = parseArguments(argv, prog)
    previous = signal.signal(signal.SIGTERM, _terminated)
    workDir = None
    try:
        criu = None if args.synthetic else chooseCriu(args.criu)
        workDir = tempfile.mkdtemp(prefix="twisted-criu-demo-")
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, args.timeout)
        if criu is None:
            runSynthetic(args, workDir)
        else:
            runReal(args, workDir, criu)
        return 0
    except (DemoError, DaemonError) as e:
        say()
        say(f"FAILED: {e}")
        return 1
    except Timeout:
        say()
        say(f"FAILED: the demo did not finish within {args.timeout:g} s (--timeout)")
        return 1
    except KeyboardInterrupt:
        say()
        say("interrupted")
        return 130
    except BrokenPipeError:
        # Our reader (| head) went away: stop quietly, still cleaning up.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, previous)
        if workDir is not None:
            if args.keep:
                say(f"(kept {workDir})")
            else:
                shutil.rmtree(workDir, ignore_errors=True)
