"""``python -m fflab``: the command line (and what ``torchrun -m fflab`` starts)."""

import sys

from fflab.cli import main

sys.exit(main())
