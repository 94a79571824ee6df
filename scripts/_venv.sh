# Shared by demo.sh and test.sh: make .venv with the project installed (editable) and its native
# extensions compiled in place. Sourced, not run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
# What a bare Debian python3 lacks: venv's ensurepip (python3-venv) and the headers the native
# extensions compile against (python3-dev). Installed when we can, else named.
headers="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h"
if ! "$PYTHON" -c "import ensurepip" 2>/dev/null || [ ! -f "$headers" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv python3-dev \
            >/dev/null
    else
        echo "missing: Python's venv module or headers; install python3-venv and python3-dev" >&2
        exit 1
    fi
fi
# A venv an earlier run left half-made (no pip) is made again rather than reused.
if [ -x .venv/bin/python ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "note: .venv is incomplete (an earlier run failed); making it again" >&2
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" "Cython>=3.0"
.venv/bin/python -m pip install -q -e ".${BROKER_EXTRAS:-}"
# Editable installs do not reliably build extensions next to the sources; do it explicitly so the
# native backends load (the daemon logs which backend it runs).
.venv/bin/python setup.py -q build_ext --inplace
