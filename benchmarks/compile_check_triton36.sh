#!/usr/bin/env bash
# The CPU compile check (tests/compile_kernels.py) under Triton 3.6, the GPU machine's version,
# which spills more registers than the venv's 3.8 on the same kernels: run it before resolving
# a kernel change, and compare its "attention spill stores" line with the venv's.
#
#   bash benchmarks/compile_check_triton36.sh                         # --representative --arch 90
#   bash benchmarks/compile_check_triton36.sh --quick --arch 90 --jobs 2
#
# It builds (once) a throwaway venv holding only triton==3.6.* and sees everything else (torch,
# numpy, the editable llm2vec_fast) through the project venv's site-packages, placed after its
# own, so that `import triton` finds 3.6. Settings: TRITON36_VENV (default
# ${TMPDIR:-/tmp}/llm2vec-fast-triton36), TRITON36_WHEELS (a folder holding the triton wheel, for
# an offline install; default: the package index), PYTHON (default .venv/bin/python). The venv is
# not removed: delete its folder when done.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
VENV=${TRITON36_VENV:-${TMPDIR:-/tmp}/llm2vec-fast-triton36}
[[ $# -gt 0 ]] || set -- --representative --arch 90

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import triton' 2>/dev/null; then
  "$PYTHON" -m venv "$VENV"
  source_args=()
  [[ -n "${TRITON36_WHEELS:-}" ]] && source_args=(--no-index --find-links "$TRITON36_WHEELS")
  "$VENV/bin/python" -m pip install --quiet --no-deps "${source_args[@]}" "triton==3.6.*"
  own=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  main=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # a .pth line that starts with "import" runs: the project venv's packages (and their own .pth
  # files, such as the editable install's) come after this venv's triton
  echo "import site; site.addsitedir('$main')" >"$own/zz_project_venv.pth"
fi

version=$("$VENV/bin/python" -c 'import triton; print(triton.__version__)')
[[ "$version" == 3.6.* ]] || { echo "expected Triton 3.6 in $VENV, found $version" >&2; exit 2; }
echo "Triton $version from $VENV"
cd "$ROOT"
exec "$VENV/bin/python" tests/compile_kernels.py "$@"
