"""`python -m ebt ...` is the `ebt` command line."""
import sys

from ebt.cli import main

sys.exit(main())
