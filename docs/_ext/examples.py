"""
Sphinx extension: run every C{docs/examples/*.py} script before the pages
are read, so that every output, log excerpt and figure the pages show comes
from a real run made by this build, and cannot go stale.

Each script is run as C{python docs/examples/NAME.py OUTPUT_DIR} from the
root of the checkout, with C{OUTPUT_DIR} C{docs/_generated/NAME/} (emptied
first); the pages include what it writes there.  Scripts whose names start
with C{_} are helpers, not run.  They run one at a time, beside pydoctor's
API build, except those C{examples_alone} names, which run alone once
pydoctor is done.  A script that fails stops the build with its output.
How long each took is written to C{docs/_generated/examples.md}, for the
page on building the docs.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: Seconds one script may take before the build gives up on it.
TIMEOUT = 300


def scripts(directory: str) -> list[str]:
    return sorted(
        name
        for name in os.listdir(directory)
        if name.endswith(".py") and not name.startswith("_")
    )


def runOne(root: str, script: str, output: str) -> float:
    """Run C{script} into C{output}; its wall time in seconds."""
    shutil.rmtree(output, ignore_errors=True)
    os.makedirs(output)
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, script, output],
            cwd=root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ExtensionError(f"{script} took more than {TIMEOUT} s") from None
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise ExtensionError(
            f"{os.path.relpath(script, root)} exited {done.returncode}:\n"
            + (done.stdout + done.stderr)[-4000:]
        )
    return seconds


class Runs:
    """
    The example scripts of one build.  Most run in a thread started as soon
    as the configuration is read, alongside pydoctor's API build; those in
    C{examples_alone} (the benchmark) run afterwards, alone, so that their
    measurements share the machine with nothing else of this build.
    """

    def __init__(self, app: Sphinx) -> None:
        self.directory: str = app.config.examples_dir
        self.generated: str = app.config.examples_output
        self.root = os.path.dirname(os.path.dirname(self.directory))
        self.alone: list[str] = list(app.config.examples_alone)
        self.rows: dict[str, float] = {}
        self.failure: Exception | None = None
        names = scripts(self.directory)
        self.background = [n for n in names if n not in self.alone]
        self.thread = threading.Thread(target=self._runAll, args=(self.background,))

    def _run(self, name: str) -> None:
        output = os.path.join(self.generated, name[: -len(".py")])
        seconds = runOne(self.root, os.path.join(self.directory, name), output)
        self.rows[name] = seconds

    def _runAll(self, names: list[str]) -> None:
        try:
            for name in names:
                self._run(name)
        except Exception as e:
            self.failure = e

    def start(self) -> None:
        os.makedirs(self.generated, exist_ok=True)
        logger.info(f"running docs/examples: {', '.join(self.background)}")
        self.thread.start()

    def finish(self) -> None:
        self.thread.join()
        if self.failure is not None:
            raise self.failure
        for name in self.alone:
            logger.info(f"running docs/examples/{name} (alone)")
            self._run(name)
        machine = (
            f"{os.cpu_count()} CPUs, Linux {platform.release()},"
            f" Python {platform.python_version()}"
        )
        with open(os.path.join(self.generated, "examples.md"), "w") as f:
            f.write(f"Run by this build on {machine}:\n\n")
            f.write("| script | wall time |\n|---|---|\n")
            for name in sorted(self.rows):
                alone = " (alone)" if name in self.alone else ""
                f.write(f"| `docs/examples/{name}`{alone} | {self.rows[name]:.1f} s |\n")


def startExamples(app: Sphinx, config: Any) -> None:
    runs = Runs(app)
    app.examplesRuns = runs  # type: ignore[attr-defined]
    runs.start()


def finishExamples(app: Sphinx) -> None:
    app.examplesRuns.finish()  # type: ignore[attr-defined]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("examples_dir", None, "env")
    app.add_config_value("examples_output", None, "env")
    app.add_config_value("examples_alone", [], "env")
    app.connect("config-inited", startExamples)
    # After pydoctor's extension (priority 490) has built the API reference,
    # and before any page is read.
    app.connect("builder-inited", finishExamples, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
