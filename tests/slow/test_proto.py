"""
The committed generated code in twisted_criu/_pb/ is what admin/regen-proto
makes of proto/criu_image.proto (the schema itself: L{tests.test_proto}).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATED = os.path.join(REPO, "twisted_criu", "_pb")


class RegenerateTests(SynchronousTestCase):
    """admin/regen-proto reproduces the committed code byte for byte."""

    def test_regeneratedCodeIsIdentical(self) -> None:
        try:
            import grpc_tools.protoc  # noqa: F401
        except ImportError as e:
            self.fail(
                f"grpc_tools is not importable ({e}): grpcio-tools==1.85.1 is a "
                "dev dependency; run the tests with admin/test, or "
                "pip install -r requirements-dev.txt"
            )
        out = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, out)
        # admin/regen-proto runs "python": make that this interpreter.
        bin = os.path.join(out, "bin")
        os.mkdir(bin)
        wrapper = os.path.join(bin, "python")
        with open(wrapper, "w") as f:  # not a symlink: a venv is found by path
            f.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        os.chmod(wrapper, 0o755)
        env = dict(os.environ, PATH=bin + os.pathsep + os.environ.get("PATH", ""))
        target = os.path.join(out, "pb")
        result = subprocess.run(
            ["sh", os.path.join(REPO, "admin", "regen-proto"), target],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        for name in ("criu_image_pb2.py", "criu_image_pb2.pyi"):
            with open(os.path.join(target, name), "rb") as f:
                regenerated = f.read()
            with open(os.path.join(GENERATED, name), "rb") as f:
                committed = f.read()
            self.assertEqual(
                regenerated,
                committed,
                f"twisted_criu/_pb/{name} differs from what admin/regen-proto "
                "generates from proto/criu_image.proto: run admin/regen-proto",
            )
