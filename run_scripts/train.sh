#!/usr/bin/env bash
# Usage: NPROC=8 run_scripts/train.sh CFG_PATH [--options k=v ...]   (NPROC: processes on this node, default 1)
exec torchrun --nproc_per_node="${NPROC:-1}" -m lavis_plugins.cli train --cfg-path "$@"
