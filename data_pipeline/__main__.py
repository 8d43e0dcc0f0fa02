"""`python -m data_pipeline build|verify ...`: the `ebt data` commands without the `ebt` wrapper."""
import sys

from data_pipeline.cli import main

sys.exit(main())
