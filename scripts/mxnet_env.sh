#!/usr/bin/env bash
# Build (or reuse) the separate MXNet 1.9.1 environment at .mxnet-venv/ that the compatibility tests
# (tests/test_mxnet_compat.py, pytest -m mxnet) use to read and write RecordIO with MXNet itself.
#
# WHY a separate venv: mxnet 1.9.1 needs numpy < 1.24 (it uses np.bool etc.), while the project venv
# holds numpy >= 2 for ray[train]. Only binary wheels are accepted (--only-binary=:all:): a source
# build of numpy/opencv would take tens of minutes and hide a missing wheel.
#
# Idempotent: if .mxnet-venv already imports mxnet 1.9.1 + numpy + cv2, nothing is installed.
# Prints the interpreter path on the last line of stdout. Exits non-zero with a message if pip
# cannot get the wheels or mxnet cannot be imported (e.g. missing system libs libgomp1/libquadmath0).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MXNET_VENV:-$root/.mxnet-venv}"
py="${PYTHON:-python3}"
py_bin="$venv/bin/python"

check='import mxnet as mx, numpy, cv2
assert mx.__version__ == "1.9.1", mx.__version__
assert hasattr(mx.recordio, "MXIndexedRecordIO")
print("mxnet", mx.__version__, "numpy", numpy.__version__, "opencv", cv2.__version__)'

if [ -x "$py_bin" ] && versions="$("$py_bin" -c "$check" 2>/dev/null)"; then
  echo "MXNet environment already ready in $venv ($versions)" >&2
  echo "$py_bin"
  exit 0
fi

if ! "$py" -c 'import sys; assert sys.version_info[:2] <= (3, 11)' 2>/dev/null; then
  echo "mxnet_env.sh: $py is $("$py" -V 2>&1); mxnet 1.9.1 / numpy<1.24 have wheels only up to" \
       "Python 3.11. Set PYTHON=/path/to/python3.11." >&2
  exit 2
fi

start=$(date +%s)
[ -x "$py_bin" ] || "$py" -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$py_bin" -m pip install -q --only-binary=:all: \
     "mxnet==1.9.1" "numpy<1.24" "opencv-python-headless<4.12" >&2; then
  echo "mxnet_env.sh: pip could not install binary wheels of mxnet==1.9.1, numpy<1.24 and" \
       "opencv-python-headless<4.12 for $("$py_bin" -V 2>&1) into $venv (needs PyPI access and" \
       "manylinux x86_64 wheels). See the pip output above." >&2
  exit 3
fi

if ! versions="$("$py_bin" -c "$check" 2>&1)"; then
  echo "mxnet_env.sh: mxnet was installed in $venv but does not import:" >&2
  echo "$versions" >&2
  echo "If a shared library is missing (libgomp.so.1 / libquadmath.so.0), install the Debian" \
       "packages: apt-get install -y libgomp1 libquadmath0" >&2
  exit 4
fi
echo "MXNet environment built in $venv in $(( $(date +%s) - start ))s ($versions)" >&2
echo "$py_bin"
