#!/usr/bin/env bash
# One command on a fresh machine: install the test dependencies, then lint, type-check and run every
# test. Extra arguments go to pytest (e.g. scripts/test.sh -k daemon).
set -euo pipefail
BROKER_EXTRAS="[test]"
source "$(dirname "$0")/_venv.sh"
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
