import sys

from bench.downtime.command import main

sys.exit(main())
