# Shared by demo.sh and test.sh: make .venv with the project installed (editable) and its native
# extensions compiled in place. Sourced, not run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel "Cython>=3.0"
.venv/bin/python -m pip install -q -e ".${BROKER_EXTRAS:-}"
# Editable installs do not reliably build extensions next to the sources; do it explicitly so the
# native backends load (the daemon logs which backend it runs).
.venv/bin/python setup.py -q build_ext --inplace
