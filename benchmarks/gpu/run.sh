#!/usr/bin/env bash
# Issue #15's GPU check in one device call (at most 8 minutes): install the carried wheels,
# check that LAVIS and lavis_plugins import, then run checks a-f (benchmarks/gpu/gpu_check.py),
# each in its own process with its own time budget. Results: $OUT/results.json, logs:
# $OUT/gpu_check.log and $OUT/check_<x>.log (8 files, the most a device call brings back).
#
#   make gpu-wheels                                   # here, once: fills .whl/ (~29 MiB)
#   bash benchmarks/gpu/run.sh                        # on the GPU machine, .whl carried
#   bash benchmarks/gpu/run.sh --dry-run              # here: the same checks on the CPU, tiny
#   bash benchmarks/gpu/run.sh --only c,d             # any gpu_check.py option passes through
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [[ " $* " == *" --dry-run "* ]]; then
    PY=${PYTHON:-.venv/bin/python}
else
    # the GPU machine's python3 holds torch 2.11 and transformers 5.x; LAVIS needs 4.x: the
    # carried wheels go first on the path
    PY=${PYTHON:-python3}
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "run.sh: no .whl/*.whl: run 'make gpu-wheels' in the checkout and carry .whl" | tee -a "$LOG"
        exit 2
    fi
    t0=$(date +%s)
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
        echo "run.sh: installing .whl/ failed (see $LOG)" | tee -a "$LOG"
        exit 2
    fi
    echo "run.sh: wheels installed in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# spacy (~40 MB with its dependencies) is not carried: an import stand-in where it is missing
"$PY" -c "import spacy" 2>/dev/null || export PYTHONPATH=$PYTHONPATH:$PWD/benchmarks/gpu/shims

# fail in seconds, not after every check has failed the same way
if ! "$PY" -c "import lavis, lavis_plugins" >>"$LOG" 2>&1; then
    echo "run.sh: 'import lavis, lavis_plugins' failed (its traceback is in $LOG)" | tee -a "$LOG"
    tail -n 5 "$LOG"
    exit 3
fi
"$PY" benchmarks/gpu/gpu_check.py --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
