"""``lavis-plugins interpolate``: PAINT (Ilharco et al. 2022), weight interpolation between a
zero-shot and a fine-tuned checkpoint, to fine-tune without losing zero-shot skill.

    lavis-plugins interpolate --zero-shot stage1.pth --finetuned ft.pth \\
        --alpha 0.0,0.1,...,1.0 --out output/paint \\
        --eval-cfg projects/demo/zeroshot_cls_eval.yaml --eval-cfg ft_task_eval.yaml

For each alpha, theta = (1 - alpha) * theta_zero_shot + alpha * theta_finetuned over the
weights both checkpoints hold (what a run saves: the trained weights); weights equal in both
(frozen parts) are copied untouched, and alpha 0 and 1 are the inputs bit for bit. Checkpoints
whose keys, shapes or dtypes differ are refused. With ``--eval-cfg`` (a YAML evaluated by
``lavis-plugins evaluate``, repeatable), each interpolated checkpoint is loaded as the model's
``finetuned`` weights and evaluated; ``interpolation.md``/``.json`` hold the table and
``interpolation.png`` plots each metric against alpha (and, for two evaluations, one against the
other: PAINT's trade-off curve).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from lavis_plugins.common.errors import UserError

ALPHA_HELP = ("comma-separated alphas in [0, 1]; 'a,b,...,c' steps by b-a from a to c, "
              "'start:stop:step' likewise (PAINT sweeps 0.0,0.1,...,1.0)")


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--alpha: {text!r} is not a number ({ALPHA_HELP})") from None
    if not math.isfinite(value):
        raise UserError(f"--alpha: {text!r} is not a finite number")
    return value


def _progression(start: float, step: float, stop: float) -> List[float]:
    if step <= 0 or stop < start:
        raise UserError(f"--alpha: a progression from {start} to {stop} needs a positive step, "
                        f"got {step}")
    n = (stop - start) / step
    if abs(n - round(n)) > 1e-6:
        raise UserError(f"--alpha: the step {step} does not reach {stop} from {start} evenly")
    return [round(start + i * step, 10) for i in range(int(round(n)) + 1)]


def parse_alphas(text: str) -> List[float]:
    """``"0,0.5,1"``, ``"0.0,0.1,...,1.0"`` or ``"0:1:0.1"`` -> the alphas, each in [0, 1],
    without repeats; anything else is a ``UserError``."""
    text = text.strip()
    if not text:
        raise UserError(f"--alpha is empty ({ALPHA_HELP})")
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise UserError(f"--alpha {text!r}: write start:stop:step, e.g. 0:1:0.1")
        start, stop, step = (_float(p) for p in parts)
        alphas = _progression(start, step, stop)
    else:
        items = [p.strip() for p in text.split(",")]
        if "..." in items:
            if len(items) != 4 or items[2] != "...":
                raise UserError(f"--alpha {text!r}: write the progression as a,b,...,c "
                                "(e.g. 0.0,0.1,...,1.0)")
            a, b, c = _float(items[0]), _float(items[1]), _float(items[3])
            alphas = _progression(a, b - a, c)
        else:
            alphas = [_float(p) for p in items]
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise UserError(f"--alpha: {bad} outside [0, 1] (0 = the zero-shot weights, 1 = the "
                        "fine-tuned ones)")
    if len(set(alphas)) != len(alphas):
        raise UserError(f"--alpha {text!r} repeats a value")
    return alphas


def read_weights(path: str | Path, what: str):
    """The state dict of a checkpoint (``{"model": state}`` or a state dict), read weights-only
    (:func:`lavis_plugins.common.safe_load.load_weights`): a file that would run code is refused."""
    from lavis_plugins.common.safe_load import load_weights, state_dict_of

    return state_dict_of(load_weights(path, what), str(path), what)


def check_matching(zero: Dict, fine: Dict, zero_path: str, fine_path: str) -> None:
    """Same keys, shapes and dtypes in both, else a ``UserError`` naming the first differences."""
    only_zero, only_fine = sorted(set(zero) - set(fine)), sorted(set(fine) - set(zero))
    if only_zero or only_fine:
        raise UserError(
            f"the checkpoints hold different weights: {len(only_zero)} only in {zero_path} "
            f"(e.g. {only_zero[:3]}), {len(only_fine)} only in {fine_path} (e.g. "
            f"{only_fine[:3]}); interpolate checkpoints of the same model and config")
    differ = [f"{k} {tuple(zero[k].shape)}/{zero[k].dtype} vs {tuple(fine[k].shape)}/"
              f"{fine[k].dtype}" for k in sorted(zero)
              if zero[k].shape != fine[k].shape or zero[k].dtype != fine[k].dtype]
    if differ:
        raise UserError(f"the checkpoints' weights differ in shape or dtype: {differ[:3]} "
                        f"({len(differ)} in all); interpolate checkpoints of the same model")


def interpolate_weights(zero: Dict, fine: Dict, alpha: float) -> Dict:
    """(1 - alpha) * zero + alpha * fine for floating-point weights that differ (computed in
    fp32, stored in their dtype); equal weights and alpha 0 / 1 give the inputs' tensors."""
    import torch

    if alpha == 0.0:
        return {k: v.clone() for k, v in zero.items()}
    if alpha == 1.0:
        return {k: v.clone() for k, v in fine.items()}
    out = {}
    for k, z in zero.items():
        f = fine[k]
        if torch.equal(z, f):  # frozen or untouched by fine-tuning: bit for bit
            out[k] = z.clone()
        elif not z.is_floating_point():
            raise UserError(f"weight {k!r} is a {z.dtype} tensor that differs between the "
                            "checkpoints; only floating-point weights can be interpolated")
        else:
            out[k] = torch.lerp(z.float(), f.float(), alpha).to(z.dtype)
    return out


def alpha_name(alpha: float) -> str:
    return f"alpha_{alpha:.2f}" if round(alpha, 2) == alpha else f"alpha_{alpha:g}"


def write_interpolations(zero_path: str, fine_path: str, alphas: Sequence[float],
                         out: Path) -> Dict[float, Path]:
    """Write ``out/alpha_<a>.pth`` ({"model": weights, "interpolation": provenance}) per alpha."""
    import torch

    zero = read_weights(zero_path, "--zero-shot")
    fine = read_weights(fine_path, "--finetuned")
    check_matching(zero, fine, zero_path, fine_path)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for a in alphas:
        path = out / f"{alpha_name(a)}.pth"
        torch.save({"model": interpolate_weights(zero, fine, a),
                    "interpolation": {"alpha": a, "zero_shot": str(zero_path),
                                      "finetuned": str(fine_path)}}, path)
        paths[a] = path
        print(f"lavis-plugins: wrote {path}", flush=True)
    return paths


def evaluate_checkpoints(paths: Dict[float, Path], eval_cfgs: Sequence[str],
                         options: Sequence[str], out: Path, metric: str,
                         labels: Sequence[str]) -> List[Dict]:
    """Evaluate every checkpoint with every YAML; rows ``{"alpha", label: metric, ...}``."""
    from lavis_plugins.cli.experiment import run

    rows = []
    for a, path in paths.items():
        row: Dict = {"alpha": a}
        for cfg, label in zip(eval_cfgs, labels):
            opts = list(options) + [f"model.finetuned={path}", "model.load_finetuned=True",
                                    f"run.output_dir={out / 'eval'}"]
            _, result = run(cfg, opts, evaluate_only=True, job_id=f"{alpha_name(a)}_{label}")
            splits = [v for v in (result or {}).values() if isinstance(v, dict)]
            if not splits or metric not in splits[0]:
                raise UserError(f"{cfg} reported no {metric!r} (it gave "
                                f"{sorted(splits[0]) if splits else 'no metrics'}); choose one "
                                "with --metric")
            row[label] = float(splits[0][metric])
        rows.append(row)
        print(f"lavis-plugins: alpha {a:g}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in row.items() if k != "alpha"), flush=True)
    return rows


def write_table(rows: Sequence[Dict], labels: Sequence[str], metric: str, out: Path) -> Path:
    """``interpolation.json`` and ``interpolation.md`` (one row per alpha)."""
    (out / "interpolation.json").write_text(json.dumps(
        {"metric": metric, "rows": list(rows)}, indent=1) + "\n")
    lines = [f"| alpha | {' | '.join(f'{lab} ({metric})' for lab in labels)} |",
             "|---:|" + "---:|" * len(labels)]
    lines += [f"| {r['alpha']:g} | " + " | ".join(f"{r[lab]:.2f}" for lab in labels) + " |"
              for r in rows]
    path = out / "interpolation.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_interpolation(rows: Sequence[Dict], labels: Sequence[str], metric: str,
                       path: Path) -> Path:
    """Each evaluation's metric against alpha; with two evaluations also the second against the
    first, each point marked with its alpha (PAINT's figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    two = len(labels) == 2
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(9.5 if two else 5, 3.8),
                             squeeze=False)
    alphas = [r["alpha"] for r in rows]
    ax = axes[0][0]
    for lab in labels:
        ax.plot(alphas, [r[lab] for r in rows], marker="o", label=lab)
    ax.set_xlabel("alpha (0: zero-shot weights, 1: fine-tuned)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if two:
        ax = axes[0][1]
        xs, ys = [r[labels[0]] for r in rows], [r[labels[1]] for r in rows]
        ax.plot(xs, ys, marker="o", color="tab:purple")
        for a, x, y in zip(alphas, xs, ys):
            ax.annotate(f"{a:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(f"{labels[0]} ({metric})")
        ax.set_ylabel(f"{labels[1]} ({metric})")
        ax.grid(alpha=0.3)
        ax.set_title("interpolation path (labels: alpha)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def interpolate(zero_shot: str, finetuned: str, alphas: Sequence[float], out: Path,
                eval_cfgs: Sequence[str] = (), options: Sequence[str] = (),
                metric: str = "agg_metrics", labels: Optional[Sequence[str]] = None) -> Dict:
    """Write the interpolated checkpoints and, with ``eval_cfgs``, evaluate and plot them."""
    labels = list(labels) if labels else [Path(c).stem for c in eval_cfgs]
    if len(labels) != len(eval_cfgs):
        raise UserError(f"--label given {len(labels)} times for {len(eval_cfgs)} --eval-cfg")
    if len(set(labels)) != len(labels):
        raise UserError(f"evaluation labels repeat ({labels}); name them with --label")
    if eval_cfgs:  # fail on a bad YAML or option before writing anything
        from lavis_plugins.cli.experiment import load_config

        for cfg in eval_cfgs:
            load_config(cfg, list(options))
    out = Path(out)
    paths = write_interpolations(zero_shot, finetuned, alphas, out)
    result: Dict = {"checkpoints": paths}
    if eval_cfgs:
        rows = evaluate_checkpoints(paths, eval_cfgs, options, out, metric, labels)
        result.update(rows=rows, table=write_table(rows, labels, metric, out),
                      plot=plot_interpolation(rows, labels, metric, out / "interpolation.png"))
        print(Path(result["table"]).read_text(), flush=True)
    return result


def _command(args) -> int:
    interpolate(args.zero_shot, args.finetuned, parse_alphas(args.alpha), Path(args.out),
                args.eval_cfg, args.options, args.metric, args.label)
    return 0


def add_parsers(sub) -> None:
    """The ``interpolate`` sub-command."""
    p = sub.add_parser("interpolate", help="PAINT: interpolate zero-shot and fine-tuned weights, "
                                           "optionally evaluating each alpha")
    p.add_argument("--zero-shot", required=True, help="checkpoint before fine-tuning (.pth)")
    p.add_argument("--finetuned", required=True, help="checkpoint after fine-tuning (.pth)")
    p.add_argument("--alpha", default="0.0,0.1,...,1.0", help=ALPHA_HELP)
    p.add_argument("--out", required=True, help="folder for the checkpoints, table and plot")
    p.add_argument("--eval-cfg", action="append", default=[],
                   help="evaluation YAML run on every alpha (repeatable)")
    p.add_argument("--label", action="append", default=None,
                   help="name of each --eval-cfg in the table and plot (default: YAML name)")
    p.add_argument("--metric", default="agg_metrics",
                   help="the metric read from each evaluation's test split")
    p.add_argument("--options", nargs="+", default=[],
                   help="overrides for every evaluation, e.g. model.bert_path=...")
    p.set_defaults(func=_command)
