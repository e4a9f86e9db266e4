"""
Test-private helpers.  The fakes (FakeLocalService, FakeSink, storedImage,
pump, driveProducer) are public: L{twisted_criu.testing.fakes}.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase


def isClosed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def socketDirectory(test: SynchronousTestCase) -> str:
    """A fresh, short directory for UNIX sockets (sun_path holds 107 bytes).

    Not under trial's C{_trial_temp}: a clone at a deep path (as CI's is)
    would push the daemons' sockets past the limit.
    """
    directory = tempfile.mkdtemp(prefix="tc-")
    test.addCleanup(shutil.rmtree, directory, True)
    return directory
