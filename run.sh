#!/usr/bin/env bash
# One entry point that does all the set-up on a fresh machine (Python >= 3.10 with pip):
#   ./run.sh demo [bench options]   benchmark + demo on the built-in synthetic batch
#   ./run.sh test [pytest options]  the whole test suite (Triton kernels run in the interpreter)
#   ./run.sh rl-demo [options]       the end-to-end off-policy RL demo (python -m bench.demo_rl)
# A virtualenv is created (or reused) in $VENV (default .venv). `pip install torch==2.13.0`
# takes a local CPU build of torch where one is available instead of downloading a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[test]"
# test-only oracle (tests/test_from_logits.py): Liger-Kernel's Triton GRPO loss; torch/triton are ours
"$PY" -c "import liger_kernel" 2>/dev/null || "$PY" -m pip install -q --no-deps liger-kernel==0.8.5
# test-only: verl, TRL, OpenRLHF and their import-time dependencies, pinned, --no-deps (~70 s once)
"$PY" - tests/integrations-requirements.txt <<'PYCHECK' || "$PY" -m pip install -q --no-deps -r tests/integrations-requirements.txt
import importlib.metadata as md, re, sys
pins = [l.split("#")[0].strip() for l in open(sys.argv[1])]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
have = {norm(d.metadata["Name"]): d.version for d in md.distributions()}
sys.exit(any(have.get(norm(n)) != v for n, v in (p.split("==") for p in pins if p)))
PYCHECK
case "${1:-}" in
  demo) shift; exec "$PY" -m bench "$@" ;;
  test) shift; exec "$PY" -m pytest "$@" ;;
  rl-demo) shift; exec "$PY" -m bench.demo_rl "$@" ;;
  *) echo "usage: ./run.sh demo|test|rl-demo [args]" >&2; exit 2 ;;
esac
