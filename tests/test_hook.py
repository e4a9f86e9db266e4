"""
twisted-criu-hook as criu runs it: no arguments, the action in the
environment, a one-line message and an exit status.  What the daemons do
for it is tested in L{tests.test_transactions}.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import hook


class HookCommandTests(SynchronousTestCase):
    def main(self, environ: dict[str, str], *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as e:
            hook.main(list(argv), environ)
        code = e.exception.code
        return (code if isinstance(code, int) else 1), out.getvalue(), err.getvalue()

    def test_otherActionsExitZeroAtOnce(self) -> None:
        for action in ("pre-dump", "network-lock", "post-restore", "pre-resume", "pre-stream"):
            self.assertEqual(self.main({"CRTOOLS_SCRIPT_ACTION": action}), (0, "", ""))

    def test_ignoredActionsImportNothing(self) -> None:
        """
        criu runs the hook a dozen times while the process is frozen: the
        actions it ignores load no network, HTTP or temp-file module.
        """
        probe = (
            "import sys\n"
            "from twisted_criu import hook\n"
            "try:\n"
            "    hook.main([], {'CRTOOLS_SCRIPT_ACTION': 'network-unlock'})\n"
            "except SystemExit as e:\n"
            "    print(e.code, sorted(m for m in ('socket', 'http.client', 'json', 'tempfile') if m in sys.modules))\n"
        )
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.stdout.strip(), "0 []", result.stderr)

    def test_notRunByCriu(self) -> None:
        code, _, err = self.main({})
        self.assertEqual(code, 2)
        self.assertIn("CRTOOLS_SCRIPT_ACTION is not set", err)

    def test_help(self) -> None:
        code, out, _ = self.main({}, "--help")
        self.assertEqual(code, 0)
        self.assertIn("--action-script twisted-criu-hook", out)
        code, _, err = self.main({}, "extra")
        self.assertEqual(code, 2)

    def test_noDirectory(self) -> None:
        code, _, err = self.main({"CRTOOLS_SCRIPT_ACTION": "post-dump"})
        self.assertEqual(code, 1)
        self.assertIn("CRTOOLS_IMAGE_DIR is not set", err)

    def test_proxyUnreachableResumesTheProcess(self) -> None:
        directory = os.path.realpath(self.mktemp())
        os.makedirs(directory)
        env = {"CRTOOLS_SCRIPT_ACTION": "post-dump", "CRTOOLS_IMAGE_DIR": directory}
        code, _, err = self.main(env)
        self.assertEqual(code, 1)
        self.assertIn(f"cannot reach the proxy at {os.path.join(directory, 'proxy-control.sock')}", err)
        self.assertIn("criu resumes the process", err)
        self.assertEqual(len(err.splitlines()), 1)

    def test_overrideAndRememberedDirectory(self) -> None:
        """post-resume finds the socket pre-restore saw (criu's /proc/PID/fd/N is closed by then)."""
        directory = os.path.realpath(self.mktemp())
        os.makedirs(directory)
        env = {"CRTOOLS_SCRIPT_ACTION": "pre-restore", "CRTOOLS_IMAGE_DIR": directory}
        pid = 10**9 + os.getpid()  # no real criu has it
        self.assertEqual(
            hook.controlPath("pre-restore", env, pid), os.path.join(directory, "cache-control.sock")
        )
        later = {"CRTOOLS_SCRIPT_ACTION": "post-resume", "CRTOOLS_IMAGE_DIR": "/proc/1/fd/999"}
        self.assertEqual(
            hook.controlPath("post-resume", later, pid), os.path.join(directory, "cache-control.sock")
        )
        self.assertEqual(hook.rememberedPath(pid, forget=False), None)  # used once
        self.assertEqual(
            hook.controlPath("post-dump", {"TWISTED_CRIU_PROXY_CONTROL": "/x.sock"}, pid), "/x.sock"
        )
