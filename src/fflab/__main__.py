"""``python -m fflab``: the command line (and what ``torchrun -m fflab`` starts)."""

from fflab.cli import run

run()
