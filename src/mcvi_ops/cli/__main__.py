"""``python -m mcvi_ops.cli``: the ``mcvi-ops`` command line."""

import sys

from . import main

sys.exit(main())
