#!/usr/bin/env bash
# Creates (or reuses) the project virtual environment in .venv and installs the
# project with the extras given as arguments (e.g. `dev`, `cluster`).
# CPU machines get the CPU build of torch 2.13.0; a machine that already has a
# torch in the venv (e.g. a CUDA 2.11 build) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EBT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
PIP="$VENV/bin/pip"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$PIP" install -q "torch==2.13.0"
fi
extras=$(IFS=,; echo "$*")
spec="."
[ -n "$extras" ] && spec=".[$extras]"
"$PIP" install -q -e "$spec"
