"""``lp_shapes_text``: the shapes dataset's text alone, to pre-train the demo's language model.

The texts are the training captions (``build_info.caption_template``, default the bare caption;
the demo puts its captioning prompt in front, "a photo of {caption}", so the LM knows a caption
from a question by its first words) and the questions with their answers ("Question: {question}
Answer: {answer}", the prompt BLIP-2's OPT models answer in), so a text-only LM (``lp_text_lm``)
learns both kinds of text the frozen LLM will later be asked to produce. No image is read.

Item: ``{"text_input": str, "text_context": str}``; the context is another caption of the same
image (drawn per epoch; a caption's context is never itself unless its image has no other), which
``lp_text_lm`` turns into soft context vectors before the text (see its module docstring); it is
the bare caption, without ``caption_template``.
``build_info.context: false`` leaves the context out (plain text). A batch holds lists of B strings.

A single dataset of both kinds is needed because LAVIS's ``ConcatDataset`` keeps only the keys
that every sample of a batch shares, so mixing the caption and VQA datasets would drop the answers.
"""
from __future__ import annotations

import json
import random
from typing import Any, Dict, List, Sequence, Tuple

from lavis.common.registry import registry
from torch.utils.data import Dataset

from lavis_plugins.common.errors import UserError
from lavis_plugins.datasets.builders.shapes_builders import ShapesBuilderBase
from lavis_plugins.datasets.shapes_datasets import resolve_inside
from lavis_plugins.paths import config_path

DEFAULT_QA_TEMPLATE = "Question: {question} Answer: {answer}"
DEFAULT_CAPTION_TEMPLATE = "{caption}"


def texts_from_annotations(anns: Sequence[Dict[str, Any]], qa_template: str,
                           caption_template: str = DEFAULT_CAPTION_TEMPLATE
                           ) -> List[Tuple[str, str, str]]:
    """``(image, text, caption)`` for every text of a LAVIS caption or VQA annotation list: each
    caption (a string or a list of references) put into ``caption_template``, and each question
    with its first answer put into ``qa_template``; ``caption`` is the bare caption ("" for a
    question)."""
    texts: List[Tuple[str, str, str]] = []
    for i, ann in enumerate(anns):
        image = str(ann.get("image", ann.get("image_id", i)))
        if "question" in ann:
            answer = ann.get("answer")
            answer = answer[0] if isinstance(answer, list) and answer else answer
            if not isinstance(answer, str):
                raise UserError(f"VQA annotation {i} has no answer: {ann}")
            texts.append((image, qa_template.format(question=ann["question"], answer=answer),
                          ""))
        elif "caption" in ann:
            caps = ann["caption"]
            texts.extend((image, caption_template.format(caption=c), c)
                         for c in ([caps] if isinstance(caps, str) else caps))
        else:
            raise UserError(f"annotation {i} has neither 'caption' nor 'question': {ann}")
    return texts


class ShapesTextDataset(Dataset):
    """Text samples read from caption and VQA annotation files, each with the captions of its
    image that may serve as its context."""

    def __init__(self, ann_paths: Sequence[str], qa_template: str = DEFAULT_QA_TEMPLATE,
                 context: bool = True, caption_template: str = DEFAULT_CAPTION_TEMPLATE) -> None:
        triples: List[Tuple[str, str, str]] = []
        for path in ann_paths:
            try:
                with open(path) as fh:
                    anns = json.load(fh)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read annotation file {path}: {e}") from e
            if not isinstance(anns, list):
                raise UserError(f"annotation file {path} is not a JSON list of samples")
            triples.extend(texts_from_annotations(anns, qa_template, caption_template))
        captions: Dict[str, List[str]] = {}  # bare captions by image: the contexts
        for image, _, caption in triples:
            if caption:
                captions.setdefault(image, []).append(caption)
        if context and not captions:
            raise UserError(f"no caption among {list(ann_paths)} to serve as context; add a "
                            "caption file or set build_info.context: false")
        self.texts = [text for _, text, _ in triples]
        self.contexts: List[List[str]] = []  # per text: the captions it may get as context
        for image, _, caption in triples:
            others = [c for c in captions.get(image, []) if c != caption]
            self.contexts.append(others or captions.get(image, []))
        if context:
            missing = [t for t, c in zip(self.texts, self.contexts) if not c]
            if missing:
                raise UserError(f"{len(missing)} texts have no caption of their image to serve "
                                f"as context (e.g. {missing[0]!r}); every image needs a caption")
        self.context = context

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> Dict[str, str]:
        item = {"text_input": self.texts[index]}
        if self.context:
            # the runner seeds this per (seed, epoch, index): reproducible, new every epoch
            item["text_context"] = random.choice(self.contexts[index])
        return item

    def collater(self, samples: List[Dict[str, str]]) -> Dict[str, List[str]]:
        return {k: [s[k] for s in samples] for k in samples[0]}


@registry.register_builder("lp_shapes_text")
class ShapesTextBuilder(ShapesBuilderBase):
    """Captions and question-answer strings of the shapes dataset, for text-only LM training."""

    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_shapes/defaults_text.yaml")}

    def build(self) -> dict:
        root = self.dataset_root()
        build_info = self.config.build_info
        template = str(build_info.get("qa_template", DEFAULT_QA_TEMPLATE))
        cap_template = str(build_info.get("caption_template", DEFAULT_CAPTION_TEMPLATE))
        for key, value, fields in (("qa_template", template, dict(question="q", answer="a")),
                                   ("caption_template", cap_template, dict(caption="c"))):
            try:
                value.format(**fields)
            except (KeyError, IndexError) as e:
                raise UserError(f"datasets.lp_shapes_text.build_info.{key}={value!r} may only "
                                f"use {', '.join('{' + f + '}' for f in fields)}") from e
        datasets = {}
        for split, info in build_info.annotations.items():
            storage = info.storage
            storage = [storage] if isinstance(storage, str) else list(storage)
            paths = [str(resolve_inside(root, p, f"datasets.lp_shapes_text.build_info."
                                              f"annotations.{split}")) for p in storage]
            datasets[split] = ShapesTextDataset(paths, template,
                                                context=bool(build_info.get("context", True)),
                                                caption_template=cap_template)
        return datasets
