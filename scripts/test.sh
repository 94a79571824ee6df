#!/usr/bin/env bash
# One command on a fresh machine: install the test dependencies, then lint, type-check and run every
# test. Extra arguments go to pytest (e.g. scripts/test.sh -k daemon).
set -euo pipefail
BROKER_EXTRAS="[test]"
source "$(dirname "$0")/_venv.sh"

# Debian packages some tests need: systemd-analyze (unit checks), PostgreSQL (Vault database engine).
missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "note: missing Debian packages (${missing[*]}); the tests that need them will say they skip" >&2
    fi
fi
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
