"""
Sphinx configuration of twisted-criu's documentation: the narrative pages
(Markdown, through MyST) and the API reference (pydoctor, run by its Sphinx
extension into C{api/}, as Twisted builds its own).  C{admin/docs} builds
both with warnings as errors.
"""

from __future__ import annotations

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, os.path.join(DOCS, "_ext"))
sys.path.insert(0, ROOT)

import twisted_criu  # noqa: E402

project = "twisted-criu"
author = "the twisted-criu authors"
copyright = "the twisted-criu authors"
version = release = twisted_criu.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.intersphinx",
    "pydoctor.sphinx_ext.build_apidocs",
    "inventories",
    "examples",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "_ext", "examples", "Thumbs.db", ".DS_Store"]

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

html_theme = "alabaster"
# Wide enough for the logs and commands the pages show.
html_theme_options = {"page_width": "1240px", "sidebar_width": "240px", "body_max_width": "none"}
html_title = f"twisted-criu {release}"
html_static_path = ["_static"]
html_css_files = ["outputs.css"]

# Only the API reference below is linked through intersphinx (pydoctor's
# extension adds it); nothing is fetched.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

# pydoctor's API reference, written to api/ in the HTML output.  The
# inventories extension adds --intersphinx-file for Python's and Twisted's
# APIs, so that links into them resolve without a network.
pydoctor_args = [
    "--project-name=twisted-criu",
    f"--project-version={release}",
    f"--project-base-dir={ROOT}",
    "--docformat=epytext",
    "--html-output={outdir}/api",
    # Generated protobuf code: no docstrings, and only wire.py imports it.
    "--privacy=HIDDEN:twisted_criu._pb",
    "--privacy=HIDDEN:twisted_criu._pb.*",
    os.path.join(ROOT, "twisted_criu"),
]
pydoctor_url_path = "api/"

# The outputs and figures the pages show: each docs/examples/*.py script is
# run by the examples extension before the pages are read, and writes into
# docs/_generated/<script>/.
examples_dir = os.path.join(DOCS, "examples")
examples_output = os.path.join(DOCS, "_generated")
# What measures throughput runs alone, once pydoctor is done.
examples_alone = ["benchmark.py"]
