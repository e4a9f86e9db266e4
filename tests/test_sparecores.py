"""Idle cores from /proc/stat (L{twisted_criu.flow.sparecores})."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_criu.flow.sparecores import SpareCores

STAT = "cpu  {user} 0 {system} {idle} {iowait} 0 0 0 0 0\\ncpu0 1 0 0 0 0 0 0 0 0 0\\ncpu1 1 0 0 0 0 0 0 0 0 0\\nintr 1\\n"


class SpareCoresTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.write(user=100, system=100, idle=1000, iowait=0)

    def write(self, **fields: int) -> None:
        with open(self.path, "w") as f:
            f.write(STAT.format(**fields))

    def test_idleShareOfAllCores(self) -> None:
        """100 jiffies went by on 2 cores, 60 of them idle or waiting for I/O: 1.2 cores spare."""
        spare = SpareCores(self.path)
        self.write(user=120, system=120, idle=1050, iowait=10)
        self.assertAlmostEqual(spare() or 0, 1.2)

    def test_realProcStat(self) -> None:
        """On this machine: a number between 0 and the cores, or None where there is no /proc."""
        import os
        import time

        spare = SpareCores()
        time.sleep(0.05)
        value = spare()
        if os.path.exists("/proc/stat"):
            assert value is not None
            self.assertTrue(0 <= value <= (os.cpu_count() or 1) + 0.01, value)
        else:
            self.assertIsNone(value)

    def test_unreadable(self) -> None:
        spare = SpareCores(self.path + ".missing")
        self.assertIsNone(spare())

    def test_noTimePassed(self) -> None:
        spare = SpareCores(self.path)
        self.assertIsNone(spare())
