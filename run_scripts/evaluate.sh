#!/usr/bin/env bash
# Usage: NPROC=8 run_scripts/evaluate.sh CFG_PATH [--options k=v ...]
exec torchrun --nproc_per_node="${NPROC:-1}" -m lavis_plugins.cli evaluate --cfg-path "$@"
