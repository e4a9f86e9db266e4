# -*- test-case-name: tests.slow.test_criu_demo -*-
"""
The real demo: a real process migrated by a real criu through a real
C{twistd criu-proxy} and C{twistd criu-cache} on this machine.

It starts L{Workload} (a small Python program holding MiB of random memory
that counts and checks its memory's SHA-256 against the one it started
with), dumps it with C{criu dump --stream ... --action-script
twisted-criu-hook} into the proxy, restores it with C{criu restore --stream
-d ...} from the cache, then shows that the same process runs again (its
pid, one unbroken count, memory intact by its own check) and the downtime:
from the start of the dump to the restored process's first count.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from twisted_criu import __version__
from twisted_criu.testing.demo.daemons import DaemonPair
from twisted_criu.testing.demo.findcriu import FoundCriu
from twisted_criu.testing.demo.output import DemoError, Timeout, human, say
from twisted_criu.testing.realcriu import HOOK, Criu, CriuRun
from twisted_criu.testing.workload import Workload, procState

#: Seconds between the workload's counts (a bound on how late the
#: downtime sees the restored process answer).
INTERVAL = 0.05


def hookProgram(workDir: Path) -> Path:
    """
    C{twisted-criu-hook}: the installed one beside this interpreter, else a
    wrapper running L{twisted_criu.hook} with this interpreter.
    """
    if HOOK.exists():
        return HOOK
    wrapper = workDir / "twisted-criu-hook"
    package = Path(__file__).resolve().parents[3]
    wrapper.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={shlex.quote(str(package))}${{PYTHONPATH:+:$PYTHONPATH}} exec {shlex.quote(sys.executable)}"
        " -c 'from twisted_criu.hook import main; main()'\n"
    )
    wrapper.chmod(0o755)
    return wrapper


def hookLines(run: CriuRun) -> list[str]:
    """What C{twisted-criu-hook} printed into criu's log."""
    try:
        text = run.logPath.read_text(errors="replace")
    except OSError:
        return []
    marker = "twisted-criu-hook: "
    return [line[line.index(marker) + len(marker) :] for line in text.splitlines() if marker in line]


def runCriu(run: CriuRun, timeout: float, pair: DaemonPair) -> float:
    """Wait for C{run} to exit 0; its duration in seconds."""
    started = time.monotonic()
    code = run.wait(timeout)
    seconds = time.monotonic() - started
    if code != 0:
        pair.checkAlive(DemoError(f"criu {run.action} failed"))
        raise DemoError(f"criu {run.action} failed (exit {code}); its log ends:\n{run.describe(30)}")
    for line in hookLines(run):
        say(f"  hook      {line}")
    return seconds


def runReal(args: argparse.Namespace, workDir: str, criu: FoundCriu) -> None:
    """The whole real run; raises L{DemoError} on any failure, and cleans up."""
    started = time.monotonic()
    base = Path(workDir)
    src, dst = base / "src", base / "dst"
    src.mkdir()
    dst.mkdir()
    say(f"twisted-criu {__version__} migration demo: a real process, moved by criu {criu.version} through"
        " criu-proxy and criu-cache on this machine")
    say(f"  criu      {criu.path} (from {criu.origin}; criu check passed)")
    say(f"  work dir  {workDir}")

    workload = Workload(base / "process", args.size, interval=INTERVAL)
    extra = [] if args.memory_limit is None else ["--memory-limit", args.memory_limit]
    pair = DaemonPair(workDir, str(src), str(dst), "streamer-capture.sock", "streamer-serve.sock", extra)
    hook = hookProgram(base)
    runner = Criu(criu.path, base, hook)
    try:
        workload.start()
        workload.ready(timeout=min(60.0, args.timeout))
        say(
            f"  process   pid {workload.pid}: {workload.script.name} holds {human(args.size * (1 << 20))} of random"
            f" bytes (sha256 {workload.digest[:16]}) and counts every {INTERVAL:g} s into {workload.counter}"
        )
        pair.start(args.timeout)
        say()

        say(f"dump:    criu dump --stream -t {workload.pid} -D {src} --action-script {hook.name}  ->  criu-proxy")
        dumpStart = time.monotonic()
        dumpSeconds = runCriu(runner.dump(src, workload.pid), args.timeout, pair)
        workload.reap()
        lastCount = workload.last()
        say(f"  criu dump exited 0 after {dumpSeconds:.2f} s; pid {workload.pid} is gone (it had counted to {lastCount})")
        say()

        say(f"restore: criu restore --stream -d -D {dst} --action-script {hook.name}  <-  criu-cache")
        restoreStart = time.monotonic()
        restoreSeconds = runCriu(runner.restore(dst), args.timeout, pair)
        say(f"  criu restore exited 0 after {restoreSeconds:.2f} s")
        answered = workload.waitForCount(lastCount + 1, timeout=30, interval=0.005)
        downtime = answered - dumpStart
        lines = workload.checkRunsOnce(more=3)
        say()

        say(f"running: pid {workload.pid} again (state {procState(workload.pid)}), counting on from {lastCount}:")
        before = ", ".join(str(line.n) for line in lines[max(0, lastCount - 3) : lastCount])
        after = ", ".join(str(line.n) for line in lines[lastCount : lastCount + 3])
        say(f"  counts    {before} | {after} (dump | restore; 1 to {lines[-1].n}, no gap, no repeat)")
        say(
            f"  memory    sha256 {workload.digest[:16]} on all {len(lines)} lines, before and after:"
            f" intact (the process checks it itself)"
        )
        say(
            f"  downtime  {downtime:.2f} s from the start of criu dump to the restored process's first count"
            f" (criu dump {dumpSeconds:.2f} s, criu restore {restoreSeconds:.2f} s,"
            f" first count {answered - restoreStart - restoreSeconds:.2f} s later)"
        )
        say()
        say("daemons (started with --once):")
        pair.waitForExit(timeout=30)
    except AssertionError as e:
        raise DemoError(f"{e}\n{workload.describe()}{runner.describe()}{pair.describe()}") from None
    except Timeout:
        raise DemoError(
            f"the demo did not finish within {args.timeout:g} s (--timeout)\n"
            f"{workload.describe()}{runner.describe()}{pair.describe()}"
        ) from None
    finally:
        runner.killAll()
        pid = workload.pid
        wasRunning = bool(workload.running())
        workload.kill()
        pair.stop()
    if wasRunning:
        say(f"  stopped the restored process (pid {pid})")
    say()
    say(
        f"OK: pid {workload.pid} ({human(args.size * (1 << 20))} of memory) went criu dump --stream -> criu-proxy"
        f" -> TLS -> criu-cache -> criu restore --stream and ran on, memory intact;"
        f" downtime {downtime:.2f} s; whole demo {time.monotonic() - started:.1f} s"
    )
