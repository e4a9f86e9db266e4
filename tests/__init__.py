"""
twisted-criu's tests.

The daemons secure their link with a key file, by default under /etc for
root: the tests give every daemon they start (in this process or as a child)
a key of their own instead, through C{$TWISTED_CRIU_LINK_KEY}, in a
directory removed when the run ends.  They do not inherit
C{$NOTIFY_SOCKET} either: run under a systemd service, they would tell it
they are ready, or stopping.
"""

import atexit
import os
import shutil
import tempfile

if not os.environ.get("TWISTED_CRIU_LINK_KEY"):
    _keys = tempfile.mkdtemp(prefix="twisted-criu-test-key-")
    atexit.register(shutil.rmtree, _keys, True)
    os.environ["TWISTED_CRIU_LINK_KEY"] = os.path.join(_keys, "link.key")

os.environ.pop("NOTIFY_SOCKET", None)
