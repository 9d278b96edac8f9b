#!/usr/bin/env bash
# Copy the working tree to DEST and compile the data path there in place (setup.py,
# SHADOWPROXY_COMPILE=1), so that tests and benchmarks can run the compiled build from DEST
# with the project's virtualenv: `cd DEST && python -m pytest`, or PYTHONPATH=DEST.
#
#   bash tools/compiled-tree.sh /tmp/shadowproxy-compiled [PYTHON] [WHEEL]
#
# PYTHON (default .venv/bin/python) needs mypy and setuptools>=77; a C compiler and the
# Python headers must be installed (.ci/run installs them). With WHEEL (a compiled wheel of
# the same source, `SHADOWPROXY_COMPILE=1 pip wheel .`) its compiled modules are put in the
# tree instead of compiling them again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest=${1:?usage: compiled-tree.sh DEST [PYTHON]}
python=${2:-$root/.venv/bin/python}
wheel=${3:-}
rm -rf "$dest"
mkdir -p "$dest"
# Everything but virtualenvs, build output and git's store: tests read config/, examples/,
# deploy/ and the README too.
tar -C "$root" --exclude=./.git --exclude='./.venv*' --exclude=./build \
    --exclude='*.so' --exclude=__pycache__ --exclude='./bench/results' -cf - . \
  | tar -C "$dest" -xf -
cd "$dest"
if [[ -n $wheel ]]; then
  # The wheel's extension modules land where an in-place build puts them.
  "$python" -c "import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall('.', [n for n in z.namelist() if n.endswith('.so')])" "$wheel"
else
  SHADOWPROXY_COMPILE=1 "$python" setup.py -q build_ext --inplace >build.log 2>&1 || {
    tail -40 build.log >&2
    echo "compiled-tree.sh: compiling the data path failed (log above, full log $dest/build.log)" >&2
    exit 1
  }
fi
"$python" -c "import shadowproxy.build as b; assert b.compiled(), 'not compiled'; print(b.__name__, b.describe())" 
