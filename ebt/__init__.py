"""The `ebt` command line: the one entry point, above the four packages (pretrain, parallel,
data_pipeline, launchers). It may import all of them; none of them imports it (the layering
test in tests/unit/test_layering.py checks this), except the `python -m pretrain` script."""
