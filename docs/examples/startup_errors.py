"""
The mistakes an operator makes starting the daemons, and what each prints:

    python docs/examples/startup_errors.py OUTPUT_DIR

Starts the real C{twistd criu-proxy} or C{twistd criu-cache} once for each
mistake of L{MISTAKES}, in a scratch directory (with a port held busy, a
second daemon on the same C{-D}, bad key and certificate files), checks that
it exits with the status and prints the line L{MISTAKES} expects, and writes
C{OUTPUT_DIR/table.md}: each command as typed and what it printed on
standard error.  In it, C{DIR} stands for the scratch directory, C{PORT}
and C{PID} for that run's port and process numbers.

C{tests/slow/test_startup_errors.py} runs the same mistakes.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from twisted_criu.testing.processes import TWISTD, childEnvironment, dieWithParent  # noqa: E402

#: Seconds the daemons that should fail at once may take to do so, all
#: together (they start at once: 18 Python processes on a loaded machine).
DEADLINE = 120.0


@dataclass
class Mistake:
    """
    One mistake: the daemon and its arguments after C{twistd -n}, the exit
    status, and a regular expression the last line of standard error must
    match (C{{port}} is the busy port, C{{dir}} the directory it runs in;
    for a row not shown, what it prints, the log included, must match it).
    A usage error (status 2) prints the usage line first.
    """

    title: str
    daemon: str
    args: list[str]
    status: int
    expected: str
    twistdArgs: list[str] = field(default_factory=lambda: ["--pidfile="])
    #: Another cache serves C{dst} already.
    served: bool = False
    #: twistd's C{twistd.pid} in the directory names a live process.
    twistdRunning: bool = False
    #: Shown in the table (C{--debug} rows are for the test only).
    shown: bool = True


MISTAKES = [
    Mistake(
        "The link port is in use",
        "criu-cache", ["-D", "dst", "--port", "{port}"], 1,
        r"--port {port}: 127\.0\.0\.1:{port} is in use already \(another daemon\?\): stop it, or give another --port$",
    ),
    Mistake(
        "The metrics port is in use",
        "criu-proxy", ["-D", "src", "--metrics", "tcp:{port}:interface=127.0.0.1"], 1,
        r"--metrics tcp:{port}:interface=127\.0\.0\.1: 127\.0\.0\.1:{port} is in use already .*give another --metrics$",
    ),
    Mistake(
        "A second daemon on the same -D",
        "criu-cache", ["-D", "dst", "--listen", "tcp:0:interface=127.0.0.1"], 1,
        r"-D {dir}/dst: another process \(pid \d+\) serves {dir}/dst/\S+\.sock already: stop it, or give each daemon its own -D$",
        served=True,
    ),
    Mistake(
        "A second twistd started from the same directory (twistd's own --pidfile)",
        "criu-proxy", ["-D", "src"], 1,
        r"twistd --pidfile twistd\.pid: another twistd \(pid \d+\) started from this directory still runs: stop it, or give twistd --pidfile=OTHER\.pid \(--pidfile= for none\) before the subcommand$",
        twistdArgs=[], twistdRunning=True,
    ),
    Mistake(
        "An address of another host",
        "criu-cache", ["-D", "dst", "--address", "192.0.2.1"], 1,
        r"--address 192\.0\.2\.1: 192\.0\.2\.1 is not an address of this host \(cannot listen on 192\.0\.2\.1:9996\): give one of its addresses, or 0\.0\.0\.0 for all$",
    ),
    Mistake(
        "An unknown host to listen on",
        "criu-cache", ["-D", "dst", "--address", "nosuchhost.invalid"], 1,
        r"--address nosuchhost\.invalid: unknown host 'nosuchhost\.invalid' .*or 0\.0\.0\.0 for all$",
    ),
    Mistake(
        "An unknown host for the cache",
        "criu-proxy", ["-D", "src", "--address", "nosuchhost.invalid"], 1,
        r"--address nosuchhost\.invalid: unknown host 'nosuchhost\.invalid': check the name, or give the address$",
    ),
    Mistake(
        "A port that is not a number in an endpoint",
        "criu-cache", ["-D", "dst", "--listen", "tcp:notaport"], 2,
        r"--listen tcp:notaport: not a server endpoint \(.*'notaport'\); e\.g\. tcp:9996:interface=10\.0\.0\.2$",
    ),
    Mistake(
        "An unknown endpoint type",
        "criu-proxy", ["-D", "src", "--connect", "bogus:xyz"], 2,
        r"--connect bogus:xyz: unknown endpoint type 'bogus'; e\.g\. tcp:host=dst:port=9996$",
    ),
    Mistake(
        "A port that is not a number",
        "criu-proxy", ["-D", "src", "--port", "abc"], 2,
        r"--port abc: not a port number \(1 to 65535\)$",
    ),
    Mistake(
        "A size that is not a size",
        "criu-cache", ["-D", "dst", "--memory-limit", "lots"], 2,
        r"--memory-limit lots: not a size \(try 512M or 2G\)$",
    ),
    Mistake(
        "A missing -D directory",
        "criu-proxy", ["-D", "nosuchdir"], 2,
        r"-D nosuchdir: the directory does not exist; create it \(criu is given the same -D\)$",
    ),
    Mistake(
        "A missing --spill-dir",
        "criu-cache", ["-D", "dst", "--spill-dir", "/nonexistent/spill"], 2,
        r"--spill-dir /nonexistent/spill: no such directory; create it \(on the disk meant for spilled images\) or give another$",
    ),
    Mistake(
        "A TLS file that cannot be read",
        "criu-cache", ["-D", "dst", "--tls", "--tls-cacert", "missing.pem", "--tls-cert", "cert.pem", "--tls-key", "key.pem"], 2,
        r"--tls-cacert missing\.pem: cannot read it: No such file or directory$",
    ),
    Mistake(
        "A TLS file that is not PEM",
        "criu-proxy", ["-D", "src", "--tls", "--tls-cacert", "notpem.pem", "--tls-cert", "notpem.pem", "--tls-key", "notpem.pem"], 2,
        r"--tls-cacert notpem\.pem: no PEM certificate in it$",
    ),
    Mistake(
        "A link key others may read",
        "criu-cache", ["-D", "dst", "--link-key", "readable.key"], 2,
        r"--link-key readable\.key: group or others may read or write it \(mode 640\): chmod 600 readable\.key \(or --plain-link for CRIU's C daemons\)$",
    ),
    Mistake(
        "A link key file that is not a key",
        "criu-proxy", ["-D", "src", "--link-key", "garbage.key"], 2,
        r"--link-key garbage\.key: not a twisted-criu link key \(one line of 64 hex digits\); remove it to have a new one generated \(or --plain-link for CRIU's C daemons\)$",
    ),
    Mistake(
        "--debug shows the traceback",
        "criu-cache", ["-D", "dst", "--port", "{port}", "--debug"], 1,
        r"^.*Traceback \(most recent call last\):(.|\n)*StartupError: --port {port}: .* in use already",
        shown=False,
    ),
]


@dataclass
class Outcome:
    """What a mistake printed, made in directory C{path}."""

    mistake: Mistake
    path: str
    port: int
    argv: list[str]
    status: int
    stdout: str
    stderr: str

    def fill(self, text: str, regex: bool = False) -> str:
        directory = re.escape(self.path) if regex else self.path
        return text.replace("{port}", str(self.port)).replace("{dir}", directory)

    def problems(self) -> list[str]:
        """What differs from what L{Mistake} expects (nothing: all is well)."""
        found = []
        mistake = self.mistake
        lines = self.stderr.rstrip("\n").splitlines()
        if self.status != mistake.status:
            found.append(f"exit status {self.status}, not {mistake.status}")
        expected = self.fill(mistake.expected, regex=True)
        if mistake.shown and not (lines and re.search(expected, lines[-1])):
            found.append(f"the last line of stderr does not match {expected!r}")
        if not mistake.shown and not re.search(expected, self.stdout + self.stderr, re.M):
            found.append(f"nothing printed matches {expected!r}")
        if mistake.shown:
            wanted = 2 if mistake.status == 2 else 1
            if len(lines) != wanted:
                found.append(f"{len(lines)} lines on stderr, not {wanted}")
            usage = f"Usage: twistd [twistd options] {mistake.daemon} [options] (see twistd {mistake.daemon} --help)"
            if mistake.status == 2 and lines[:1] != [usage]:
                found.append("no usage line first")
            if "Traceback" in self.stdout + self.stderr:
                found.append("a traceback")
        elif "Traceback" not in self.stdout + self.stderr:
            found.append("no traceback with --debug")
        return found

    def describe(self) -> str:
        return (
            f"{shlex.join(self.argv)} (in {self.path}) exited {self.status}; stderr:\n"
            f"{self.stderr}\nstdout (tail):\n{self.stdout[-2000:]}"
        )

    def shown(self, text: str) -> str:
        """C{text} with this run's directory, port and pids replaced by names."""
        text = text.replace(self.path, "DIR").replace(str(self.port), "PORT")
        return re.sub(r"\(pid \d+\)", "(pid PID)", text)


def _twistd(argv: list[str], cwd: str, env: dict[str, str], output: str) -> subprocess.Popen[bytes]:
    """
    Start C{argv} (C{twistd ...}) with this interpreter's twistd, its
    standard output and error to C{output}C{.out} and C{output}C{.err}.
    """
    with open(f"{output}.out", "wb") as out, open(f"{output}.err", "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-c", TWISTD, *argv[1:]],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            preexec_fn=dieWithParent,
        )


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


class Scratch:
    """
    Where the mistakes are made: a directory of each, with C{src}, C{dst},
    key and certificate files; a TCP port held busy; and what a mistake
    needs around it (a cache serving C{dst}, a live C{twistd.pid}).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.env = childEnvironment()
        self.env["TWISTED_CRIU_LINK_KEY"] = os.path.join(path, "link.key")
        self._holder = socket.socket()
        self._holder.bind(("127.0.0.1", 0))
        self._holder.listen()
        self.port: int = self._holder.getsockname()[1]
        self._daemons: list[subprocess.Popen[bytes]] = []

    def _directory(self, index: int, mistake: Mistake) -> str:
        path = os.path.join(self.path, str(index))
        for name in ("src", "dst"):
            os.makedirs(os.path.join(path, name))
        for name, text, mode in (
            ("readable.key", "0" * 64 + "\n", 0o640),
            ("garbage.key", "not a key\n", 0o600),
            ("notpem.pem", "not PEM\n", 0o600),
            ("cert.pem", "", 0o600),
            ("key.pem", "", 0o600),
        ):
            with open(os.path.join(path, name), "w") as f:
                f.write(text)
            os.chmod(os.path.join(path, name), mode)
        if mistake.twistdRunning:
            with open(os.path.join(path, "twistd.pid"), "w") as f:
                f.write(f"{os.getpid()}\n")
        if mistake.served:
            self._serve(os.path.join(path, "dst"))
        return path

    def _serve(self, directory: str) -> None:
        """Start a cache on C{directory} and wait until it serves criu there."""
        argv = ["twistd", "-n", "--pidfile=", "--logfile=/dev/null", "criu-cache", "-D", directory,
                "--listen", "tcp:0:interface=127.0.0.1"]
        output = os.path.join(directory, "..", "serving")
        daemon = _twistd(argv, directory, self.env, output)
        self._daemons.append(daemon)
        deadline = time.monotonic() + DEADLINE
        while not os.path.exists(os.path.join(directory, "cache-control.sock")):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the cache serving {directory} did not start: {_read(output + '.err')}")
            time.sleep(0.05)

    def runAll(self, mistakes: list[Mistake]) -> list[Outcome]:
        """Make every mistake at once: start each daemon, then wait for each to exit."""
        started = []
        for index, mistake in enumerate(mistakes):
            path = self._directory(index, mistake)
            argv = ["twistd", "-n", *mistake.twistdArgs, mistake.daemon]
            argv += [a.replace("{port}", str(self.port)) for a in mistake.args]
            output = os.path.join(path, "daemon")
            started.append((mistake, path, argv, output, _twistd(argv, path, self.env, output)))
        deadline = time.monotonic() + DEADLINE
        outcomes = []
        for mistake, path, argv, output, process in started:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            outcomes.append(
                Outcome(mistake, path, self.port, argv, process.returncode,
                        _read(output + ".out"), _read(output + ".err"))
            )
        return outcomes

    def close(self) -> None:
        for daemon in self._daemons:
            daemon.terminate()
            daemon.wait(DEADLINE)
        self._holder.close()


def table(outcomes: list[Outcome]) -> str:
    """The Markdown the documentation includes."""
    parts = []
    for outcome in outcomes:
        if outcome.mistake.shown:
            parts.append(
                f"**{outcome.mistake.title}** (exit status {outcome.status}):\n\n"
                "```console\n"
                f"$ {outcome.shown(shlex.join(outcome.argv))}\n"
                f"{outcome.shown(outcome.stderr).rstrip()}\n"
                "```\n"
            )
    return "\n".join(parts)


def runMistakes(mistakes: list[Mistake] = MISTAKES) -> list[Outcome]:
    """Make every mistake, in a scratch directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="startup-errors-") as path:
        scratch = Scratch(path)
        try:
            return scratch.runAll(mistakes)
        finally:
            scratch.close()


def main(output: str) -> int:
    outcomes = runMistakes()
    failed = 0
    for outcome in outcomes:
        problems = outcome.problems()
        if problems:
            failed += 1
            print(f"{outcome.mistake.title}: {'; '.join(problems)}\n{outcome.describe()}", file=sys.stderr)
    with open(os.path.join(output, "table.md"), "w") as f:
        f.write(table(outcomes))
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/examples/startup_errors.py OUTPUT_DIR")
    sys.exit(main(sys.argv[1]))
