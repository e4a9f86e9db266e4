# -*- test-case-name: tests.test_filelimit -*-
"""
Running out of descriptors (C{EMFILE}, C{ENFILE}): how to recognise it and
what to tell the operator.

The daemons raise their soft C{RLIMIT_NOFILE} to the hard limit when they
start (L{twisted_criu.daemons.extras.raiseFileLimit}); what still runs out
fails the image (and the session) that hit it, loudly, with L{advice}.
"""

from __future__ import annotations

import errno
import resource

from twisted.internet.error import ConnectError

#: The errors that mean "no descriptor left", for the process or the system.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})


def _errno(error: BaseException | None) -> int | None:
    if isinstance(error, OSError):
        return error.errno
    if isinstance(error, ConnectError):  # how Twisted reports a failed connect
        return error.osError
    return None


def exhausted(error: BaseException | None) -> bool:
    """Is C{error} a failure to get a descriptor?"""
    return _errno(error) in EXHAUSTED


def advice(error: BaseException | None = None) -> str:
    """
    What ran out and what to do, for a log line: C{"too many open files
    (RLIMIT_NOFILE N): ..."}.  C{ENFILE} (the whole system ran out) says so.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    if _errno(error) == errno.ENFILE:
        return (
            f"too many open files (RLIMIT_NOFILE {limit}): the whole system ran out"
            " (ENFILE); raise fs.file-max or close other programs' files"
        )
    how = "start the daemon with a higher hard limit (ulimit -Hn, LimitNOFILE= in a systemd unit)"
    if soft != hard:
        how = f"raise the soft limit (the hard limit is {hard}), or {how}"
    return f"too many open files (RLIMIT_NOFILE {limit}): {how}, or migrate fewer or smaller processes at once"


def describe(error: BaseException) -> str:
    """C{error} for a log line: L{advice} if it is L{exhausted}, else its own words."""
    if exhausted(error):
        return advice(error)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)
