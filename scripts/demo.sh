#!/usr/bin/env bash
# The README's run command: installs the project and runs the default experiment
# (a short real EBT pretraining run on Shakespeare that ships with the project).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/ebt pretrain "$@"
