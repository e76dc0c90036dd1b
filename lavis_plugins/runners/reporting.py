"""What a run shows: the metrics table, result-file names, loss/metric curves and TensorBoard.

Kept out of the runner so that it stays about training: the runner calls
:func:`plot_run_curves` at the end of each epoch and :class:`TensorboardLogger` where it logs;
the CLI prints :func:`format_metrics_table` when a run ends; tasks name their result files with
:func:`result_file_name`.
"""
from __future__ import annotations

import json
import logging
import numbers
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from lavis_plugins.common.errors import UserError

logger = logging.getLogger(__name__)

LOSS_PNG = "loss_curves.png"
TENSORBOARD_DIR = "tensorboard"


def result_file_name(split: str, epoch: Union[int, str, None], what: str) -> str:
    """``<split>_<what>`` for an evaluation-only run (``epoch`` None), else
    ``<split>_epoch<epoch>_<what>`` (epoch ``best``: the best checkpoint's test evaluation), so
    a training run keeps every epoch's results."""
    return f"{split}_{what}" if epoch is None else f"{split}_epoch{epoch}_{what}"


# ----------------------------------------------------------------------------- metrics table
def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> List[Tuple[str, Any]]:
    rows = []
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            rows += _flatten(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def format_metrics_table(results: Optional[Mapping[str, Any]]) -> str:
    """``{split: {metric: value (or nested dict)}}`` as an aligned text table (nested metrics as
    dotted names, e.g. ``generate.accuracy``); "" when there is nothing to show."""
    rows = []
    for split, metrics in (results or {}).items():
        if isinstance(metrics, Mapping):
            for name, value in _flatten(metrics):
                if isinstance(value, bool) or not isinstance(value, (numbers.Number, str)):
                    value = json.dumps(value) if value is not None else "-"
                elif isinstance(value, float):
                    value = f"{value:.4f}"
                rows.append((split, name, str(value)))
    if not rows:
        return ""
    w1 = max(len("split"), *(len(r[0]) for r in rows))
    w2 = max(len("metric"), *(len(r[1]) for r in rows))
    lines = [f"{'split':<{w1}}  {'metric':<{w2}}  value", f"{'-' * w1}  {'-' * w2}  -----"]
    lines += [f"{s:<{w1}}  {m:<{w2}}  {v}" for s, m, v in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- curves
def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """The JSON objects of ``path``, one per line; lines that are not one (LAVIS's log.txt holds
    the indented run config too) are skipped."""
    out = []
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def eval_history(log_txt: Path) -> Dict[str, List[float]]:
    """``{"<split>_agg_metrics": [value per evaluation, in order]}`` from a run's log.txt."""
    series: Dict[str, List[float]] = {}
    for rec in read_jsonl(log_txt):
        for k, v in rec.items():
            if k.endswith("_agg_metrics") and isinstance(v, numbers.Number):
                series.setdefault(k, []).append(float(v))
    return series


def plot_loss_panel(ax, recs: List[Dict[str, Any]], title: str) -> None:
    """``loss`` and every ``loss_*`` of train_log.jsonl records against the optimizer step."""
    steps = [r["step"] for r in recs]
    names = ["loss"] + sorted({k for r in recs for k in r if k.startswith("loss_")})
    for name in names:
        ys = [r.get(name) for r in recs]
        if name != "loss" and ys == [r.get("loss") for r in recs]:
            continue  # a single-component loss: the same curve twice
        ax.plot(steps, ys, label=name, linewidth=1.6 if name == "loss" else 1.0)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_run_curves(output_dir: Path) -> Optional[Path]:
    """``loss_curves.png`` in ``output_dir``: the training losses (train_log.jsonl) and, when the
    run validates, each split's ``agg_metrics`` per evaluation (log.txt). None without a log."""
    output_dir = Path(output_dir)
    recs = read_jsonl(output_dir / "train_log.jsonl")
    evals = eval_history(output_dir / "log.txt")
    if not recs and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = int(bool(recs)) + int(bool(evals))
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.4), squeeze=False)
    i = 0
    if recs:
        plot_loss_panel(axes[0][0], recs, "training loss")
        i = 1
    if evals:
        ax = axes[0][i]
        for name, ys in sorted(evals.items()):
            ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name)
        ax.set_title("evaluation (agg_metrics)")
        ax.set_xlabel("evaluation (epoch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = output_dir / LOSS_PNG
    tmp = path.with_name(".tmp_" + LOSS_PNG)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # a viewer never sees a half-written image
    return path


# ----------------------------------------------------------------------------- tensorboard
class TensorboardLogger:
    """``run.tensorboard: true``: scalars to ``<output_dir>/tensorboard`` with torch's
    ``SummaryWriter`` (needs the ``tensorboard`` package; the lock installs it)."""

    def __init__(self, output_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError("run.tensorboard is true but the tensorboard package is not "
                            "installed: `pip install tensorboard` (or `uv pip install "
                            "tensorboard`), or set run.tensorboard: false") from e
        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / TENSORBOARD_DIR))

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """Every number of ``values`` (nested dicts flattened) as ``<prefix>/<name>``."""
        for name, v in _flatten(values):
            if isinstance(v, numbers.Number) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{name}", float(v), step)
            elif isinstance(v, str):
                try:
                    self.writer.add_scalar(f"{prefix}/{name}", float(v), step)
                except ValueError:
                    continue
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def topk_rows(scores, k: int, labels: Iterable[str], correct: Mapping[int, Iterable[int]],
              query_key: str, target_key: str, target_text=None) -> List[Dict[str, Any]]:
    """Per query (row of ``scores`` (Nq, Nt)), its ``k`` best targets with their scores and
    whether each is a ground-truth match (``correct[query]``)."""
    import numpy as np

    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1)[:, :k]
    rows = []
    for q, label in zip(range(scores.shape[0]), labels):
        gt = correct[q]
        gt = {int(gt)} if isinstance(gt, numbers.Number) else {int(g) for g in gt}
        rows.append({query_key: q, "query": label, "ground_truth": sorted(gt), "top_k": [
            {target_key: int(t), **({"text": target_text[t]} if target_text is not None else {}),
             "score": float(scores[q, t]), "correct": int(t) in gt} for t in top[q]]})
    return rows
