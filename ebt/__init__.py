"""The `ebt` command line: one parser assembled from each package's `add_*_subcommand(s)`
(pretrain, data_pipeline, launchers), one logging setup (ebt.log) for every command.

It sits above the four packages (pretrain, parallel, data_pipeline, launchers) and may import
all of them; none of them imports it (tests/unit/test_layering.py), except the `python -m
pretrain` script."""
