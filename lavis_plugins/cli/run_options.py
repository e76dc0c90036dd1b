"""The ``run:`` keys of an experiment YAML, for ``lavis-plugins train|evaluate --help``.

Plain data (no imports), so help stays fast. The runner (``lavis_plugins/runners/runner.py``)
and the tasks (``lavis_plugins/tasks/``) read these keys; their defaults are written there and
repeated here only as text for the reader.
"""
from __future__ import annotations

from typing import Tuple

# (key, default, meaning)
RUN_OPTIONS: Tuple[Tuple[str, str, str], ...] = (
    ("task", "required", "registered task, e.g. lp_image_text_pretrain, lp_captioning, lp_vqa"),
    ("runner", "lp_runner", "registered runner"),
    ("max_epoch", "required to train", "epochs"),
    ("iters_per_epoch", "whole split", "cap on batches per epoch"),
    ("batch_size_train", "required to train", "batch per process"),
    ("batch_size_eval", "batch_size_train", "evaluation batch per process"),
    ("init_lr", "required to train", "peak learning rate"),
    ("min_lr", "0", "lr at the end of the cosine decay"),
    ("warmup_lr / warmup_steps", "-1 / 0", "linear warm-up start lr and length (optimizer steps)"),
    ("lr_sched", "lp_linear_warmup_cosine", "lp_linear_warmup_cosine or lp_constant (per step)"),
    ("weight_decay", "0.05", "AdamW weight decay (none on biases and norms)"),
    ("beta1 / beta2", "0.9 / 0.999", "AdamW betas (BLIP-2: 0.9 / 0.98)"),
    ("layer_decay", "1.0", "layer-wise lr decay of an unfrozen image encoder"),
    ("accum_grad_iters", "1", "batches per optimizer step"),
    ("max_grad_norm", "off", "gradient clipping norm"),
    ("amp / amp_dtype", "false / bf16", "autocast on GPU (bf16 or fp16 with loss scaling)"),
    ("device", "auto", "auto (cuda when visible), cuda or cpu"),
    ("strategy", "ddp", "ddp (a full copy per process) or fsdp (sharded; README: FSDP)"),
    ("fsdp_sharding", "full_shard", "fsdp: full_shard, shard_grad_op, hybrid_shard, no_shard"),
    ("fsdp_mixed_precision", "none", "fsdp: none (float32) or bf16 (compute, fp32 reduce)"),
    ("fsdp_cpu_offload", "false", "fsdp: sharded weights in CPU memory (CUDA only)"),
    ("num_workers", "0", "data-loading processes"),
    ("persistent_workers", "true with workers", "keep loader workers across epochs (not shards)"),
    ("prefetch_factor", "2", "batches each loader worker prepares ahead"),
    ("compile", "false", "torch.compile the frozen encoder and Q-Former step (lp_blip2_qformer)"),
    ("seed", "42", "seed (each rank adds its rank)"),
    ("train_splits / valid_splits / test_splits", "[train] / [] / []", "dataset splits"),
    ("evaluate", "false", "evaluate only (what `evaluate` sets)"),
    ("output_dir", "output", "runs go to <output_dir>/<job-id>/"),
    ("resume_ckpt_path", "none", "training checkpoint to continue exactly from"),
    ("ckpt_freq", "0", "also save every N optimizer steps (0: epoch ends only)"),
    ("force", "false", "replace a finished run in the same output folder"),
    ("on_nonfinite / max_nonfinite_skips", "stop / 10",
     "non-finite loss: stop, or skip the step (checked at log steps, checkpoints, epoch ends)"),
    ("on_bad_sample / max_bad_fraction", "fail / 0.01", "unreadable sample: fail, or skip it"),
    ("log_freq", "50", "train_log.jsonl line every N batches"),
    ("tensorboard", "false", "also log losses, lr and metrics to <run>/tensorboard"),
    ("k_test", "128", "retrieval: ITC candidates re-ranked by ITM per query"),
    ("topk_save", "10", "retrieval: best matches per query in result/*_retrieval_topk.json"),
    ("prompt", "the model's", "captioning / VQA prompt, e.g. 'Question: {} Answer:'"),
)


def run_options_help() -> str:
    """The table for an argparse epilog."""
    width = max(len(k) for k, _, _ in RUN_OPTIONS)
    dwidth = max(len(d) for _, d, _ in RUN_OPTIONS)
    lines = ["run: options of the YAML (override with --options run.KEY=VALUE):",
             f"  {'key':<{width}}  {'default':<{dwidth}}  meaning"]
    lines += [f"  {k:<{width}}  {d:<{dwidth}}  {m}" for k, d, m in RUN_OPTIONS]
    return "\n".join(lines)
