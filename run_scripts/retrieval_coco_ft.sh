#!/usr/bin/env bash
exec torchrun --nproc_per_node=8 -m lavis_plugins.cli train --cfg-path projects/blip2/train/retrieval_coco_ft.yaml "$@"
