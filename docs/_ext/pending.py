"""
Sphinx extension: the pages other branches of issue 14 add (the demo, the
C{twisted-criu} command, start-up errors, systemd) are listed in
C{index.md}'s tables of contents; until a page is merged, its entry is left
out (and the build says so), rather than failing the build.  Once all of
them exist, this does nothing.
"""

from __future__ import annotations

import os
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: The pages, by document name, that other branches add.
PENDING = ("demo", "cli", "errors", "systemd")


def leaveOutMissing(app: Sphinx, docname: str, source: list[str]) -> None:
    if docname != "index":
        return
    missing = [
        name for name in PENDING if not os.path.exists(os.path.join(app.srcdir, name + ".md"))
    ]
    if missing:
        logger.info(f"not merged yet, left out of the contents: {', '.join(missing)}")
        source[0] = "\n".join(
            line for line in source[0].split("\n") if line.strip() not in missing
        )


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("source-read", leaveOutMissing)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
