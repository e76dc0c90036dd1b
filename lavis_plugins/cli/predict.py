"""``lavis-plugins predict``: caption, answer a question about, or match texts to one image or
video, or every one in a folder, with a registered model; one JSON line per file.

    lavis-plugins predict --model lp_blip2_opt --model-type pretrain_opt2.7b \\
        --checkpoint /weights/blip2_pretrained_opt2.7b.pth --image dog.jpg \\
        --options vit_path=/weights/eva_vit_g.pth bert_path=/weights/bert-base-uncased \\
                  opt_model=/weights/opt-2.7b
    lavis-plugins predict --model lp_blip2_video_opt --model-type X --video clip.mp4 \\
        --question "what is the man doing?"
    lavis-plugins predict --model lp_blip2_qformer --model-type coco --folder photos/ \\
        --task retrieve --texts "a dog" "a cat" --output matches.jsonl

Inputs go through the model's own ``eval`` processors (its default YAML's ``preprocess:``, as in
evaluation: ``blip_image_eval``, or ``lp_video_eval`` for the video models); questions through
LAVIS's ``blip_question``. Model config keys are set with ``--options key=value``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

from lavis_plugins.cli.experiment import model_options
from lavis_plugins.common.errors import UserError

TASKS = ("caption", "vqa", "retrieve")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")


def add_parsers(sub) -> None:
    p = sub.add_parser("predict", help="caption / answer / match one image, video or folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model, e.g. lp_blip2_opt")
    p.add_argument("--model-type", required=True, help="its model type (`lavis-plugins zoo`)")
    p.add_argument("--checkpoint", default=None,
                   help="local .pth (LAVIS format) or transformers BLIP-2 folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", help="image file(s)")
    src.add_argument("--video", nargs="+", help="video file(s) (video models)")
    src.add_argument("--folder", help="every image (or, for video models, video) in this folder")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="caption (default), vqa (default with --question), retrieve (--texts)")
    p.add_argument("--question", default=None, help="the question for --task vqa")
    p.add_argument("--texts", nargs="+", default=None, help="candidate captions for retrieve")
    p.add_argument("--top-k", type=int, default=5, help="retrieve: captions kept per input (5)")
    p.add_argument("--num-beams", type=int, default=5, help="beam width (5)")
    p.add_argument("--max-len", type=int, default=30, help="most new tokens (30)")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass (8)")
    p.add_argument("--device", default="auto", help="auto (cuda when visible), cuda or cpu")
    p.add_argument("--options", nargs="+", default=[],
                   help="model config overrides key=value, e.g. vit_path=/w/eva_vit_g.pth")
    p.add_argument("--output", default=None, help="JSONL file (default: standard output)")
    p.set_defaults(func=_predict_command)


def _task(args) -> str:
    task = args.task or ("vqa" if args.question is not None else
                         "retrieve" if args.texts else "caption")
    if task == "vqa" and not (args.question or "").strip():
        raise UserError("--task vqa needs --question \"...\"")
    if task != "vqa" and args.question is not None:
        raise UserError(f"--question is for --task vqa, not {task}")
    if task == "retrieve" and not args.texts:
        raise UserError("--task retrieve needs --texts \"caption 1\" \"caption 2\" ...")
    if task != "retrieve" and args.texts:
        raise UserError(f"--texts is for --task retrieve, not {task}")
    for name in ("top_k", "num_beams", "max_len", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    return task


def _check_paths(args) -> None:
    missing = [f for f in (args.image or args.video or []) if not Path(f).is_file()]
    if missing:
        raise UserError(f"not a file: {', '.join(missing)}")
    if args.folder is not None and not Path(args.folder).is_dir():
        raise UserError(f"--folder {args.folder!r} is not a folder")


def _files(args, wants_video: bool) -> List[Path]:
    given = args.image or args.video
    if given:
        if args.video and not wants_video:
            raise UserError(f"{args.model} takes images; for videos use a video model "
                            "(lp_blip2_video_opt, lp_blip2_video_t5)")
        if args.image and wants_video:
            raise UserError(f"{args.model} takes videos (--video); a one-frame video of an image "
                            "gives the image model's answer: use lp_blip2_opt / lp_blip2_t5")
        return [Path(f) for f in given]
    folder = Path(args.folder)
    exts = VIDEO_EXTS if wants_video else IMAGE_EXTS
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise UserError(f"--folder {folder} holds no {'video' if wants_video else 'image'} files "
                        f"({', '.join(exts)})")
    return files


def predict(args) -> Iterator[Dict[str, Any]]:
    """One result record per input file (see the module docstring)."""
    import torch
    from PIL import Image

    import lavis_plugins
    from lavis_plugins.common.dist import choose_device
    from lavis_plugins.common.progress import progress

    task = _task(args)
    _check_paths(args)  # before the model is loaded: a typo costs no load
    device = choose_device(args.device)
    model, vis, _ = lavis_plugins.load_model_and_preprocess(
        args.model, args.model_type, is_eval=True, device=device, checkpoint=args.checkpoint,
        **model_options(args.options))
    vis_eval = vis.get("eval")
    if vis_eval is None:
        raise UserError(f"{args.model}/{args.model_type} names no eval image processor in its "
                        "default YAML (preprocess.vis_processor.eval)")
    wants_video = type(vis_eval).__name__.lower().startswith("video") or \
        "video" in getattr(vis_eval, "registry_name", "")
    needed = {"caption": "generate", "vqa": "predict_answers", "retrieve": "extract_features"}
    if not hasattr(model, needed[task]) or (task == "retrieve" and not hasattr(model, "itm_head")):
        raise UserError(f"{args.model} cannot --task {task} (it has no {needed[task]}); captions "
                        "and answers come from lp_blip2_opt / lp_blip2_t5 (and their video "
                        "models), retrieval from lp_blip2_qformer")
    files = _files(args, wants_video)
    question = None
    if task == "vqa":
        from lavis.processors.blip_processors import BlipQuestionProcessor

        question = BlipQuestionProcessor()(args.question)
    key = "video" if wants_video else "image"

    def load(path: Path):
        try:
            return vis_eval(str(path)) if wants_video else vis_eval(Image.open(path).convert("RGB"))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL and decoders raise many types
            raise UserError(f"cannot read {path}: {e}") from e

    bar = progress(len(files), f"predict {task}", unit="file") if len(files) > 1 else None
    for start in range(0, len(files), args.batch_size):
        batch_files = files[start:start + args.batch_size]
        batch = torch.stack([load(p) for p in batch_files]).to(device)
        with torch.no_grad():
            if task == "caption":
                outs = model.generate({key: batch}, num_beams=args.num_beams,
                                      max_length=args.max_len)
                records = [{"caption": c} for c in outs]
            elif task == "vqa":
                outs = model.predict_answers({key: batch, "text_input": [question] * len(batch)},
                                             num_beams=args.num_beams, max_len=args.max_len)
                records = [{"question": args.question, "answer": a} for a in outs]
            else:
                records = [_retrieve(model, batch[i:i + 1], args.texts, args.top_k)
                           for i in range(len(batch))]
        for path, rec in zip(batch_files, records):
            yield {"file": str(path), "task": task, **rec}
        if bar is not None:
            bar.update(len(batch_files))
    if bar is not None:
        bar.close()


def _retrieve(model, image, texts: List[str], k: int) -> Dict[str, Any]:
    """The ``k`` captions that best match one image: ITM probability of a match (ranked by it)
    and the ITC cosine similarity."""
    import torch

    from lavis_plugins.models.blip2_lavis_compat import match_pairs

    samples = {"image": image, "text_input": list(texts)}
    itm = torch.softmax(match_pairs(model, samples, "itm").float(), dim=1)[:, 1]
    itc = match_pairs(model, samples, "itc")[:, 0].float()
    order = itm.argsort(descending=True)[:k].tolist()
    return {"matches": [{"text": texts[i], "itm": round(float(itm[i]), 6),
                         "itc": round(float(itc[i]), 6)} for i in order]}


def _predict_command(args) -> int:
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for rec in predict(args):
            out.write(json.dumps(rec) + "\n")
            out.flush()
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"lavis-plugins: predictions in {args.output}", file=sys.stderr)
    return 0
