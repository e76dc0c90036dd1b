"""Count the caption-length histogram of a caption annotation file, for ``--captions coco``.

    .venv/bin/python benchmarks/caption_lengths.py coco_karpathy_train.json \
        > benchmarks/caption_lengths_coco.json

Reads LAVIS's caption format (a JSON list of records with ``caption``: a string or a list of
strings) or COCO's (``{"annotations": [{"caption": ...}]}``) and prints the weight per 1000
captions of each length in words (whitespace-separated), in the file format the benchmarks read.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys


def lengths(records) -> collections.Counter:
    counts = collections.Counter()
    for rec in records:
        caps = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
        counts.update(len(c.split()) for c in caps)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("annotations")
    args = p.parse_args()
    try:
        data = json.load(open(args.annotations))
        records = data["annotations"] if isinstance(data, dict) else data
        counts = lengths(records)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        sys.exit(f"{args.annotations}: not a caption annotation file ({type(e).__name__}: {e})")
    total = sum(counts.values())
    per_mille = {str(n): max(round(1000 * c / total), 1) for n, c in sorted(counts.items())}
    json.dump({"what": "caption length in words -> weight per 1000 captions",
               "source": f"counted from {args.annotations} ({total} captions)",
               "per_mille": per_mille}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
