"""``python -m prunegraph.cli``: the same command line as the ``prunegraph`` script."""

import sys

from prunegraph.cli.main import main

sys.exit(main())
