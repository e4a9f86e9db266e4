"""
The package's layout, for the architecture page:

    python docs/examples/layout.py OUTPUT_DIR

Writes C{layout.md}: a Markdown table of every package and module of
C{twisted_criu} (the generated C{_pb} left out), in the order of the
source tree, each linked to its API page and described by the first line
of its docstring, so the table follows the code.
"""

from __future__ import annotations

import ast
import os
import sys

PACKAGE = "twisted_criu"


def firstLine(path: str) -> str:
    with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    line = doc.strip().split("\n\n")[0].replace("\n", " ")
    if line.endswith("::"):  # epytext's literal block follows
        line = line[:-1]
    # epytext markup, as plain Markdown code
    for mark in ("C{", "L{", "I{", "B{"):
        line = line.replace(mark, "`" if mark in ("C{", "L{") else "")
    return line.replace("}", "`").replace("|", "\\|")


def modules(root: str) -> list[tuple[str, str]]:
    found = []
    for directory, dirs, files in os.walk(os.path.join(root, PACKAGE)):
        dirs[:] = sorted(d for d in dirs if d not in ("_pb", "__pycache__"))
        package = os.path.relpath(directory, root).replace(os.sep, ".")
        if "__init__.py" in files:
            found.append((package, os.path.join(directory, "__init__.py")))
        for name in sorted(files):
            if name.endswith(".py") and name != "__init__.py":
                found.append((f"{package}.{name[:-3]}", os.path.join(directory, name)))
    return found


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/examples/layout.py OUTPUT_DIR")
    lines = ["| module | what it is |", "|---|---|"]
    for dotted, path in modules(os.getcwd()):
        depth = dotted.count(".")
        lines.append(f"| {'&nbsp;' * 4 * (depth - 1)}{{py:mod}}`{dotted}` | {firstLine(path)} |")
    with open(os.path.join(sys.argv[1], "layout.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
