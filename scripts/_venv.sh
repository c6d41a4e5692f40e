# Sourced by run.sh and test.sh: make the virtual environment if needed and
# install planes into it (building the Cython extensions and the gRPC code).
# EXTRAS selects optional dependencies ("test" for the suite).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${PLANES_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "planes needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install --upgrade pip
# Build requirements go into the environment itself and the build runs without
# isolation, so the protoc that generates the code and the protobuf runtime
# that imports it come from one resolution.
pip_install "setuptools>=77" wheel "cython>=3.0" "grpcio-tools>=1.66"
pip_install --no-build-isolation "$ROOT${EXTRAS:+[$EXTRAS]}"
