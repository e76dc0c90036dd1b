#!/usr/bin/env bash
# Usage on each node: NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 NPROC=8 run_scripts/multinode_train.sh CFG_PATH [--options ...]
exec torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" --nproc_per_node="${NPROC:-8}" -m lavis_plugins.cli train --cfg-path "$@"
