"""C{python -m twisted_criu.testing.demo}: the migration demo."""

import sys

from twisted_criu.testing.demo.command import main

sys.exit(main())
