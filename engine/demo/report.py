"""The demo's report: a printed table, a JSON file, and a PNG of sample grids and loss curves.

    format_table(rows) -> str                     one line per evaluated sample set
    write_json(path, rows, **extra) -> Path        {"results": rows, **extra}, indented, NaN-free
    save_figure(path, grids, curves=None, *, title=None, nrow=10) -> Path
    image_grid(x, nrow=10) -> numpy [H, W] in [0, 1]

``rows`` are ``Evaluator.evaluate_samples`` dicts (name, n, fd, coverage, entropy, accuracy,
samples_per_s). ``grids`` maps a row label ("real", "teacher@8", "student") to images [N, 1, 8, 8] in
[-1, 1], drawn side by side in the given order; ``curves`` maps a name to a list of floats (or to a
dict of named lists, drawn on one axis), one axis each, under the grids. matplotlib is used with its Agg
backend (no display needed) and imported only when a figure is drawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from flashdistill.engine.demo import data as D

__all__ = ["format_table", "write_json", "save_figure", "image_grid", "COLUMNS"]

# (key, header, format)
COLUMNS = (
    ("name", "samples", "{}"),
    ("n", "n", "{:d}"),
    ("fd", "FD (lower is better)", "{:.2f}"),
    ("coverage", "class coverage", "{:.2f}"),
    ("entropy", "class entropy", "{:.3f}"),
    ("accuracy", "label accuracy", "{:.3f}"),
    ("samples_per_s", "samples/s", "{:,.0f}"),
)


def _cell(fmt: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def format_table(rows: Sequence[Mapping], columns: Sequence[tuple] = COLUMNS) -> str:
    """A plain-text table of ``rows``, columns as ``columns`` ((key, header, format) triples; the image
    demo's COLUMNS by default; missing keys shown as "-"); names left, numbers right-aligned."""
    if not rows:
        return "(no results)"
    cells = [[h for _, h, _ in columns]] + [[_cell(f, r.get(k)) for k, _, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _jsonable(v):
    if isinstance(v, Tensor):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN / Infinity
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def write_json(path, rows: Sequence[Mapping], **extra) -> Path:
    """Write ``{"results": rows, **extra}`` (e.g. timings, config, curves) to ``path``; non-finite floats
    become null. Parent folders are created. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable({"results": list(rows), **extra}), indent=2, allow_nan=False)
    path.write_text(text + "\n")
    return path


def image_grid(x: Tensor, nrow: int = 10, pad: int = 1, pad_value: float = 0.25):
    """Images [N, 1, H, W] in [-1, 1] -> one numpy array [rows * (H + pad) - pad, nrow * (W + pad) - pad] in
    [0, 1] (ink = 1), row-major: with ``class_labels`` conditioning (or ``data.class_ordered`` real
    images) each column is one digit. The padding is ``pad_value`` (light grey in the figure)."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"image_grid: x must be [N, 1, H, W], got {tuple(x.shape)}")
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2)[:, 0]
    N, H, W = x.shape
    cols = min(nrow, N)
    rows = math.ceil(N / cols)
    out = torch.full((rows * (H + pad) - pad, cols * (W + pad) - pad), float(pad_value))
    for i in range(N):
        r, c = divmod(i, cols)
        out[r * (H + pad):r * (H + pad) + H, c * (W + pad):c * (W + pad) + W] = x[i]
    return out.numpy()


Curves = Mapping[str, Union[Sequence[float], Mapping[str, Sequence[float]]]]


def save_figure(path, grids: Mapping[str, Tensor], curves: Optional[Curves] = None, *, title: Optional[str] = None,
                nrow: int = 10, dpi: int = 120) -> Path:
    """Sample grids side by side (one panel per label, in order; up to nrow x nrow images each) and, below
    them, one axis per loss curve (log-scaled when every value is positive). Returns the path."""
    if not grids:
        raise ValueError("save_figure: grids is empty")
    D.require_demo_extra("matplotlib", "the figure")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # a Figure on an Agg canvas: no pyplot state, no display needed

    curves = dict(curves or {})
    ng, nc = len(grids), len(curves)
    width = max(2.6 * ng, 3.2 * max(nc, 1))
    height = 2.9 + (2.4 if nc else 0) + (0.4 if title else 0)
    fig = Figure(figsize=(width, height), dpi=dpi)
    outer = fig.add_gridspec(2 if nc else 1, 1, height_ratios=[2.9, 2.4] if nc else [1], hspace=0.3)
    top = outer[0].subgridspec(1, ng, wspace=0.08)
    for i, (label, x) in enumerate(grids.items()):
        ax = fig.add_subplot(top[0, i])
        ax.imshow(image_grid(x[:nrow * nrow], nrow=nrow), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(str(label), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if nc:
        bottom = outer[1].subgridspec(1, nc, wspace=0.3)
        for j, (name, ys) in enumerate(curves.items()):
            ax = fig.add_subplot(bottom[0, j])
            series = ys.items() if isinstance(ys, Mapping) else [(None, ys)]
            positive = True
            for label, vals in series:
                vals = [float(v) for v in vals]
                positive &= all(v > 0 for v in vals if math.isfinite(v))
                ax.plot(range(1, len(vals) + 1), vals, lw=1.0, label=label)
            if positive:
                ax.set_yscale("log")
            if isinstance(ys, Mapping):
                ax.legend(fontsize=7)
            ax.set_title(str(name), fontsize=9)
            ax.set_xlabel("logged point", fontsize=8)
            ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path
