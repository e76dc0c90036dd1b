"""Fill ``.whl/`` (repo root, git-ignored) with exactly the wheels the GPU machine needs to run
benchmarks/gpu/run.sh, and print what a device call will carry (``make gpu-wheels``).

The GPU machine has Python 3.12, torch 2.11, transformers 5.x, no LAVIS and no network. LAVIS 1.0.2
imports only under transformers 4.x, so the carried set is: LAVIS itself, transformers 4.46 with
the tokenizers and huggingface-hub it accepts, and what ``import lavis`` / ``import
lavis_plugins`` load that the machine lacks (its package list: /work/.library/device/KINDS.md).
Versions are the ones pinned in env/requirements.lock. Everything else LAVIS's metadata asks
for is either on the machine already (torch, torchvision, numpy, OpenCV, pandas, scikit-image,
einops, sentencepiece, ...) or left out:

- spacy and its ~20 dependencies (~40 MB): blip2_t5 imports it at module level but uses it only
  for answer lemmatisation, which no check does; ``benchmarks/gpu/shims/spacy`` stands in for it
  (run.sh adds it only where spacy is missing), and calling it raises.
- pycocoevalcap's Java tools and METEOR data (100 of its 104 MB): LAVIS's captioning task imports
  the package, no check computes caption metrics; the wheel is repacked without them.
- PyAV (36 MB), our default video decoder: check e decodes with decord on both sides.
- never imported by ``import lavis``: contexttimer, ftfy, ipython, opendatasets, plotly,
  pre-commit, python-magic, streamlit, torchcodec.

iopath and fairscale publish source only: they are built into wheels here (pure Python).
Downloads are cached in ~/.cache/lavis_plugins/gpu_wheels.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "env" / "requirements.lock"
CACHE = Path.home() / ".cache" / "lavis_plugins" / "gpu_wheels"
BINARY = ["salesforce-lavis", "transformers", "tokenizers", "huggingface-hub", "timm",
          "omegaconf", "webdataset", "braceexpand", "decord", "pycocotools", "pycocoevalcap"]
SOURCE_ONLY = ["iopath", "fairscale"]
# pip matches manylinux tags exactly: the tags of the wheels above (README of the device tool)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
LIMIT_MB = 55.0  # carried wheels + the repository, under the device's 64 MiB per call


def _drop_pycocoevalcap(name: str) -> bool:
    return name.endswith(".jar") or "/meteor/data/" in name


REPACK: Dict[str, Callable[[str], bool]] = {"pycocoevalcap": _drop_pycocoevalcap}


def pinned(names: List[str]) -> Dict[str, str]:
    """name -> version from env/requirements.lock (one place for every version)."""
    text = LOCK.read_text()
    out = {}
    for name in names:
        m = re.search(rf"^{re.escape(name)}==(\S+)", text, re.M | re.I)
        if not m:
            sys.exit(f"{LOCK}: no pin for {name}; add it to env/requirements.in and `make lock`")
        out[name] = m.group(1)
    return out


def pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"pip {' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}")


def fetch(name: str, version: str) -> Path:
    """The wheel of ``name==version`` for CPython 3.12 on x86-64 Linux, from the cache or PyPI."""
    stem = name.replace("-", "_").lower()
    found = [p for p in CACHE.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    if name in SOURCE_ONLY:
        pip("wheel", "-q", "--no-deps", "-w", str(CACHE), f"{name}=={version}")
    else:
        plats = [x for p in PLATFORMS for x in ("--platform", p)]
        pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", *plats, "-d", str(CACHE), f"{name}=={version}")
    return fetch(name, version)


def repack(src: Path, dst: Path, drop: Callable[[str], bool]) -> None:
    """Copy the wheel ``src`` to ``dst`` without the files ``drop`` names, RECORD updated."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        for info in zin.infolist():
            if info.filename != record and not drop(info.filename):
                zout.writestr(info, zin.read(info.filename))
        lines = [x for x in zin.read(record).decode().splitlines()
                 if x and not drop(x.split(",")[0])]
        zout.writestr(record, "\n".join(lines) + "\n")


def repo_bytes() -> int:
    """Bytes of the files a device call sends: tracked plus untracked-not-ignored."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / n.decode()).stat().st_size for n in names
               if n and (REPO / n.decode()).is_file())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", type=Path, default=REPO / ".whl")
    args = p.parse_args(argv)
    args.dest.mkdir(exist_ok=True)
    wanted = []
    for name, version in pinned(BINARY + SOURCE_ONLY).items():
        src = fetch(name, version)
        dst = args.dest / src.name
        if name in REPACK:
            repack(src, dst, REPACK[name])
        elif not dst.exists():
            shutil.copy2(src, dst)
        wanted.append(dst.name)
    for stale in args.dest.glob("*.whl"):  # two versions of one package stop the install
        if stale.name not in wanted:
            stale.unlink()
            print(f"removed {stale.name} (not in the set)")
    wheels = sum((args.dest / w).stat().st_size for w in wanted)
    repo = repo_bytes()
    for w in sorted(wanted):
        print(f"{(args.dest / w).stat().st_size / 2**20:7.2f} MiB  {w}")
    total = (wheels + repo) / 2**20
    print(f"wheels {wheels / 2**20:.1f} MiB + repository {repo / 2**20:.1f} MiB = {total:.1f} MiB "
          f"carried (limit {LIMIT_MB:g} MiB here, 64 MiB per device call)")
    if total > LIMIT_MB:
        sys.exit(f"{total:.1f} MiB is over {LIMIT_MB:g} MiB: remove large untracked files from "
                 "the checkout or leave a wheel out")


if __name__ == "__main__":
    main()
