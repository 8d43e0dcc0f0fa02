"""`python -m ebt ...` is the `ebt` command line."""
import sys

from .cli import main

sys.exit(main())
