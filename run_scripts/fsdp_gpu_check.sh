#!/usr/bin/env bash
# Device check of run.strategy: fsdp on 2 GPUs (NCCL): torchrun 2 processes of the tiny stage-1
# run under ddp and fsdp (same losses), a resume from the mid-epoch sharded checkpoint (same
# losses as the uninterrupted run), and fsdp_mixed_precision=bf16 with fsdp_cpu_offload (close).
# Needs a machine with >= 2 GPUs; takes about 2 minutes. The CPU (gloo) version of the same
# check is in the default suite's tests/test_fsdp.py and the slow test beside this one.
# Usage: run_scripts/fsdp_gpu_check.sh   (from the repository root)
set -euo pipefail
exec "${PYTHON:-.venv/bin/python}" -m pytest -q -m gpu tests/test_fsdp.py -k two_gpus "$@"
