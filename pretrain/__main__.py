"""`python -m pretrain ...` is the `ebt` command line (so `torchrun -m pretrain pretrain ...` works)."""
import sys

from .cli import main

sys.exit(main())
