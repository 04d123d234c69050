#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with gemma-keras (editable) and the test
# extras. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "ready: activate with 'source .venv/bin/activate', or call .venv/bin/gemma-keras"
