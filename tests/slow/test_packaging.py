"""
Packaging: the twistd dropin is found, a wheel built from the checkout
ships it (and the generated protobuf code) without the files that would
break Twisted's own C{twisted.plugins} package.  (The demo's tests are
C{tests.slow.test_demo} and C{tests.slow.test_criu_demo}.)

See the style guide's "Packaging the dropin": package discovery silently
drops C{twisted/plugins/*.py}, a C{twisted/plugins/__init__.py} clobbers
Twisted's, and a stale C{dropin.cache} can be swept into the wheel.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu.twistd.options import DEFAULT_PORT

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: What must never be copied into the wheel-building scratch tree.
_SCRATCH = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "_trial_temp*",
    ".mypy_cache", "__pycache__", "*.py[co]",
)

#: twistd's console script, runnable with C{sys.executable -c}.
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"


def _makers() -> dict[str, IServiceMaker]:
    import twisted.plugins

    return {m.tapname: m for m in getPlugins(IServiceMaker, twisted.plugins)}


#: Run with only an unpacked wheel on C{PYTHONPATH} (before the venv's own
#: copy): each daemon plugin's tapname, the module it names, and where that
#: module was imported from.
_FIND_PLUGINS = """
import importlib, os, twisted.plugins
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
for maker in sorted(getPlugins(IServiceMaker, twisted.plugins), key=lambda m: m.tapname):
    if maker.tapname.startswith("criu-"):
        module = importlib.import_module(maker.module)
        where = module.__file__.split(os.sep + "twisted_criu" + os.sep)[0]
        print(f"{maker.tapname}={maker.module}@{where}")
"""


def _packageModules() -> list[str]:
    """Every C{.py} file of C{twisted_criu} in the checkout, as wheel paths."""
    found = []
    for directory, _, files in os.walk(os.path.join(REPO, "twisted_criu")):
        for name in files:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(directory, name), REPO))
    return sorted(found)


def _junk() -> set[str]:
    """Build by-products at the top of the checkout."""
    return {
        name
        for name in os.listdir(REPO)
        if name in ("build", "dist") or name.endswith(".egg-info")
    }


class PluginTests(SynchronousTestCase):
    """C{getPlugins(IServiceMaker)} finds both daemons."""

    def setUp(self) -> None:
        self.makers = _makers()
        self.imagesDir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.imagesDir)

    def test_tapnames(self) -> None:
        self.assertIn("criu-proxy", self.makers)
        self.assertIn("criu-cache", self.makers)

    def test_proxyDefaults(self) -> None:
        options = self.makers["criu-proxy"].options()
        options.parseOptions(["-D", self.imagesDir])
        self.assertEqual(options["images-dir"], os.path.abspath(self.imagesDir))
        self.assertEqual(options["port"], DEFAULT_PORT)
        self.assertEqual(options["connect"], f"tcp:host=localhost:port={DEFAULT_PORT}")
        self.assertEqual(
            options["local"],
            "unix:" + os.path.join(os.path.abspath(self.imagesDir), "img-proxy.sock")
            + ":mode=600",
        )
        self.assertFalse(options["once"])

    def test_cacheDefaults(self) -> None:
        """The cache listens on loopback unless told otherwise."""
        options = self.makers["criu-cache"].options()
        options.parseOptions(["-D", self.imagesDir])
        self.assertEqual(options["listen"], f"tcp:{DEFAULT_PORT}:interface=127.0.0.1")
        self.assertEqual(
            options["local"],
            "unix:" + os.path.join(os.path.abspath(self.imagesDir), "img-cache.sock")
            + ":mode=600",
        )
        self.assertFalse(options["once"])

    def test_twistdListsThem(self) -> None:
        """
        A C{twistd} started outside the checkout lists both subcommands: the
        project is installed so that its dropin is visible (a PEP 660
        editable install would hide it; admin/test uses compat mode).
        """
        result = subprocess.run(
            [sys.executable, "-c", _TWISTD, "--help"],
            cwd=self.imagesDir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("criu-proxy", result.stdout)
        self.assertIn("criu-cache", result.stdout)


class DevRequirementsTests(SynchronousTestCase):
    def test_extrasMatchRequirementsFile(self) -> None:
        """The C{dev} extra and requirements-dev.txt list the same things."""
        config = configparser.ConfigParser()
        config.read(os.path.join(REPO, "setup.cfg"))
        extra = config["options.extras_require"]["dev"].split()
        with open(os.path.join(REPO, "requirements-dev.txt")) as f:
            listed = [
                line.strip()
                for line in f
                if line.strip() and not line.lstrip().startswith("#")
            ]
        self.assertEqual(sorted(extra), sorted(listed))
        self.assertIn("grpcio-tools==1.85.1", extra)


class WheelTests(SynchronousTestCase):
    """Build a wheel from (a copy of) the checkout and look inside."""

    def test_wheelContents(self) -> None:
        before = _junk()
        scratch = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, scratch)
        source = os.path.join(scratch, "src")
        out = os.path.join(scratch, "dist")
        shutil.copytree(REPO, source, ignore=_SCRATCH)
        # A stale dropin.cache, as running twistd or trial in a checkout
        # leaves behind: it must not end up in the wheel.
        with open(os.path.join(source, "twisted", "plugins", "dropin.cache"), "wb") as f:
            f.write(b"stale")

        result = subprocess.run(
            [sys.executable, "-m", "build", "--wheel", "--no-isolation",
             "--outdir", out, source],
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(
            result.returncode, 0,
            f"wheel build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}",
        )
        wheels = [n for n in os.listdir(out) if n.endswith(".whl")]
        self.assertEqual(len(wheels), 1, wheels)
        with zipfile.ZipFile(os.path.join(out, wheels[0])) as wheel:
            names = set(wheel.namelist())
            entryPoints = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
            self.assertEqual(len(entryPoints), 1, sorted(names))
            scripts = wheel.read(entryPoints[0]).decode()
        self.assertIn("twisted-criu = twisted_criu.cli:main", scripts)
        self.assertIn("twisted-criu-demo = twisted_criu.testing.demo:main", scripts)

        for required in (
            "twisted/plugins/twisted_criu_plugins.py",
            "twisted_criu/__init__.py",
            "twisted_criu/_pb/criu_image_pb2.py",
            "twisted_criu/_pb/criu_image_pb2.pyi",
            "twisted_criu/py.typed",
            "twisted_criu/storage/files.py",
            "twisted_criu/cli/__init__.py",
        ):
            self.assertIn(required, names)
        for forbidden in ("twisted/__init__.py", "twisted/plugins/__init__.py"):
            self.assertNotIn(forbidden, names)
        self.assertEqual([n for n in names if n.endswith("dropin.cache")], [])
        self.assertEqual([n for n in names if n.endswith((".pyc", ".pyo"))], [])

        # Every module of the package (setup.cfg lists its packages one by
        # one: a new subpackage left out of that list would be missing).
        for path in _packageModules():
            self.assertIn(path, names)

        # Installed from the wheel alone, twistd finds both plugins, and
        # each names a module that imports.
        target = os.path.join(scratch, "installed")
        with zipfile.ZipFile(os.path.join(out, wheels[0])) as wheel:
            wheel.extractall(target)
        found = subprocess.run(
            [sys.executable, "-c", _FIND_PLUGINS],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=scratch,
            env={**os.environ, "PYTHONPATH": target},
        )
        self.assertEqual(found.returncode, 0, found.stderr[-3000:])
        self.assertEqual(
            found.stdout.split(),
            [
                "criu-cache=twisted_criu.twistd.cache_tap@" + target,
                "criu-proxy=twisted_criu.twistd.proxy_tap@" + target,
            ],
        )

        # Building happened in the copy: the checkout gained no build junk.
        self.assertEqual(_junk() - before, set())
