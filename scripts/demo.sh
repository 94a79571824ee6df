#!/usr/bin/env bash
# One command on a fresh machine: install into .venv, then run the daemon with the example agent.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python -u examples/demo.py
