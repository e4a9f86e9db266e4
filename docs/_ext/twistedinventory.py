"""
Write an intersphinx inventory (C{objects.inv}) of the installed Twisted's
public API, with the addresses Twisted's own pydoctor site gives each
object, so that pydoctor can link C{L{Deferred}} to Twisted's API docs
without fetching Twisted's inventory (the docs build has no network).

    python docs/_ext/twistedinventory.py OUTPUT.inv

It imports the modules of the packages in L{PACKAGES} (never their tests or
private modules), and lists each module, and each public class, function
and constant a module defines (or re-exports in its C{__all__}), with the
public members of those classes and the names of its zope interfaces.  pydoctor's addresses: a module or class
has its own page (C{twisted.internet.defer.Deferred.html}); functions,
constants and methods are anchors on their module's or class's page.
"""

from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
import sys
import types
import warnings
import zlib
from typing import Iterator

from zope.interface.interface import InterfaceClass, Method

#: The packages whose modules are listed.
PACKAGES = (
    "twisted.application",
    "twisted.internet",
    "twisted.logger",
    "twisted.plugin",
    "twisted.protocols",
    "twisted.python",
    "twisted.trial",
    "twisted.web",
)

#: (name, role, uri) rows.
Row = tuple[str, str, str]


def _isPrivate(dotted: str) -> bool:
    parts = dotted.split(".")
    return any(p.startswith("_") or p in ("test", "tests") for p in parts)


def modules() -> Iterator[types.ModuleType]:
    """Every public module of L{PACKAGES} that imports here."""
    for name in PACKAGES:
        try:
            package = importlib.import_module(name)
        except Exception:
            continue
        yield package
        path = getattr(package, "__path__", None)
        if path is None:
            continue
        for info in pkgutil.walk_packages(path, name + ".", onerror=lambda _: None):
            if _isPrivate(info.name) or info.name.endswith("reactor"):
                continue
            try:
                yield importlib.import_module(info.name)
            except Exception:
                continue


def _publicNames(module: types.ModuleType) -> list[str]:
    exported = getattr(module, "__all__", None)
    if exported is not None:
        return [n for n in exported if isinstance(n, str)]
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and getattr(value, "__module__", None) == module.__name__
    ]


def rows(module: types.ModuleType) -> Iterator[Row]:
    """The inventory rows of one module and what it defines."""
    page = module.__name__ + ".html"
    yield module.__name__, "py:module", page
    for name in _publicNames(module):
        value = getattr(module, name, None)
        dotted = f"{module.__name__}.{name}"
        if isinstance(value, InterfaceClass):
            yield dotted, "py:class", dotted + ".html"
            for member in value.names():
                role = "py:method" if isinstance(value[member], Method) else "py:attribute"
                yield f"{dotted}.{member}", role, f"{dotted}.html#{member}"
        elif inspect.isclass(value):
            classPage = dotted + ".html"
            yield dotted, "py:class", classPage
            for member, attribute in vars(value).items():
                if member.startswith("_"):
                    continue
                role = "py:method" if callable(attribute) else "py:attribute"
                yield f"{dotted}.{member}", role, f"{classPage}#{member}"
        elif inspect.isfunction(value) or inspect.isbuiltin(value):
            yield dotted, "py:function", f"{page}#{name}"
        elif value is not None and not inspect.ismodule(value):
            yield dotted, "py:data", f"{page}#{name}"


def inventory(version: str, found: list[Row]) -> bytes:
    """An C{objects.inv} (version 2) of C{found}."""
    header = (
        "# Sphinx inventory version 2\n"
        "# Project: Twisted\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = io.StringIO()
    for name, role, uri in sorted(set(found)):
        body.write(f"{name} {role} 1 {uri} -\n")
    return header.encode() + zlib.compress(body.getvalue().encode())


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python docs/_ext/twistedinventory.py OUTPUT.inv", file=sys.stderr)
        return 2
    import twisted

    found: list[Row] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in modules():
            found.extend(rows(module))
    with open(argv[1], "wb") as f:
        f.write(inventory(twisted.__version__, found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
