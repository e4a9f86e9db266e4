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

    def test_installedScriptExitsBeforeImporting(self) -> None:
        """
        The installed C{twisted-criu-hook} (the script criu runs) exits 0
        for an ignored action without importing twisted_criu at all, and
        hands the actions the hook handles (and no action, and arguments)
        to it.
        """
        script = os.path.join(os.path.dirname(sys.executable), "twisted-criu-hook")
        self.assertTrue(os.access(script, os.X_OK), f"{script} is not installed")
        with open(script) as f:
            source = f.read()
        self.assertIn(repr(("", *hook.CONTROL_SOCKETS)), source)  # the same actions as the hook's

        def run(action: str | None, *argv: str) -> subprocess.CompletedProcess[str]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("CRTOOLS_")}
            if action is not None:
                env["CRTOOLS_SCRIPT_ACTION"] = action
            return subprocess.run(
                [sys.executable, "-X", "importtime", script, *argv], env=env, capture_output=True, text=True, timeout=60
            )

        ignored = run("network-unlock")
        self.assertEqual(ignored.returncode, 0, ignored.stderr)
        self.assertNotIn("twisted_criu", ignored.stderr)
        unset = run(None)
        self.assertEqual(unset.returncode, 2)
        self.assertIn("CRTOOLS_SCRIPT_ACTION is not set", unset.stderr)
        self.assertIn("--action-script twisted-criu-hook", run(None, "--help").stdout)
        handled = run("post-dump")
        self.assertEqual(handled.returncode, 1)
        self.assertIn("CRTOOLS_IMAGE_DIR is not set", handled.stderr)

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
