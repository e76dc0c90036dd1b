"""Prompt templates for zero-shot classification (CLIP's prompt ensembling).

A class's classifier weight is the average of the normalised text features of every template
filled with its name (Radford et al. 2021, section 3.1.4). ``run.templates`` in a YAML is one of
the names below or a list of strings, each holding exactly one ``{}`` for the class name.
"""
from __future__ import annotations

import difflib
from typing import Any, List, Sequence

from lavis_plugins.common.errors import UserError

# the 80 templates CLIP used for ImageNet (its "Prompt_Engineering_for_ImageNet" notebook)
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "the plushie {}.", "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.",
    "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)
# the 7 of them CLIP's notebook found to do as well as all 80 on ImageNet (faster to encode)
SHORT_TEMPLATES = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)

TEMPLATE_SETS = {
    "imagenet80": IMAGENET_TEMPLATES,
    "short": SHORT_TEMPLATES,
    "photo": ("a photo of a {}.",),  # CLIP's single default prompt
    "name": ("{}",),  # the bare class name
}


def resolve_templates(value: Any, key: str = "run.templates") -> List[str]:
    """A template-set name or a list of templates -> the list of templates.

    Each template must hold exactly one ``{}``; anything else is a ``UserError`` naming ``key``.
    """
    if isinstance(value, str):
        if value not in TEMPLATE_SETS:
            close = difflib.get_close_matches(value, TEMPLATE_SETS, n=1)
            raise UserError(f"{key}: unknown template set {value!r}."
                            + (f" Did you mean {close[0]}?" if close else "")
                            + f" Template sets: {', '.join(TEMPLATE_SETS)}; or give a list of "
                              "templates, each with one {} for the class name")
        return list(TEMPLATE_SETS[value])
    if not isinstance(value, Sequence) or not value:
        raise UserError(f"{key} must be a template-set name ({', '.join(TEMPLATE_SETS)}) or a "
                        f"non-empty list of templates with one {{}} each; got {value!r}")
    out = []
    for t in value:
        if not isinstance(t, str) or t.count("{}") != 1 or t.replace("{}", "").count("{") \
                or t.replace("{}", "").count("}"):
            raise UserError(f"{key}: template {t!r} must be a string with exactly one {{}} (where "
                            "the class name goes) and no other braces, e.g. 'a photo of a {}.'")
        out.append(t)
    return out
