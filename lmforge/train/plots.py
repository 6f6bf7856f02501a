"""Training curves from metrics.jsonl: train loss, learning rate and every eval metric against the step.

Drawn with matplotlib's Agg canvas directly (no pyplot), so a training run never changes the backend of
the program that hosts it, and written atomically so a viewer never sees a half-written PNG.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from lmforge.io import atomic_write

EVAL_PREFIX = "eval_"


def eval_key(name: str) -> str:
    """The metrics.jsonl key of an eval metric: "f1" -> "eval_f1", and "eval_loss" stays "eval_loss".

    Older runs may hold "eval_eval_loss" for the tasks' validation loss."""
    return name if name.startswith(EVAL_PREFIX) else EVAL_PREFIX + name


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a torn last line (crash mid-write) is skipped."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def plot_metrics(records: list[dict[str, Any]] | Path, out_png: Path,
                 title: str | None = None) -> Path | None:
    """Write a PNG of the curves in `records` (or a metrics.jsonl path); None when nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(records, list):
        records = read_metrics(Path(records))
    eval_keys = sorted({k for r in records for k in r if k.startswith(EVAL_PREFIX)
                        and isinstance(r[k], (int, float)) and not isinstance(r[k], bool)})
    loss = _series(records, "loss")
    lr = _series(records, "lr")
    other_eval = [k for k in eval_keys if k != EVAL_PREFIX + "loss"]
    panels: list[tuple[str, list[tuple[str, tuple[list[float], list[float]]]]]] = []
    loss_lines = [("train loss", loss)]
    if EVAL_PREFIX + "loss" in eval_keys:
        loss_lines.append(("eval loss", _series(records, EVAL_PREFIX + "loss")))
    if any(s[0] for _, s in loss_lines):
        panels.append(("loss", loss_lines))
    for k in other_eval:
        panels.append((k[len(EVAL_PREFIX):], [(k, _series(records, k))]))
    if lr[0]:
        panels.append(("learning rate", [("lr", lr)]))
    if not panels:
        return None

    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, lines) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for label, (xs, ys) in lines:
            few = len(xs) <= 30
            ax.plot(xs, ys, marker="o" if few else None, markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if title:
        fig.suptitle(title, y=1 - 0.08 / (3.2 * nrows), va="top")
    # fixed margins: tight_layout would draw the figure twice, and this runs inside the training loop
    height = 3.2 * nrows  # inches; margins below are in inches too
    top = 1 - (0.65 if title else 0.35) / height
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.5 / height, top=top, wspace=0.3, hspace=0.45)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_png, buf.getvalue())
    return out_png
