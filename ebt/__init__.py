"""The `ebt` command line: one parser assembled from each package's `add_*_subcommand(s)`
(pretrain, data_pipeline, launchers), one logging setup (ebt.log) for every command."""
