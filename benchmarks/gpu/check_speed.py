"""Checks c, d, e: real-size throughput, ours vs LAVIS, with the benchmark scripts' own builders
and timed steps (bench_stage1, bench_stage2, bench_video_qa), run in this one process: the two
implementations alternate round by round, each model built directly on the GPU and freed before
the next one is built (peak memory is measured above what is allocated when its timing starts).

c. Stage-1 training step at real size (EVA ViT-g frozen, fp16; Q-Former 12 x 768, 32 queries;
   fp16 autocast + GradScaler as LAVIS's runner, bench_stage1's real-size setting), batch
   ``S1_BATCH``: images/s, peak memory, LAVIS/ours; then ours fed cached encoder features
   (``image_embeds``, as the feature cache serves them) against ours running the encoder, and a
   torch.profiler table of ours' step (the log holds it; the JSON its top operators).
d. Stage-2 training step (ViT-g + OPT-2.7B shapes, fp16), batch ``S2_BATCH``, and batched greedy
   generation (batch 16, 20 new tokens): images/s, tokens/s, peak memory, ratios.
e. Zero-shot video QA end to end, 8 frames, real-size shapes: videos/s of ours against the
   LAVIS-built pipeline, per stage, and how many answers agree on the same frames. Clips are
   written with OpenCV (MPEG-4 Part 2) and both sides decode with decord: the GPU machine has no
   PyAV (our default backend; its 36 MB wheel is left out of the carried wheels).

Dry run: the same calls at the scripts' tiny sizes on the CPU, one round.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from _gpu_common import building_on, device, free, keep_cwd, stage1_args, stage2_args

S1_BATCH = 64
S2_BATCH = 16
# alternating rounds of each implementation on the GPU (1 in a dry run); stage 2 loads OPT-2.7B
# for every round, which one round of each already takes most of its budget
ROUNDS = {"c": 2, "d": 1, "e": 2}


def _rounds(dry_run: bool, check: str) -> int:
    return 1 if dry_run else ROUNDS[check]


def _alternate(rec, key: str, rounds: int, run: Callable[[str], Dict[str, Any]],
               summarise: Callable[[Dict[str, List[dict]]], Dict[str, Any]]) -> Dict[str, Any]:
    """Run ``run(impl)`` for ours and LAVIS in turns, recording the summary after each run."""
    runs: Dict[str, List[dict]] = {"ours": [], "lavis": []}
    for _ in range(rounds):
        for impl in runs:
            runs[impl].append(run(impl))
            free()
            rec.put(key, summarise(runs))
    return rec.data[key]


# the LAVIS side in this one process: LAVIS 1.0.2 under the carried transformers 4.46 with its
# OPT key/value cache restored (bench_stage2's "lavis446" side; as installed it reads ``past``
# and recomputes every token, which would flatter ours)
LAVIS_SIDE = "lavis446"


def _side(impl: str) -> str:
    return LAVIS_SIDE if impl == "lavis" else impl


def _timed_and_memory(run_impl: Callable[[argparse.Namespace], dict], ns: argparse.Namespace,
                      impl: str, phases: Dict[str, Any]) -> dict:
    """One side's timed run, then its memory runs (``phases``: result key -> ``--memory-run``
    value), each building the model afresh, as the benchmark scripts' own processes do."""
    ns.impl, ns.memory_run = _side(impl), None
    out = dict(run_impl(ns))
    for key, phase in phases.items():
        free()
        ns.memory_run = phase
        mem = run_impl(ns)
        out[key] = mem.get("peak_mb", float("nan"))
    ns.memory_run = None
    return out


def _median(runs: List[dict], key: str) -> float:
    return statistics.median(x for r in runs for x in r[key])


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def check_c(rec, dry_run: bool) -> None:
    import bench_stage1

    dev = device(dry_run)
    ns = stage1_args(dry_run, ["--real-size", "--batch", str(S1_BATCH), "--steps", "5",
                               "--warmup", "2"], ["--batch", "4", "--steps", "1", "--warmup", "1"])

    def summarise(runs):
        out = {"batch": ns.batch, "real_size": ns.real_size, "device": dev,
               "precision": "fp16 autocast + GradScaler" if not dry_run else "fp32"}
        for impl, rs in runs.items():
            if rs:
                t = _median(rs, "times")
                out[impl] = {"step_ms": round(t * 1e3, 2), "images_per_s": round(ns.batch / t, 2),
                             "peak_mb": round(max(r["peak_mb"] for r in rs), 1),
                             "rounds": len(rs)}
        if runs["ours"] and runs["lavis"]:
            out["speedup_lavis_over_ours"] = _ratio(out["lavis"]["step_ms"],
                                                    out["ours"]["step_ms"])
        return out

    with tempfile.TemporaryDirectory() as tmp:
        with keep_cwd():
            ns.bert_dir = str(bench_stage1.make_bert(ns, Path(tmp)))

        def run(impl):
            with keep_cwd(), building_on(dev):
                return _timed_and_memory(bench_stage1.run_impl, ns, impl, {"peak_mb": True})

        _alternate(rec, "stage1", _rounds(dry_run, "c"), run, summarise)
        feature_cache(rec, ns, dev)


def _time_steps(step: Callable[[], Any], warmup: int, steps: int, cuda: bool) -> float:
    """Median wall seconds of ``steps`` calls of ``step`` after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile(step: Callable[[], Any], cuda: bool, steps: int = 2, top: int = 15
            ) -> List[Dict[str, Any]]:
    """torch.profiler over ``steps`` calls of ``step``: the full table of the operators with
    the most self time goes to the log, the ``top`` of them into the JSON."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    print(prof.key_averages().table(sort_by=key, row_limit=40), flush=True)
    return [{"op": e.key, "self_ms_per_step": round(getattr(e, key, 0) / 1e3 / steps, 3),
             "calls_per_step": e.count // steps} for e in events[:top]]


def feature_cache(rec, ns: argparse.Namespace, dev: str) -> None:
    """Ours with the encoder inline vs fed its cached outputs (the cache stores fp16)."""
    import torch

    import bench_stage1
    from _bench_common import captions, train_step

    ns.impl = "ours"
    torch.manual_seed(0)
    with keep_cwd(), building_on(dev):
        model = bench_stage1.build(ns, Path(ns.bert_dir)).to(dev)
    model.train()
    cuda = dev.startswith("cuda")
    images = torch.randn(ns.batch, 3, 224, 224, device=dev)
    texts = captions(ns.batch)
    with torch.no_grad():  # vit_features runs fp16 weights under autocast itself
        embeds = model.vit_features(images).half().float()  # (B, 257, Dv), as served
    out = {"batch": ns.batch}
    for name, samples in (("inline_encoder", {"image": images, "text_input": texts}),
                          ("cached_features", {"image_embeds": embeds, "text_input": texts})):
        step = train_step(model, samples, amp=cuda and ns.real_size)
        t = _time_steps(step, ns.warmup, ns.steps, cuda)
        out[name] = {"step_ms": round(t * 1e3, 2), "images_per_s": round(ns.batch / t, 2)}
        if name == "inline_encoder":  # where the step's time goes, for a missed goal
            rec.put("stage1_profile_ours", profile(step, cuda, steps=2 if cuda else 1))
        del step
        rec.put("stage1_feature_cache", out)
    out["speedup_cached_over_inline"] = _ratio(out["inline_encoder"]["step_ms"],
                                               out["cached_features"]["step_ms"])
    rec.put("stage1_feature_cache", out)
    del model
    free()


def check_d(rec, dry_run: bool) -> None:
    import bench_stage2

    dev = device(dry_run)
    ns = stage2_args(dry_run, ["--real-size", "--batch", str(S2_BATCH), "--gen-batch", "16",
                               "--new-tokens", "20", "--steps", "3", "--warmup", "1",
                               "--gen-repeats", "2"],
                     ["--batch", "2", "--gen-batch", "2", "--new-tokens", "3", "--steps", "1",
                      "--warmup", "1", "--gen-repeats", "1"])

    def summarise(runs):
        out = {"batch": ns.batch, "gen_batch": ns.gen_batch, "new_tokens": ns.new_tokens,
               "real_size": ns.real_size, "device": dev,
               "precision": "fp16 frozen parts, fp16 autocast" if not dry_run else "fp32"}
        for impl, rs in runs.items():
            if rs:
                t, g = _median(rs, "train_times"), _median(rs, "gen_times_1")
                out[impl] = {"step_ms": round(t * 1e3, 2), "images_per_s": round(ns.batch / t, 2),
                             "train_peak_mb": round(max(r["train_peak_mb"] for r in rs), 1),
                             "gen_tokens_per_s": round(ns.gen_batch * ns.new_tokens / g, 2),
                             "gen_peak_mb": round(max(r["gen_peak_mb"] for r in rs), 1),
                             "rounds": len(rs)}
        if runs["ours"] and runs["lavis"]:
            o, r = out["ours"], out["lavis"]
            out["speedup_lavis_over_ours"] = _ratio(r["step_ms"], o["step_ms"])
            out["gen_speedup_ours_over_lavis"] = _ratio(o["gen_tokens_per_s"],
                                                        r["gen_tokens_per_s"])
        return out

    with tempfile.TemporaryDirectory() as tmp:
        with keep_cwd():
            bench_stage2.make_folders(ns, Path(tmp))  # OPT-2.7B shapes are made on the GPU
        ns.work_dir = tmp

        ns.beam_list = [1]  # greedy: LAVIS's beam search fails under transformers 4.46

        def run(impl):
            with keep_cwd(), building_on(dev):
                return _timed_and_memory(bench_stage2.run_impl, ns, impl,
                                         {"train_peak_mb": "train", "gen_peak_mb": "generate"})

        _alternate(rec, "stage2", _rounds(dry_run, "d"), run, summarise)


def write_clips(folder: Path, n: int, size: tuple, frames: int) -> List[str]:
    """``n`` clips of a square moving across a gradient, MPEG-4 Part 2 through OpenCV."""
    import cv2
    import numpy as np

    w, h = size
    paths = []
    for i in range(n):
        path = folder / f"clip{i}.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (w, h))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {path} with the mp4v codec")
        base = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None].repeat(h, 0).repeat(3, 2)
        for t in range(frames):
            frame = base.copy()
            x = (t * 7 + i * 40) % (w - 40)
            frame[h // 3:h // 3 + 40, x:x + 40] = (0, 0, 255)
            writer.write(frame)
        writer.release()
        paths.append(str(path))
    return paths


def check_e(rec, dry_run: bool) -> None:
    import torch

    import bench_stage2
    import bench_video_qa as vqa
    from lavis_plugins.processors.video_processors import VideoEvalConfig, VideoEvalProcessor

    dev = device(dry_run)
    cuda = dev.startswith("cuda")
    n = 2 if dry_run else 8
    ns = vqa.parse_args(["--device", dev, "--frames", str(n), *(
        ["--videos", "2", "--batch", "2", "--new-tokens", "2", "--opt-layers", "2",
         "--opt-hidden", "64"] if dry_run else
        ["--real-size", "--videos", "8", "--batch", "4", "--new-tokens", "5"])])
    out: Dict[str, Any] = {"frames": n, "videos": ns.videos, "batch": ns.batch,
                           "new_tokens": ns.new_tokens, "real_size": ns.real_size,
                           "decoder": "decord (both)", "clips": "OpenCV mp4v"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clips = write_clips(root, 2, (176, 144) if dry_run else (640, 360),
                            30 if dry_run else 150)
        paths = [clips[i % len(clips)] for i in range(ns.videos)]
        with keep_cwd():
            bench_stage2.make_folders(argparse.Namespace(**vars(ns)), root)
        torch.manual_seed(0)
        with keep_cwd(), building_on(dev):
            ours, _ = vqa.build_ours(ns, root, n)
            ref, ref_proc = vqa.build_reference(ns, root, ours, n)
        our_proc = VideoEvalProcessor(VideoEvalConfig(n_frms=n, image_size=224,
                                                      backend="decord"))
        runs = {"ours": (ours, our_proc), "LAVIS": (ref, ref_proc)}
        totals: Dict[str, List[float]] = {k: [] for k in runs}
        parts: Dict[str, List[Dict[str, float]]] = {k: [] for k in runs}
        for r in range(_rounds(dry_run, "e") + 1):  # round 0 is a one-batch warm-up
            for impl, (model, proc) in runs.items():
                clock = vqa.StageClock(cuda)
                if impl == "ours":
                    vqa.instrument_ours(model, clock)
                batch = paths[:ns.batch] if r == 0 else paths
                _, total = vqa.measure(impl, model, proc, batch, ns, clock)
                if r:
                    totals[impl].append(total)
                    parts[impl].append(vqa.stages(impl, clock.seconds))
            if r:
                for impl in runs:
                    t = statistics.median(totals[impl])
                    out[impl] = {"videos_per_s": round(ns.videos / t, 3),
                                 "ms_per_video": {s: round(1e3 * statistics.median(
                                     p[s] for p in parts[impl]) / ns.videos, 1)
                                     for s in ("decode", "encoder", "qformer", "llm")}}
                out["speedup_ours_over_lavis"] = _ratio(out["ours"]["videos_per_s"],
                                                        out["LAVIS"]["videos_per_s"])
                rec.put("video_qa", out)
        out["same_answers_same_frames"] = f"{vqa.same_answers(ours, ref, our_proc, paths, ns)}" \
                                          f"/{ns.videos}"
        rec.put("video_qa", out)
