"""`python -m pretrain ...` is the `ebt` command line (so `torchrun -m pretrain pretrain ...` works)."""
import sys

from ebt.cli import main

sys.exit(main())
