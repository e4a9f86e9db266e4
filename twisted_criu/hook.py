# -*- test-case-name: tests.test_hook,tests.test_transactions -*-
"""
C{twisted-criu-hook}: criu's C{--action-script} for a migration that never
loses the process::

    criu dump    ... --action-script twisted-criu-hook   (dump host)
    criu restore ... --action-script twisted-criu-hook   (restore host)

criu runs it with no arguments and says why in C{CRTOOLS_SCRIPT_ACTION};
C{CRTOOLS_IMAGE_DIR} is criu's C{-D}, where the daemons' control sockets
are.  At C{post-dump} it waits until the cache has confirmed every image
and exits 0 (criu then kills the dumped tasks); if that cannot be
confirmed it exits 1, and criu resumes them.  At C{pre-restore} it tells
the cache that this restore will be confirmed, at C{post-resume} it
confirms it.  Every other action: exit 0 at once.

It is a plain blocking program on purpose (the standard library's HTTP
client over a UNIX socket): it runs while the dumped process is frozen,
and starts in a fraction of the time a reactor would take.
"""

from __future__ import annotations

# criu runs its action script at every step of a dump or a restore (a
# dozen times), and the process is frozen meanwhile: the actions this hook
# ignores must cost only the interpreter's start, so every other import
# is made where it is needed.
import os
import sys
# (not typing's: importing it costs each call 7 ms; mypy knows the name)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import http.client
    from typing import Any, TextIO

#: Where each action's daemon listens, in criu's images directory.
CONTROL_SOCKETS = {
    "post-dump": "proxy-control.sock",
    "pre-restore": "cache-control.sock",
    "post-resume": "cache-control.sock",
}
#: The environment variables that override those paths.
OVERRIDES = {
    "proxy-control.sock": "TWISTED_CRIU_PROXY_CONTROL",
    "cache-control.sock": "TWISTED_CRIU_CACHE_CONTROL",
}
#: Seconds without a line from the daemon (it sends one a second) before giving up.
SILENCE = 30.0
#: Seconds between the progress lines the hook prints.
PRINT_INTERVAL = 5.0

USAGE = """\
usage: criu dump|restore ... --action-script twisted-criu-hook

criu's action script for twisted-criu (it takes no arguments):
  post-dump    wait until the cache has confirmed every image, exit 0;
               exit 1 if it cannot (criu then resumes the process)
  pre-restore  tell the cache the restore will be confirmed
  post-resume  confirm the restore (the cache may drop the images)
It finds the daemons' control sockets in criu's images directory
(CRTOOLS_IMAGE_DIR): proxy-control.sock, cache-control.sock; set
TWISTED_CRIU_PROXY_CONTROL or TWISTED_CRIU_CACHE_CONTROL to use others.
"""


def unixConnection(path: str, timeout: float) -> http.client.HTTPConnection:
    """
    HTTP to a daemon's control socket at C{path} (imported here: most
    actions need no HTTP at all).
    """
    import http.client
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(path)
            except BaseException:
                sock.close()
                raise
            self.sock = sock

    return UnixConnection("twisted-criu", timeout=timeout)


def controlPath(action: str, environ: dict[str, str], criuPid: int) -> str | None:
    """
    The control socket C{action} talks to, or L{None} if criu's directory
    is unknown.  criu names its directory C{/proc/PID/fd/N}, which it has
    closed by C{post-resume}: C{pre-restore} remembers the real path for it
    (L{rememberedPath}).
    """
    name = CONTROL_SOCKETS[action]
    override = environ.get(OVERRIDES[name])
    if override:
        return override
    if action == "post-resume":
        remembered = rememberedPath(criuPid, forget=True)
        if remembered is not None:
            return remembered
    directory = environ.get("CRTOOLS_IMAGE_DIR")
    if not directory:
        return None
    path = os.path.join(os.path.realpath(directory), name)
    if action == "pre-restore":
        remember(criuPid, path)
    return path


def _stateDirectory() -> str:
    """A directory only this user can write, for what one run of criu's hooks tells the next."""
    import stat
    import tempfile

    base = "/run" if os.geteuid() == 0 and os.path.isdir("/run") else tempfile.gettempdir()
    directory = os.path.join(base, f"twisted-criu-hook-{os.geteuid()}")
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise OSError(f"{directory} is not a private directory of this user")
    return directory


def remember(criuPid: int, path: str) -> None:
    """Keep C{path} for the C{post-resume} run of the same criu (and forget dead criu's)."""
    try:
        directory = _stateDirectory()
        for name in os.listdir(directory):
            pid = name[len("criu-") :]
            if name.startswith("criu-") and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                os.unlink(os.path.join(directory, name))
        target = os.path.join(directory, f"criu-{criuPid}")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(path)
    except OSError:
        pass  # post-resume then tries criu's directory itself


def rememberedPath(criuPid: int, forget: bool) -> str | None:
    try:
        target = os.path.join(_stateDirectory(), f"criu-{criuPid}")
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            path = f.read()
        if forget:
            os.unlink(target)
        return path or None
    except OSError:
        return None


def runHook(action: str, path: str, out: TextIO) -> int:
    """Ask the daemon at C{path} to do C{action}; print what happens; the exit status."""
    daemon = "proxy" if CONTROL_SOCKETS[action].startswith("proxy") else "cache"
    consequence = "; criu resumes the process" if action == "post-dump" else ""
    import http.client
    import json
    import socket
    import time

    started = time.monotonic()

    connection = unixConnection(path, SILENCE)
    try:
        connection.request("POST", f"/hook/{action}", headers={"Connection": "close"})
        response = connection.getresponse()
        result: dict[str, Any] | None = None
        printed = started
        for raw in response:
            value = json.loads(raw)
            if "progress" in value:
                now = time.monotonic()
                if now - printed >= PRINT_INTERVAL:
                    printed = now
                    print(f"twisted-criu-hook: {action}: {value['progress']}", file=out)
                continue
            result = value
    except (OSError, http.client.HTTPException, ValueError) as e:
        why = "no answer for %g s" % SILENCE if isinstance(e, socket.timeout) else str(e) or type(e).__name__
        print(f"twisted-criu-hook: {action}: cannot reach the {daemon} at {path}: {why}{consequence}", file=out)
        return 1
    finally:
        connection.close()
    if result is None:
        print(f"twisted-criu-hook: {action}: the {daemon} closed without an answer{consequence}", file=out)
        return 1
    if not result.get("ok"):
        print(f"twisted-criu-hook: {action}: {result.get('error', 'refused')}{consequence}", file=out)
        return 1
    print(f"twisted-criu-hook: {action}: {_describe(action, result, time.monotonic() - started)}", file=out)
    return 0


def _describe(action: str, result: dict[str, Any], seconds: float) -> str:
    if action == "post-dump":
        return (
            f"the cache holds all {result.get('images')} images ({result.get('bytes')} bytes)"
            f" of session {result.get('session')}; waited {seconds:.2f} s"
        )
    if action == "post-resume":
        return f"restore of session {result.get('session')} confirmed to the cache"
    return "the cache will wait for this restore's confirmation"


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    env = dict(os.environ) if environ is None else environ
    if args:
        print(USAGE, end="", file=sys.stdout if args[0] in ("-h", "--help") else sys.stderr)
        sys.exit(0 if args[0] in ("-h", "--help") else 2)
    action = env.get("CRTOOLS_SCRIPT_ACTION", "")
    if action not in CONTROL_SOCKETS:
        if not action:
            print("twisted-criu-hook: CRTOOLS_SCRIPT_ACTION is not set: it runs as criu's --action-script", file=sys.stderr)
            sys.exit(2)
        sys.exit(0)
    path = controlPath(action, env, os.getppid())
    if path is None:
        print(f"twisted-criu-hook: {action}: CRTOOLS_IMAGE_DIR is not set: it runs as criu's --action-script", file=sys.stderr)
        sys.exit(1)
    sys.exit(runHook(action, path, sys.stderr))
