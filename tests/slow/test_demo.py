"""
The demo (C{python -m twisted_criu.testing.demo}, C{./admin/demo}) without
a real criu: the synthetic run (C{--synthetic}, and the options that imply
it), and the fallback on it, in one line, where criu cannot run.  The real
run is C{tests.slow.test_criu_demo}.

Each run gets its own C{TMPDIR}, which must be empty again afterwards: the
demo removes its work directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: A criu whose C{criu check} fails, as Debian 12's criu 3.17 does on
#: current kernels.
FAILING_CRIU = """#!/bin/sh
echo "Error (criu/vdso.c:627): vdso: Unexpected rt vDSO area bounds" >&2
echo "Looks bad." >&2
exit 1
"""


class DemoRun:
    """One run of the demo as a child process, in a private C{TMPDIR}."""

    def __init__(self, test: SynchronousTestCase, *args: str, criu: str | None = None, command: list[str] | None = None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="tcriu-demo-test-")
        test.addCleanup(shutil.rmtree, self.tmp, True)
        env = dict(os.environ, TMPDIR=self.tmp)
        env.pop("TWISTED_CRIU_CRIU", None)
        if criu is not None:
            env["TWISTED_CRIU_CRIU"] = criu
        result = subprocess.run(
            (command or [sys.executable, "-m", "twisted_criu.testing.demo"]) + ["--timeout", "60", *args],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
            cwd=REPO,
        )
        self.code = result.returncode
        self.out = result.stdout
        self.err = result.stderr
        self.left = os.listdir(self.tmp)

    def describe(self) -> str:
        return f"exit {self.code}\n--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"


class SyntheticDemoTests(SynchronousTestCase):
    """criu played by the demo: every image comes back intact."""

    def runDemo(self, *args: str) -> str:
        run = DemoRun(self, "--size", "1", *args)
        self.assertEqual(run.code, 0, run.describe())
        self.assertEqual(run.left, [], "the demo left its work directory behind")
        return run.out

    def test_remote(self) -> None:
        out = self.runDemo("--synthetic")
        self.assertIn("memfd.img        ENOENT", out)
        self.assertIn("criu-cache exited 0 by itself", out)
        self.assertIn("criu-proxy exited 0 by itself", out)
        self.assertIn("\nOK: 13 images", out)
        self.assertIn("criu dump --remote -> criu-proxy -> TLS -> criu-cache", out)

    def test_stream(self) -> None:
        """C{--protocol} implies C{--synthetic}: no criu is looked for."""
        out = self.runDemo("--protocol", "stream")
        self.assertTrue(out.startswith("twisted-criu "), out)
        self.assertIn("\nOK: 13 images", out)
        self.assertIn("criu dump --stream -> criu-proxy", out)

    def test_seed(self) -> None:
        self.assertIn("\nOK: 13 images", self.runDemo("--synthetic", "--variant", "seed"))

    def test_adminDemo(self) -> None:
        """C{./admin/demo}, the README's first command, runs it too."""
        run = DemoRun(self, "--synthetic", "--size", "1", command=[os.path.join(REPO, "admin", "demo")])
        self.assertEqual(run.code, 0, run.describe())
        self.assertIn("\nOK: 13 images", run.out)

    def test_criuAndSynthetic(self) -> None:
        """C{--criu} asks for the real run: with a synthetic-only option it is a usage error."""
        run = DemoRun(self, "--criu", "/bin/true", "--protocol", "stream")
        self.assertEqual(run.code, 2, run.describe())
        self.assertIn("error: --criu runs the real demo; --protocol is for the synthetic one", run.err)


class FallbackTests(SynchronousTestCase):
    """
    Where criu cannot run, the demo says why in one line and runs the
    synthetic demo instead.  (Not being root is C{tests.test_demo_findcriu}:
    these tests run as root.)
    """

    def fallback(self, criu: str) -> str:
        run = DemoRun(self, "--size", "1", criu=criu)
        self.assertEqual(run.code, 0, run.describe())
        first, second, third = run.out.splitlines()[:3]
        self.assertTrue(first.startswith("criu cannot run here ("), run.out)
        self.assertTrue(
            first.endswith("): running the synthetic demo instead (--synthetic skips this check)"), run.out
        )
        self.assertEqual(second, "")
        self.assertIn("loopback migration demo, criu played by twisted_criu.testing.criu", third)
        self.assertIn("\nOK: 13 images", run.out)
        self.assertEqual(run.left, [], "the demo left its work directory behind")
        return first

    def test_criuCheckFails(self) -> None:
        criu = os.path.join(tempfile.mkdtemp(prefix="tcriu-fake-"), "criu")
        self.addCleanup(shutil.rmtree, os.path.dirname(criu), True)
        with open(criu, "w") as f:
            f.write(FAILING_CRIU)
        os.chmod(criu, 0o755)
        line = self.fallback(criu)
        self.assertIn(f"criu check fails with TWISTED_CRIU_CRIU={criu} (exit 1): Looks bad.", line)

    def test_noBinary(self) -> None:
        line = self.fallback("/nonexistent/criu")
        self.assertIn("TWISTED_CRIU_CRIU=/nonexistent/criu is not an executable file", line)

    def test_explicitCriuFails(self) -> None:
        """C{--criu} that cannot run is an error, not a fallback."""
        run = DemoRun(self, "--size", "1", "--criu", "/bin/false")
        self.assertEqual(run.code, 1, run.describe())
        self.assertEqual(run.out.strip(), "FAILED: criu check fails with --criu /bin/false (exit 1): no output")
        self.assertEqual(run.left, [])
