"""
Each mistake in starting C{twistd criu-proxy} or C{twistd criu-cache}, made
with the real daemon as a child process: one line on standard error (two
for a usage error: the usage line first), the status (2 for usage, 1 for
the rest), no traceback unless C{--debug}.  The mistakes and the lines they
must print are those of C{docs/examples/startup_errors.py}, which writes
the table the documentation shows; they are made once, in parallel, and
each test checks one.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from types import ModuleType
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "docs", "examples", "startup_errors.py",
)


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("startup_errors", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its dataclasses
    spec.loader.exec_module(module)
    return module


examples = _load()
_outcomes: dict[str, Any] = {}


def outcomeOf(title: str) -> Any:
    """What the mistake called C{title} printed (all are made on first use)."""
    if not _outcomes:
        for outcome in examples.runMistakes():
            _outcomes[outcome.mistake.title] = outcome
    return _outcomes[title]


class StartupErrorTests(SynchronousTestCase):
    """One test per mistake of C{docs/examples/startup_errors.py}."""

    def check(self, title: str) -> None:
        outcome = outcomeOf(title)
        self.assertEqual(outcome.problems(), [], outcome.describe())


def _addTests() -> None:
    for index, mistake in enumerate(examples.MISTAKES):
        slug = re.sub(r"[^A-Za-z0-9]+", "_", mistake.title).strip("_")

        def test(self: StartupErrorTests, title: str = mistake.title) -> None:
            self.check(title)

        test.__doc__ = f"{mistake.title}: {mistake.daemon} exits {mistake.status} with its line."
        setattr(StartupErrorTests, f"test_{index:02d}_{slug}", test)


_addTests()
