# -*- test-case-name: tests.slow.test_demo,tests.slow.test_criu_demo -*-
"""
The migration demo (C{./admin/demo}, C{twisted-criu-demo}, C{python -m
twisted_criu.testing.demo}): a real C{twistd criu-proxy} and C{twistd
criu-cache} on loopback, and a migration through them.

  - L{command<twisted_criu.testing.demo.command>}: chooses the run, cleans up.
  - L{real<twisted_criu.testing.demo.real>}: a real process moved by a
    real criu (C{--stream} and C{twisted-criu-hook}), where criu can run
    (L{findcriu<twisted_criu.testing.demo.findcriu>} decides).
  - L{synthetic<twisted_criu.testing.demo.synthetic>}: criu played by the
    demo (L{playcriu<twisted_criu.testing.demo.playcriu>}), every image
    checked by SHA-256; C{--synthetic}, or where criu cannot run.
  - L{daemons<twisted_criu.testing.demo.daemons>}: the two daemons;
    L{options<twisted_criu.testing.demo.options>}: the command line;
    L{output<twisted_criu.testing.demo.output>}: what it prints.
"""

from twisted_criu.testing.demo.command import main

__all__ = ["main"]
