"""C{python -m twisted_criu.cli}: the C{twisted-criu} command."""

import sys

from twisted_criu.cli import main

sys.exit(main())
