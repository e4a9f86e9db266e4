"""
Sphinx extension: the intersphinx inventories pydoctor links external names
with, made available without a network.

  - Python's, from Debian's C{python3-doc} (C{/usr/share/doc/python3/html/objects.inv},
    or the file C{$PYTHON_OBJECTS_INV} names), linked to docs.python.org;
  - Twisted's, written at each build from the installed Twisted by
    C{twistedinventory.py} (beside this file), linked to Twisted's API site.

Each becomes a C{--intersphinx-file} argument of C{pydoctor_args}.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ConfigError

PYTHON_INVENTORY = "/usr/share/doc/python3/html/objects.inv"
PYTHON_DOCS = "https://docs.python.org/3"
TWISTED_API = "https://docs.twisted.org/en/stable/api"


def pythonInventory() -> str:
    path = os.environ.get("PYTHON_OBJECTS_INV", PYTHON_INVENTORY)
    if not os.path.isfile(path):
        raise ConfigError(
            f"Python's intersphinx inventory {path} is missing:"
            " apt-get install python3-doc (or set PYTHON_OBJECTS_INV to an objects.inv)"
        )
    return path


def twistedInventory(directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "twisted-objects.inv")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "twistedinventory.py")
    done = subprocess.run(
        [sys.executable, script, path], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise ConfigError(f"{script} failed: {done.stderr.strip()}")
    return path


def addInventories(app: Sphinx, config: Config) -> None:
    config.pydoctor_args = [
        f"--intersphinx-file={pythonInventory()}::{PYTHON_DOCS}",
        f"--intersphinx-file={twistedInventory(app.doctreedir)}::{TWISTED_API}",
        *config.pydoctor_args,
    ]


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("config-inited", addInventories)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
