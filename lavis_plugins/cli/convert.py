"""``lavis-plugins convert --trust SRC DST``: rewrite a trusted pickled checkpoint so it loads
weights-only.

Every file this package reads is loaded weights-only (``lavis_plugins.common.safe_load``); a file
that pickles other objects is refused, because unpickling it could run any code. For a file the
user trusts (its source is known), this command loads it once with full unpickling and writes
its data (tensors, numbers, strings, containers; numpy arrays become tensors) to ``DST``: a torch
file, or a safetensors file when ``DST`` ends in ``.safetensors`` (its state dict only).
"""
from __future__ import annotations

import argparse

from lavis_plugins.common.errors import UserError


def _convert(args: argparse.Namespace) -> int:
    if not args.trust:
        raise UserError(f"convert loads {args.src} with full unpickling, which runs any code the "
                        "file holds; pass --trust only if you trust where it came from")
    from lavis_plugins.common.safe_load import convert_trusted

    dst, dropped = convert_trusted(args.src, args.dst)
    if dropped:
        print(f"lavis-plugins: dropped {len(dropped)} non-data object(s): "
              f"{', '.join(dropped[:8])}{' ...' if len(dropped) > 8 else ''}", flush=True)
    print(f"lavis-plugins: wrote {dst} (loads weights-only)", flush=True)
    return 0


def add_parsers(sub) -> None:
    """The ``convert`` sub-command."""
    p = sub.add_parser("convert", help="rewrite a trusted pickled checkpoint so it loads "
                                       "weights-only (runs the file's code once: --trust)")
    p.add_argument("src", help="the checkpoint to convert")
    p.add_argument("dst", help="output file (.pth, or .safetensors for a flat state dict)")
    p.add_argument("--trust", action="store_true",
                   help="confirm you trust SRC: loading it may run code stored in it")
    p.set_defaults(func=_convert)
