"""Turn the GPU check's results.json into the markdown rows of docs/benchmarks.md.

    python benchmarks/gpu/summary.py /work/.device/.../results.json [--command "..."]

Prints a heading line (device, date, versions, the command) and one table: a row per
measurement, ours and LAVIS side by side with the ratio and the issue's goal where it has one.
Pure Python (json only), so it runs anywhere. A check that failed, timed out or was skipped gets
a row saying so, with its reason.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

# the speed goals: LAVIS's step time / ours
GOALS = {"stage1": 2.0, "stage2": 1.3}
HEADER = ["check", "measurement", "ours", "LAVIS", "ours vs LAVIS", "goal"]


def _fmt(x: Any, unit: str = "", digits: int = 1) -> str:
    if isinstance(x, (int, float)):
        return f"{x:.{digits}f}{unit}"
    return "-" if x is None else str(x)


def _goal(ratio: Optional[float], goal: float) -> str:
    if not isinstance(ratio, (int, float)):
        return f">= {goal:g}x"
    return f">= {goal:g}x: {'met' if ratio >= goal else 'missed'}"


def _get(d: Dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def rows_a(r: Dict[str, Any]) -> List[List[str]]:
    out = []
    p = r.get("parity_fp32")
    if p:
        if "collected" in p:
            text = f"{p['collected']} cases collected (dry run)"
        else:
            text = f"{p['passed']} passed, {p['failed']} failed" + (
                f": {', '.join(p['failed_tests'])}" if p.get("failed_tests") else "")
        out.append(["a", "parity fp32 vs LAVIS (pytest --device)", text, "", "", "all pass"])
    b = r.get("bf16_vs_fp32")
    if b:
        worst = max(b["relative_diff"][k] for k in b["checked"])
        out.append(["a", "bf16 autocast vs fp32 losses (ITC, ITG)",
                    f"max relative diff {worst:.2e} (ITM {b['relative_diff']['loss_itm']:.2e})",
                    "", "",
                    f"<= {b['tolerance']:g}: {'met' if worst <= b['tolerance'] else 'missed'}"])
    f = r.get("fp16_gradscaler")
    if f:
        fin = [{True: "all losses finite", False: "NaN/inf loss", None: "-"}[
            _get(f, k, "all_finite")] for k in ("ours", "lavis")]
        out.append(["a", f"fp16 + GradScaler, {f['steps']} steps ({f['precision']})", *fin,
                    "", "no NaN"])
    return out


def rows_b(r: Dict[str, Any]) -> List[List[str]]:
    out = []
    t = r.get("torchrun_1proc")
    if t:
        out.append(["b", "torchrun --nproc_per_node=1, CLI stage-1 run",
                    f"exit {t['exit_code']}, {t['steps_logged']} steps, {t['wall_s']:.0f} s",
                    "", "", "exit 0, finite losses"])
    c = r.get("collective")
    if c:
        out.append(["b", f"{c['backend']} all_reduce + all_gather, 1 rank",
                    "ok" if c["all_reduce_all_gather_ok"] else "wrong values", "", "", ""])
    return out


def rows_c(r: Dict[str, Any]) -> List[List[str]]:
    out = []
    s = r.get("stage1")
    if s:
        ratio = s.get("speedup_lavis_over_ours")
        label = f"stage-1 step, batch {s['batch']}, {s['precision']}" + (
            ", real size" if s.get("real_size") else ", tiny")
        out.append(["c", label + " (images/s)", _fmt(_get(s, "ours", "images_per_s")),
                    _fmt(_get(s, "lavis", "images_per_s")), _fmt(ratio, "x", 2),
                    _goal(ratio, GOALS["stage1"])])
        out.append(["c", "  peak memory (MB)", _fmt(_get(s, "ours", "peak_mb"), "", 0),
                    _fmt(_get(s, "lavis", "peak_mb"), "", 0), "", ""])
    fc = r.get("stage1_feature_cache")
    if fc:
        out.append(["c", f"ours, cached features vs inline encoder, batch {fc['batch']} "
                         "(images/s)", _fmt(_get(fc, "cached_features", "images_per_s")),
                    f"inline {_fmt(_get(fc, 'inline_encoder', 'images_per_s'))}",
                    _fmt(fc.get("speedup_cached_over_inline"), "x", 2), ""])
    return out


def rows_d(r: Dict[str, Any]) -> List[List[str]]:
    s = r.get("stage2")
    if not s:
        return []
    ratio = s.get("speedup_lavis_over_ours")
    size = "real size" if s.get("real_size") else "tiny"
    return [
        ["d", f"stage-2 step, batch {s['batch']}, {s['precision']}, {size} (images/s)",
         _fmt(_get(s, "ours", "images_per_s")), _fmt(_get(s, "lavis", "images_per_s")),
         _fmt(ratio, "x", 2), _goal(ratio, GOALS["stage2"])],
        ["d", "  peak memory, training (MB)", _fmt(_get(s, "ours", "train_peak_mb"), "", 0),
         _fmt(_get(s, "lavis", "train_peak_mb"), "", 0), "", ""],
        ["d", f"generation, batch {s['gen_batch']}, {s['new_tokens']} tokens, greedy (tokens/s)",
         _fmt(_get(s, "ours", "gen_tokens_per_s")), _fmt(_get(s, "lavis", "gen_tokens_per_s")),
         _fmt(s.get("gen_speedup_ours_over_lavis"), "x", 2), ""],
    ]


def rows_e(r: Dict[str, Any]) -> List[List[str]]:
    v = r.get("video_qa")
    if not v:
        return []
    return [["e", f"video QA, {v['frames']} frames, {v['videos']} videos, {v['decoder']} "
                  "(videos/s)", _fmt(_get(v, "ours", "videos_per_s"), "", 2),
             _fmt(_get(v, "LAVIS", "videos_per_s"), "", 2),
             _fmt(v.get("speedup_ours_over_lavis"), "x", 2),
             f"same answers {v.get('same_answers_same_frames', '-')}"]]


def rows_f(r: Dict[str, Any]) -> List[List[str]]:
    out = []
    for part in ("compile", "fsdp"):
        p = r.get(part)
        if p and p.get("status") == "skipped":
            out.append(["f", f"{part}: skipped", p["reason"][:120], "", "", ""])
        elif p:
            out.append(["f", f"{part}: CLI run", f"exit {p['exit_code']}, {p['steps_logged']} "
                        f"steps, {p['wall_s']:.0f} s", "", "", "exit 0, finite losses"])
    return out


ROWS = {"a": rows_a, "b": rows_b, "c": rows_c, "d": rows_d, "e": rows_e, "f": rows_f}


def summarise(results: Dict[str, Any], command: str = "") -> str:
    env = results.get("environment", {})
    v = env.get("versions", {})
    lines = [f"GPU check"
             f"{' (DRY RUN, CPU, tiny sizes: not figures)' if results.get('dry_run') else ''}: "
             f"{env.get('gpu') or 'no GPU'}, {env.get('date_utc', '?')}, Python "
             f"{env.get('python', '?')}, torch {v.get('torch')}, transformers "
             f"{v.get('transformers')}, LAVIS {v.get('salesforce-lavis')}"
             + (f"; command: `{command}`" if command else ""), "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for name, rec in results.get("checks", {}).items():
        rows = ROWS[name](rec) if name in ROWS else []
        status = rec.get("status", "?")
        if status != "ok":
            why = rec.get("error") or rec.get("reason") or ""
            rows.append([name, f"status: {status}", str(why)[:160].replace("|", "/"), "", "",
                         f"{rec.get('wall_s', '-')} s of {rec.get('budget_s', '-')} s"])
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="results.json written by gpu_check.py")
    p.add_argument("--command", default="", help="the device command, quoted in the heading")
    args = p.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
    except FileNotFoundError:
        print(f"summary: {args.results} does not exist; give the results.json that "
              "gpu_check.py wrote into its --out folder", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"summary: {args.results} is not JSON ({e}); was the run cut off before its "
              "first check finished?", file=sys.stderr)
        return 2
    if not isinstance(results, dict) or not isinstance(results.get("checks"), dict):
        print(f"summary: {args.results} has no \"checks\" object: not a gpu_check.py result",
              file=sys.stderr)
        return 2
    sys.stdout.write(summarise(results, args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
