"""
L{twisted_criu.testing.demo.findcriu}: which criu the demo runs, and the
one-line reason it gives for falling back on the synthetic demo (running
criu itself is C{tests.slow.test_demo} and C{tests.slow.test_criu_demo}).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from twisted_criu.testing.demo.findcriu import GET_CRIU, FoundCriu, NoCriu, locateCriu


class LocateCriuTests(SynchronousTestCase):
    """C{--criu}, then C{TWISTED_CRIU_CRIU}, then C{admin/get-criu}, then PATH; root only."""

    def setUp(self) -> None:
        self.checked: list[tuple[str, str]] = []
        self.gotCriu: list[Path] = []
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(os.rmdir, directory)
        # A get-criu that does not exist (an installed wheel has none).
        self.noGetCriu = directory / "get-criu"

    def check(self, path: str, origin: str) -> FoundCriu:
        self.checked.append((path, origin))
        return FoundCriu(path, "4.1.1", origin)

    def runGetCriu(self, path: Path) -> str:
        self.gotCriu.append(path)
        return "/cache/criu"

    def locate(self, explicit: str | None = None, euid: int = 0, environ: dict[str, str] | None = None,
               getCriu: Path | None = None, onPath: str | None = None) -> FoundCriu:
        return locateCriu(
            explicit,
            environ=environ or {},
            euid=euid,
            getCriu=getCriu or self.noGetCriu,
            which=lambda name: onPath,
            runGetCriu=self.runGetCriu,
            check=self.check,
        )

    def test_notRoot(self) -> None:
        """Not root: the fallback, before any criu is looked for or run."""
        e = self.assertRaises(NoCriu, self.locate, "/usr/sbin/criu", euid=1000, onPath="/usr/sbin/criu")
        self.assertEqual(str(e), "not root: criu needs root to checkpoint and restore a process")
        self.assertEqual((self.checked, self.gotCriu), ([], []))

    def test_explicitFirst(self) -> None:
        found = self.locate("/opt/criu", environ={"TWISTED_CRIU_CRIU": "/env/criu"}, getCriu=GET_CRIU)
        self.assertEqual(found, FoundCriu("/opt/criu", "4.1.1", "--criu"))
        self.assertEqual(self.gotCriu, [])

    def test_environmentBeforeGetCriu(self) -> None:
        found = self.locate(environ={"TWISTED_CRIU_CRIU": "/env/criu"}, getCriu=GET_CRIU, onPath="/usr/sbin/criu")
        self.assertEqual(found, FoundCriu("/env/criu", "4.1.1", "TWISTED_CRIU_CRIU"))
        self.assertEqual(self.gotCriu, [])

    def test_getCriuInACheckout(self) -> None:
        """The checkout's admin/get-criu, before the criu on PATH."""
        self.assertTrue(os.access(GET_CRIU, os.X_OK), GET_CRIU)
        found = self.locate(getCriu=GET_CRIU, onPath="/usr/sbin/criu")
        self.assertEqual(found, FoundCriu("/cache/criu", "4.1.1", "admin/get-criu"))
        self.assertEqual(self.gotCriu, [GET_CRIU])

    def test_path(self) -> None:
        """No get-criu (an installed wheel): the criu on PATH."""
        self.assertEqual(self.locate(onPath="/usr/sbin/criu"), FoundCriu("/usr/sbin/criu", "4.1.1", "PATH"))

    def test_none(self) -> None:
        e = self.assertRaises(NoCriu, self.locate)
        self.assertEqual(
            str(e), "no criu binary: install criu 3.15 or later (criu check must pass), or set TWISTED_CRIU_CRIU"
        )
        self.assertEqual(self.checked, [])
