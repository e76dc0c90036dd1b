#!/usr/bin/env bash
# BLIP-2 stage 1 on 16 GPUs of one node; pass model paths as --options after the script name.
exec torchrun --nproc_per_node=16 -m lavis_plugins.cli train --cfg-path projects/blip2/train/pretrain_stage1.yaml "$@"
