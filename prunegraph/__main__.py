"""``python -m prunegraph``: the same command line as the ``prunegraph`` script."""

import sys

from prunegraph.cli import main

sys.exit(main())
