"""``python -m dynconv``: the command line (see :mod:`dynconv.cli`)."""

import sys

from .cli import main

sys.exit(main())
