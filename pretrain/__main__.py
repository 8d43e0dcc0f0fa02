"""`python -m pretrain ...` is the `ebt` command line (so `torchrun -m pretrain pretrain ...`
works). An entry-point script, not part of the library: it is the one module of pretrain that
imports the top layer (ebt), and no module imports it."""
import sys

from ebt.cli import main

sys.exit(main())
