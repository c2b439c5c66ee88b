#!/usr/bin/env bash
# One entry point that does the set-up on a fresh machine (Python >= 3.10 with pip):
#   ./run.sh demo [bench options]     the benchmark/demo on the built-in synthetic batch
#                                     (installs torch, this package and matplotlib only)
#   ./run.sh test [pytest options]    the test suite on the newest Triton; with no options it then
#                                     runs the oldest-Triton suite too (./run.sh test-oldest)
#   ./run.sh test-oldest [options]    kernel parity, from-logits, sampling and the sm_90 compile
#                                     on the oldest declared Triton (installed in $OLDEST_DIR and put
#                                     first on PYTHONPATH over the test virtualenv: one torch on disk)
#   ./run.sh gpu-check [options]      python -m bench.gpu_check: correctness and timings on CUDA
#   ./run.sh rl-demo [options]        the end-to-end off-policy RL demo (python -m bench.demo_rl)
# The virtualenv $VENV (default .venv) is created or reused; pip keeps no cache
# (PIP_NO_CACHE_DIR=1 unless set): CI machines can be short of disk. PYTHON=python3 ./run.sh ... runs with that interpreter as it is and installs nothing
# (a CUDA machine with torch and Triton preinstalled and no network).
# `pip install torch==2.13.0` takes a local CPU build of torch where the machine has one.
set -euo pipefail
shopt -s inherit_errexit   # a failure inside $(...) stops the script too
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
OLDEST_DIR="${OLDEST_DIR:-.triton-oldest}"
OLDEST_TRITON=3.5.0        # the lower bound of setup.py's triton window (kernels/compat.py)
OLDEST_NUMPY="numpy<2.4"   # Triton <= 3.6's interpreter fails under numpy 2.4
export PIP_NO_CACHE_DIR="${PIP_NO_CACHE_DIR:-1}"
say() { printf '[run.sh] %s\n' "$*" >&2; }
die() { say "error: $*"; say "free disk here: $(df -h . | tail -1)"; exit 1; }

new_venv() {  # new_venv DIR: a virtualenv whose pip imports (a half-written one is removed, tried again once)
  local try
  for try in 1 2; do
    say "creating the virtualenv $1"
    python3 -m venv "$1" && "$1/bin/python" -m pip --version >/dev/null 2>&1 && return 0
    rm -rf "$1"
  done
  die "could not create a virtualenv with a working pip in $1"
}

venv() {  # venv DIR: create DIR (if needed) with torch in it; prints its python
  [ -x "$1/bin/python" ] || new_venv "$1"
  "$1/bin/python" -c "import torch" 2>/dev/null || {
    say "$1: installing torch==2.13.0 (a CPU build where the machine has one)"
    "$1/bin/python" -m pip install -q torch==2.13.0 >&2; }
  echo "$1/bin/python"
}

pip_install() {  # pip_install PYTHON WHAT... (quiet, one progress line)
  local py=$1; shift
  say "installing $*"
  "$py" -m pip install -q "$@" >&2
}

demo_env() {
  PY=$(venv "$VENV")
  say "checking $VENV for torch, this package and matplotlib"
  # installed? (not an import: the checkout's own isreshape_triton/ is importable from here)
  { "$PY" -m pip show -q isreshape-triton && "$PY" -c "import matplotlib"; } >/dev/null 2>&1 \
    || pip_install "$PY" -e ".[bench]"
}

test_env() {
  PY=$(venv "$VENV")
  pip_install "$PY" -e ".[test]"
  # test-only oracle (tests/test_from_logits.py): Liger-Kernel's Triton GRPO loss; torch/triton are ours
  "$PY" -c "import liger_kernel" 2>/dev/null || pip_install "$PY" --no-deps liger-kernel==0.8.5
  # test-only: verl, TRL, OpenRLHF and their import-time dependencies, pinned, --no-deps (~70 s once)
  "$PY" - tests/integrations-requirements.txt <<'PYCHECK' || pip_install "$PY" --no-deps -r tests/integrations-requirements.txt
import importlib.metadata as md, re, sys
pins = [l.split("#")[0].strip() for l in open(sys.argv[1])]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
have = {norm(d.metadata["Name"]): d.version for d in md.distributions()}
sys.exit(any(have.get(norm(n)) != v for n, v in (p.split("==") for p in pins if p)))
PYCHECK
}

# The oldest Triton (and a numpy its interpreter runs under) in $OLDEST_DIR, first on
# PYTHONPATH: the test virtualenv's torch, packages and this checkout, with Triton $OLDEST_TRITON.
oldest_env() {
  [ -n "${PY:-}" ] || test_env
  export PYTHONPATH="$PWD/$OLDEST_DIR${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import triton, sys; sys.exit(triton.__version__ != '$OLDEST_TRITON')" 2>/dev/null || {
    rm -rf "$OLDEST_DIR"
    pip_install "$PY" --no-deps --target "$OLDEST_DIR" "triton==$OLDEST_TRITON" "$OLDEST_NUMPY"; }
  "$PY" -c "import triton, sys; sys.exit(triton.__version__ != '$OLDEST_TRITON')" \
    || die "$OLDEST_DIR does not give triton $OLDEST_TRITON"
}

# What CI runs on the oldest Triton (tests/oldest_triton.txt): pairwise kernel parity,
# from-logits, optimal sampling and the sm_90 compile of the representative specializations.
run_oldest() {
  oldest_env
  say "the oldest-Triton suite (triton $OLDEST_TRITON from $OLDEST_DIR)"
  mapfile -t selection < <(grep -v '^\s*#' tests/oldest_triton.txt | grep -v '^\s*$')
  "$PY" -m pytest "${selection[@]}" "$@"
}

if [ -n "${PYTHON:-}" ]; then  # the given interpreter, as it is
  PY=$PYTHON
  case "${1:-}" in
    demo) shift; exec "$PY" -m bench "$@" ;;
    test) shift; exec "$PY" -m pytest "$@" ;;
    gpu-check) shift; exec "$PY" -m bench.gpu_check "$@" ;;
    rl-demo) shift; exec "$PY" -m bench.demo_rl "$@" ;;
    *) echo "usage: PYTHON=... ./run.sh demo|test|gpu-check|rl-demo [args]" >&2; exit 2 ;;
  esac
fi

case "${1:-}" in
  demo) shift; demo_env; say "running python -m bench $*"; exec "$PY" -m bench "$@" ;;
  test) shift
    test_env
    if [ $# -gt 0 ]; then exec "$PY" -m pytest "$@"; fi
    "$PY" -m pytest
    run_oldest ;;
  test-oldest) shift; run_oldest "$@" ;;
  gpu-check) shift; demo_env; exec "$PY" -m bench.gpu_check "$@" ;;
  rl-demo) shift; demo_env; exec "$PY" -m bench.demo_rl "$@" ;;
  *) echo "usage: ./run.sh demo|test|test-oldest|gpu-check|rl-demo [args]" >&2; exit 2 ;;
esac
