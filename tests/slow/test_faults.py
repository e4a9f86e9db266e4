"""
The fault matrix: a real process migrated by a real criu through
C{twistd criu-proxy} and C{twistd criu-cache}, with criu's action script
C{twisted-criu-hook} making the migration transactional, and one fault
injected at one phase of it.  L{MATRIX} is the table: one test method per
meaningful (fault, phase) cell, whose docstring states the outcome it
expects; L{MEANINGLESS} says why the other pairs are not tested.

Whatever happens, the process must run exactly once afterwards
(L{Workload.checkRunsOnce}: one live process with its pid, its memory
intact, and one unbroken count in its counter file):

  - on the source: criu dump failed (or the hook failed it), so criu
    resumed the process; the cache then holds no restorable session;
  - or on the destination: the restore (or a retry of it) succeeded, and
    the cache's session has left the restorable states.

The phases, and how a fault lands in them:

  - during the dump: criu is stopped (SIGSTOP) once its log says it sent
    a few MiB of pages to the proxy (a 256 MiB workload: its pages image
    is partly written and partly forwarded), the fault is injected, criu
    continues;
  - after the images are written, before delivery: the daemons run in a
    network namespace whose loopback is shaped to 200 Mbit/s (a 256 MiB
    workload takes about 10 s to cross), and the fault lands once criu runs
    its post-dump action and the hook's request is in (the proxy logs that
    the hook waits for the cache to confirm);
  - after delivery, before the restore: criu dump returned 0;
  - during the restore: the action script holds criu restore at
    C{pre-restore} (criu reads from the cache, images partly read, no task
    created yet; the hook runs once criu is let go) or C{post-restore}
    (every image read, the tasks restored but not resumed) while the fault
    lands; "restore fails" fails C{post-restore} (criu then kills the
    restored tasks; a failing C{pre-resume} is ignored by criu).

Needs root, C{ip}, C{tc}, C{ss} and a real criu, as C{tests.slow.test_criu}.
The slow-link cells are skipped if the kernel refuses C{ip netns add}.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from attrs import frozen
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.slow.migration import (
    HOOK,
    RESTORABLE,
    ActionScript,
    Criu,
    CriuRun,
    DaemonProcess,
    NetworkNamespace,
    Workload,
    cutLink,
    findCriu,
    linkConnections,
    restorable,
    sessions,
    waitUntil,
)
from twisted_criu.testing.processes import freePort

#: Both daemons' --timeout: a stalled or lost link is given up after this.
TIMEOUT = 4.0

#: Workload sizes (MiB): small where the phase needs no time, large where
#: the fault must land while images are on their way.
SMALL = 16
LARGE = 256

#: criu dump's log line for each batch of pages (256 pages, 1 MiB) it sends
#: to the proxy, and how many it sends before a during-the-dump fault: the
#: pages image is then partly written, a few MiB of it forwarded, and most
#: of the large workload's memory still to come (criu sends about 100
#: batches a second).
PAGES_SENT = "page-xfer: Transferring pages:"
PAGES_BEFORE_FAULT = 8

#: What the proxy logs once twisted-criu-hook's post-dump request is in:
#: the hook waits for the cache's confirmation.
HOOK_WAITS = "post-dump hook waits for the cache"

#: The slow link of the before-delivery phase (tc tbf on the namespace's lo).
SLOW_LINK = ("200mbit", "1mb", "100ms")


class Fault(Enum):
    PROXY_KILLED = "proxy SIGKILL"
    CACHE_KILLED = "cache SIGKILL"
    CACHE_RESTARTED = "cache restarted"
    LINK_CUT = "link cut"
    RESTORE_FAILS = "restore fails"
    RESTORE_KILLED = "restore killed"


class Phase(Enum):
    DURING_DUMP = "during the dump"
    BEFORE_DELIVERY = "images written, before delivery"
    AFTER_DELIVERY = "after delivery, before the restore"
    DURING_RESTORE = "during the restore"


class Outcome(Enum):
    SOURCE = "on the source"
    DESTINATION = "on the destination"
    RETRY = "on the destination after a retried restore"


@frozen
class Cell:
    """
    One test: C{fault} injected in C{phase} must end with C{outcome}.

    @ivar name: the test method's name.
    @ivar doc: its docstring: what is expected, and why.
    @ivar at: for restore faults, the action at which criu restore is held.
    @ivar needsHook: the outcome depends on C{twisted-criu-hook}.
    """

    fault: Fault
    phase: Phase
    outcome: Outcome
    name: str
    doc: str
    at: str = "pre-restore"
    needsHook: bool = True


MATRIX = [
    # -- during the dump ------------------------------------------------------
    Cell(
        Fault.PROXY_KILLED, Phase.DURING_DUMP, Outcome.SOURCE, "test_proxyKilled_duringDump",
        "Proxy SIGKILLed while criu writes pages: criu's stream breaks, criu dump"
        " fails and resumes the process: it runs on the source; the cache holds no"
        " restorable session.",
        needsHook=False,
    ),
    Cell(
        Fault.CACHE_KILLED, Phase.DURING_DUMP, Outcome.SOURCE, "test_cacheKilled_duringDump",
        "Cache SIGKILLed while criu writes pages: nothing can confirm the images,"
        " so the post-dump hook fails (after --timeout) and criu resumes the process:"
        " it runs on the source; a cache started afterwards gets no restorable session"
        " (the proxy does not resend an aborted dump).",
    ),
    Cell(
        Fault.CACHE_RESTARTED, Phase.DURING_DUMP, Outcome.DESTINATION, "test_cacheRestarted_duringDump",
        "Cache SIGKILLed while criu writes pages, then started again on the same port"
        " and directory: the proxy reconnects and resends, the hook gets its"
        " confirmation, criu dump succeeds; a normal restore runs the process on the"
        " destination.",
    ),
    Cell(
        Fault.LINK_CUT, Phase.DURING_DUMP, Outcome.DESTINATION, "test_linkCut_duringDump",
        "The proxy -> cache connection reset (ss -K) while criu writes pages: the"
        " proxy reconnects and resends, criu dump succeeds; a normal restore runs the"
        " process on the destination.",
    ),
    # -- images written, the hook waits for delivery (slow link) ---------------
    Cell(
        Fault.PROXY_KILLED, Phase.BEFORE_DELIVERY, Outcome.SOURCE, "test_proxyKilled_beforeDelivery",
        "Proxy SIGKILLed while the post-dump hook waits and the slow link still"
        " carries the images: the hook fails, criu resumes the process: it runs on the"
        " source; the cache's session is aborted (no restorable session).",
    ),
    Cell(
        Fault.CACHE_KILLED, Phase.BEFORE_DELIVERY, Outcome.SOURCE, "test_cacheKilled_beforeDelivery",
        "Cache SIGKILLed while the post-dump hook waits for delivery: the hook fails"
        " (after --timeout), criu resumes the process: it runs on the source; a cache"
        " started afterwards gets no restorable session.",
    ),
    Cell(
        Fault.CACHE_RESTARTED, Phase.BEFORE_DELIVERY, Outcome.DESTINATION, "test_cacheRestarted_beforeDelivery",
        "Cache SIGKILLed and started again while the post-dump hook waits: the proxy"
        " reconnects and resends everything over the slow link, the hook gets its"
        " confirmation, criu dump succeeds; a normal restore runs the process on the"
        " destination.",
    ),
    Cell(
        Fault.LINK_CUT, Phase.BEFORE_DELIVERY, Outcome.DESTINATION, "test_linkCut_beforeDelivery",
        "The link reset while the post-dump hook waits and images are on the slow"
        " link: the proxy reconnects and resends, criu dump succeeds; a normal restore"
        " runs the process on the destination.",
    ),
    # -- after delivery ------------------------------------------------------------
    Cell(
        Fault.PROXY_KILLED, Phase.AFTER_DELIVERY, Outcome.DESTINATION, "test_proxyKilled_afterDelivery",
        "Proxy SIGKILLed after criu dump returned 0: the cache holds the delivered"
        " session; the restore runs the process on the destination.",
    ),
    Cell(
        Fault.CACHE_RESTARTED, Phase.AFTER_DELIVERY, Outcome.DESTINATION, "test_cacheRestarted_afterDelivery",
        "Cache SIGKILLed after delivery (its images are gone) and started again: the"
        " proxy, which keeps the images until the restore is confirmed, resends them;"
        " the restore then runs the process on the destination.",
    ),
    Cell(
        Fault.LINK_CUT, Phase.AFTER_DELIVERY, Outcome.DESTINATION, "test_linkCut_afterDelivery",
        "The link reset after delivery: the cache keeps the delivered session; the"
        " restore runs the process on the destination.",
    ),
    # -- during the restore -------------------------------------------------------
    Cell(
        Fault.RESTORE_FAILS, Phase.DURING_RESTORE, Outcome.RETRY, "test_restoreFails_duringRestore",
        "criu restore fails after reading every image (its post-restore action"
        " fails: criu kills the restored tasks): the hook never confirms the"
        " restore, so the session stays restorable, and a second criu restore"
        " (served the same session) runs the process on the destination.",
        at="post-restore",
    ),
    Cell(
        Fault.RESTORE_KILLED, Phase.DURING_RESTORE, Outcome.RETRY, "test_restoreKilled_duringRestore",
        "criu restore SIGKILLed at pre-restore (its stream open, images partly"
        " read, no task created yet): the cache keeps the session, and a second"
        " criu restore runs the process on the destination.",
    ),
    Cell(
        Fault.RESTORE_KILLED, Phase.DURING_RESTORE, Outcome.RETRY, "test_restoreKilled_afterTasksRestored",
        "criu restore SIGKILLed at post-restore (every image read, the tasks restored"
        " but not resumed): criu leaves the frozen task behind, holding the pid; it"
        " never ran (the count did not move) and is killed, as an operator would; the"
        " cache kept the session, and a second criu restore runs the process on the"
        " destination.",
        at="post-restore",
    ),
    Cell(
        Fault.CACHE_RESTARTED, Phase.DURING_RESTORE, Outcome.RETRY, "test_cacheRestarted_duringRestore",
        "Cache SIGKILLed at pre-restore and started again: criu's stream breaks and"
        " the restore fails; the proxy resends the images to the new cache, and a"
        " second criu restore runs the process on the destination.",
    ),
    Cell(
        Fault.PROXY_KILLED, Phase.DURING_RESTORE, Outcome.DESTINATION, "test_proxyKilled_duringRestore",
        "Proxy SIGKILLed at pre-restore: the cache serves the restore alone; it"
        " runs the process on the destination.",
    ),
    Cell(
        Fault.LINK_CUT, Phase.DURING_RESTORE, Outcome.DESTINATION, "test_linkCut_duringRestore",
        "The link reset at pre-restore: the cache keeps serving; the restore runs"
        " the process on the destination.",
    ),
]

#: The (fault, phase) pairs with no test, and why.
MEANINGLESS = {
    (Fault.CACHE_KILLED, Phase.AFTER_DELIVERY): (
        "the only other copy is the proxy's, so the restore needs a cache started"
        " again: that is cache restarted"
    ),
    (Fault.CACHE_KILLED, Phase.DURING_RESTORE): "the same: see cache restarted during the restore",
    **{
        (fault, phase): "a restore fault needs a restore"
        for fault in (Fault.RESTORE_FAILS, Fault.RESTORE_KILLED)
        for phase in (Phase.DURING_DUMP, Phase.BEFORE_DELIVERY, Phase.AFTER_DELIVERY)
    },
}


class Migration:
    """
    One migration's parts, all stopped by the test's cleanups: a workload,
    a proxy (images directory C{src}) and a cache (C{dst}) on a free
    loopback port, optionally inside a L{NetworkNamespace} with a slow
    loopback, and criu with the L{ActionScript}.
    """

    def __init__(self, test: SynchronousTestCase, mebibytes: int, slowLink: bool = False) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="tcf-"))
        test.addCleanup(shutil.rmtree, self.base, True)
        self.src, self.dst = self.base / "src", self.base / "dst"
        self.src.mkdir()
        self.dst.mkdir()
        self.netns: NetworkNamespace | None = None
        if slowLink:
            netns = NetworkNamespace()
            try:
                netns.add()
            except subprocess.CalledProcessError as e:
                raise SkipTest(f"no network namespace for the slow link: ip netns add failed: {e.stderr!r}")
            test.addCleanup(netns.delete)
            netns.setUp(*SLOW_LINK)
            self.netns = netns
        self.port = freePort()
        link = ["--address", "127.0.0.1", "--port", str(self.port), "--timeout", str(TIMEOUT)]
        self.cache = DaemonProcess("criu-cache", self.base, self.dst, link, self.netns)
        self.proxy = DaemonProcess(
            "criu-proxy", self.base, self.src, [*link, "--max-retry-delay", "1"], self.netns
        )
        test.addCleanup(self.cache.kill)
        test.addCleanup(self.proxy.kill)
        self.workload = Workload(self.base / "wl", mebibytes)
        test.addCleanup(self.workload.kill)
        self.script = ActionScript(self.base / "actions", HOOK if HOOK.exists() else None)
        self.criu = Criu(findCriu(), self.base, self.script)
        test.addCleanup(self.criu.killAll)
        test.addCleanup(self.script.releaseAll)

    def start(self) -> None:
        self.workload.start()
        self.cache.start()
        self.proxy.start()
        self.workload.ready()

    # -- steps -------------------------------------------------------------------------

    def dump(self) -> CriuRun:
        return self.criu.dump(self.src, self.workload.pid)

    def restore(self) -> CriuRun:
        return self.criu.restore(self.dst)

    def dumpDelivered(self) -> None:
        """criu dump, through the hook: the images are on the cache, the source process gone."""
        run = self.dump()
        if run.wait():
            raise AssertionError(f"criu dump failed ({run.process.returncode})")
        self.workload.reap()

    def restoreOK(self) -> None:
        run = self.restore()
        if run.wait():
            raise AssertionError(f"criu restore failed ({run.process.returncode})")

    def inject(self, fault: Fault, run: CriuRun | None = None) -> Callable[[], None] | None:
        """
        Inject C{fault} now.

        @param run: the criu restore to kill for L{Fault.RESTORE_KILLED}.
        @return: what ends the fault later (starts the cache again), if anything.
        """
        if fault is Fault.PROXY_KILLED:
            self.proxy.kill()
        elif fault is Fault.CACHE_KILLED:
            self.cache.kill()
        elif fault is Fault.CACHE_RESTARTED:
            self.cache.kill()
            return self.cache.start
        elif fault is Fault.LINK_CUT:
            waitUntil(
                lambda: linkConnections(self.port, self.netns), 3 * TIMEOUT, "a proxy -> cache connection to cut"
            )
            if not cutLink(self.port, self.netns):
                raise AssertionError("ss -K found no proxy -> cache connection to kill")
        elif fault is Fault.RESTORE_KILLED:
            assert run is not None
            run.kill()
        else:
            raise AssertionError(f"{fault} is not injected by inject()")
        return None

    # -- the cache's sessions ------------------------------------------------------------

    def restorableSessions(self) -> list[dict[str, Any]] | None:
        """The cache's restorable sessions (C{None} if its control socket does not answer)."""
        try:
            return restorable(self.cache.controlSocket)
        except OSError:
            return None

    def waitRestorable(self, timeout: float) -> None:
        waitUntil(lambda: self.restorableSessions(), timeout, "a restorable session on the cache")

    def waitNoneRestorable(self, timeout: float = 3 * TIMEOUT) -> None:
        waitUntil(
            lambda: self.restorableSessions() == [],
            timeout,
            "no session of the cache in a restorable state",
            interval=0.2,
        )

    def waitAborted(self, timeout: float = 3 * TIMEOUT) -> None:
        """Every session of the cache is aborted or gone: none dumping, none restorable."""

        def settled() -> bool:
            try:
                listing = sessions(self.cache.controlSocket)
            except OSError:
                return False
            return all(s.get("state") not in (*RESTORABLE, "dumping") for s in listing)

        waitUntil(settled, timeout, "every session of the cache to be aborted or gone", interval=0.2)

    def neverRestorable(self, seconds: float) -> None:
        """For C{seconds}, the cache never holds a restorable session."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = self.restorableSessions()
            if found:
                raise AssertionError(f"the cache got a restorable session: {found}")
            time.sleep(0.2)

    # -- outcomes -------------------------------------------------------------------------

    def checkOnSource(self, dump: CriuRun) -> None:
        """
        criu dump failed and resumed the process; the cache's sessions are
        aborted (or gone), so no restore is possible.
        """
        code = dump.wait()
        if code == 0:
            raise AssertionError("criu dump succeeded: expected it (its hook) to fail")
        if not self.workload.runsOnSource():
            raise AssertionError("the source process is gone although criu dump failed")
        self.workload.checkRunsOnce()
        if not self.cache.running():
            # The cache died with the dump; one started now must not get
            # the aborted dump.
            self.cache.start()
            self.neverRestorable(2 * TIMEOUT)
        self.waitAborted()
        self.workload.checkRunsOnce(more=1)

    def checkOnDestination(self) -> None:
        """
        The restored process runs, once, and the cache's session is no longer
        restorable (a restore the hook did not confirm would stay restoring).
        """
        if self.workload.runsOnSource():
            raise AssertionError("the source process still runs")
        self.workload.checkRunsOnce()
        self.waitNoneRestorable()
        self.workload.checkRunsOnce(more=1)

    def describe(self) -> str:
        return "\n".join(
            [
                f"work directory {self.base}, port {self.port}, netns {self.netns and self.netns.name}",
                self.workload.describe(),
                self.script.describe(),
                self.criu.describe(),
                self.proxy.describe(),
                self.cache.describe(),
            ]
        )


class FaultMatrixTests(SynchronousTestCase):
    """The fault matrix: one method per cell of L{MATRIX}, made below."""

    def setUp(self) -> None:
        self.migration: Migration | None = None

    def test_matrixCoversEveryPair(self) -> None:
        """Every (fault, phase) pair is either a cell or said to be meaningless."""
        cells = {(cell.fault, cell.phase) for cell in MATRIX}
        pairs = {(fault, phase) for fault in Fault for phase in Phase}
        self.assertEqual(cells & set(MEANINGLESS), set())
        self.assertEqual(cells | set(MEANINGLESS), pairs)
        self.assertEqual(len({cell.name for cell in MATRIX}), len(MATRIX))

    def test_noFault(self) -> None:
        """No fault: criu dump through the hook, criu restore: the process runs on the destination."""
        self.requireHook()
        m = self.migration = Migration(self, SMALL)
        self.diagnosed(self._noFault, m)

    def _noFault(self, m: Migration) -> None:
        m.start()
        m.dumpDelivered()
        m.restoreOK()
        m.checkOnDestination()

    # -- the cells ----------------------------------------------------------------------

    def requireHook(self) -> None:
        if not HOOK.exists():
            self.fail(
                f"{HOOK} is not installed: this needs the transactional migration"
                " (twisted-criu-hook; reinstall .venv once it is merged)"
            )

    def runCell(self, cell: Cell) -> None:
        if cell.needsHook:
            self.requireHook()
        large = cell.phase in (Phase.DURING_DUMP, Phase.BEFORE_DELIVERY)
        m = self.migration = Migration(
            self, LARGE if large else SMALL, slowLink=cell.phase is Phase.BEFORE_DELIVERY
        )
        run = {
            Phase.DURING_DUMP: self.duringDump,
            Phase.BEFORE_DELIVERY: self.beforeDelivery,
            Phase.AFTER_DELIVERY: self.afterDelivery,
            Phase.DURING_RESTORE: self.duringRestore,
        }[cell.phase]
        self.diagnosed(lambda m: run(m, cell), m)

    def diagnosed(self, steps: Callable[[Migration], None], m: Migration) -> None:
        """Run C{steps}; a failure shows the logs of every part."""
        try:
            steps(m)
        except SkipTest:
            raise
        except Exception as e:
            raise self.failureException(f"{type(e).__name__}: {e}\n\n{m.describe()}") from e

    def duringDump(self, m: Migration, cell: Cell) -> None:
        m.start()
        dump = m.dump()
        waitUntil(
            lambda: dump.logCount(PAGES_SENT) >= PAGES_BEFORE_FAULT or dump.process.poll() is not None,
            60,
            f"criu dump to send {PAGES_BEFORE_FAULT} batches of pages",
            interval=0.005,
        )
        os.kill(dump.pid, signal.SIGSTOP)
        try:
            if dump.process.poll() is not None:
                raise AssertionError(f"criu dump ended ({dump.process.returncode}) before the fault")
            if "post-dump" in m.script.actions():
                raise AssertionError("too late: criu dump already runs its post-dump action")
            recover = m.inject(cell.fault)
        finally:
            os.kill(dump.pid, signal.SIGCONT)
        if recover is not None:
            recover()
        self.afterDump(m, cell, dump)

    def beforeDelivery(self, m: Migration, cell: Cell) -> None:
        m.start()
        dump = m.dump()
        m.script.waitFor("post-dump", dump)
        m.proxy.waitForLog(HOOK_WAITS)
        delivered = [s for s in m.cache.sessions() if s.get("state") == "delivered"]
        if delivered or dump.process.poll() is not None:
            raise AssertionError(
                f"too late: delivered before the fault (criu dump: {dump.process.returncode}, {delivered})"
            )
        recover = m.inject(cell.fault)
        if recover is not None:
            recover()
        self.afterDump(m, cell, dump)

    def afterDump(self, m: Migration, cell: Cell, dump: CriuRun) -> None:
        if cell.outcome is Outcome.SOURCE:
            m.checkOnSource(dump)
            return
        if dump.wait():
            raise AssertionError(f"criu dump failed ({dump.process.returncode}): expected it to succeed")
        m.workload.reap()
        m.restoreOK()
        m.checkOnDestination()

    def afterDelivery(self, m: Migration, cell: Cell) -> None:
        m.start()
        m.dumpDelivered()
        recover = m.inject(cell.fault)
        if recover is not None:
            recover()
            m.waitRestorable(3 * TIMEOUT)  # the proxy resent the images
        m.restoreOK()
        m.checkOnDestination()

    def duringRestore(self, m: Migration, cell: Cell) -> None:
        m.start()
        m.dumpDelivered()
        count = m.workload.last()
        if cell.fault is Fault.RESTORE_FAILS:
            m.script.failOnce(cell.at)
            restore = m.restore()
        else:
            m.script.pause(cell.at)
            restore = m.restore()
            m.script.waitPaused(cell.at, restore)
            recover = m.inject(cell.fault, restore)
            if recover is not None:
                recover()  # the cache is back before criu goes on
            m.script.release(cell.at)
        code = restore.wait()
        if cell.outcome is Outcome.DESTINATION:
            if code:
                raise AssertionError(f"criu restore failed ({code}): expected it to succeed")
            m.checkOnDestination()
            return
        if code == 0:
            raise AssertionError("criu restore succeeded: expected the fault to fail it")
        for pid in m.workload.running():
            # criu killed at post-restore leaves its frozen task: it must
            # not have run; kill it, as an operator would.
            if cell.fault is not Fault.RESTORE_KILLED or pid != m.workload.pid:
                raise AssertionError(f"after the failed restore, pid {pid} runs the workload")
            if m.workload.last() != count:
                raise AssertionError(f"the task left by the killed restore ran (count {count} -> {m.workload.last()})")
            os.kill(pid, signal.SIGKILL)
        m.workload.waitPidFree()
        m.waitRestorable(3 * TIMEOUT)
        m.restoreOK()
        m.checkOnDestination()


def _cellTest(cell: Cell) -> Callable[[FaultMatrixTests], None]:
    def test(self: FaultMatrixTests) -> None:
        self.runCell(cell)

    test.__name__ = test.__qualname__ = cell.name
    test.__doc__ = f"{cell.fault.value}, {cell.phase.value}: {cell.outcome.value}. {cell.doc}"
    return test


for _cell in MATRIX:
    setattr(FaultMatrixTests, _cell.name, _cellTest(_cell))
del _cell
