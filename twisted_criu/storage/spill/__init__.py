# -*- test-case-name: tests.test_storage -*-
"""
Memory up to a budget shared by all images, then files on disk.

Each image keeps its first bytes in memory while the daemon-wide budget
allows, in a memfd (kernel memory: no page faults in the daemon, and pipes
splice into it without a copy through Python); once a write would exceed
the budget, that image's remaining bytes go to a private file, written and
read with direct I/O (C{O_DIRECT}) through one aligned staging buffer per
open run: on a VM, the page cache costs two to three CPU-seconds per GB
while direct I/O costs a tenth of that.  Spill files live in a directory of their own (mode 0700,
files 0600, random names never derived from image names) under the spill
directory; it is removed when the store closes, and a directory left by a
crashed daemon is removed by the next store that starts there.

The modules: L{store} (the store, its writers and images), L{readers},
L{diskio} (staging and the I/O threads), L{directories}.
"""

from twisted_criu.storage.spill.directories import openSpillFile, removeStaleSpillDirs
from twisted_criu.storage.spill.diskio import BLOCK, STAGE_SIZE
from twisted_criu.storage.spill.store import SpillImage, SpillStore

__all__ = ["BLOCK", "STAGE_SIZE", "SpillImage", "SpillStore", "openSpillFile", "removeStaleSpillDirs"]
