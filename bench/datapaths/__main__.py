import sys

from bench.datapaths.command import main

sys.exit(main(sys.argv[1:]))
