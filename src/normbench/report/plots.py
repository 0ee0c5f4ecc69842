"""Report figures (matplotlib, Agg canvas, PNG files). No pyplot: no global state, no display."""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110
MAX_LABEL = 64  # characters of a tick or legend label (an Optuna sweep's settings run long)
MAX_BAR_LABEL = 40  # a bar's label: the table beside the figure has the rest
CLIP_QUANTILES = (0.02, 0.98)  # the loss axis's range when one run spikes far outside it


def _short(label: str, limit: int = MAX_LABEL) -> str:
    """Group prefixes dropped (optimizer.lr=... -> lr=...), then cut to `limit` characters."""
    label = re.sub(r"\b(?:model|optimizer|scheduler|data|trainer|loss|norm)\.(?=\w+=)", "", label)
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _legend_below(fig, ax, n: int) -> None:
    """One legend for the figure, under the axes: never on top of the curves, however many entries."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncols=max(1, min(2, n)),
               frameon=False)


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _label(ax, title: str, xlabel: str, ylabel: str = "", grid_axis: str = "both",
           fontsize: int = 10) -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=fontsize)
    ax.grid(axis=grid_axis, alpha=0.3)


def _colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


@dataclass
class BarRow:
    label: str
    ours: float | None  # mean, in percent
    ci: float | None  # 95% half-width, in percent
    n: int
    study: float | None
    points: Sequence[float] = ()  # the runs' values when there are too few for an interval


def summary_bars(rows: Sequence[BarRow], path: str, title: str, xlabel: str) -> None:
    """Horizontal bars (labels stay readable however long or many): ours (mean, 95% CI, n) beside the
    study's number, the first row on top."""
    fig, [[ax]] = _figure(8.0, max(2.4, 0.42 * len(rows) + 1.4))
    y = np.arange(len(rows))[::-1]
    height = 0.4
    ours, err, study = np.array([(r.ours, r.ci, r.study) for r in rows], dtype=float).reshape(-1, 3).T
    ax.barh(y + height / 2, ours, height, xerr=np.nan_to_num(err), capsize=3, color="#3b75af",
            label="ours (mean ± 95% CI)")
    if not np.isnan(study).all():
        ax.barh(y - height / 2, study, height, color="#c9c9c9", edgecolor="#666666", label="study")
    py = [yi + height / 2 for yi, r in zip(y, rows, strict=True) for _ in r.points]
    px = [v for r in rows for v in r.points]
    if px:
        ax.scatter(px, py, s=14, color="black", zorder=3, label="runs (n < 3)")
    for yi, r, v in zip(y, rows, ours, strict=True):
        if not math.isnan(v):
            ax.annotate(f"n={r.n}", (0, yi + height / 2), textcoords="offset points", xytext=(3, 0),
                        va="center", fontsize=7, color="white")
    ax.set_yticks(y, [_short(r.label, MAX_BAR_LABEL) for r in rows], fontsize=8)
    _label(ax, textwrap.fill(title, 70), xlabel, "", "x", fontsize=9)
    _legend_below(fig, ax, 3)
    fig.savefig(path, format="png", dpi=DPI)


def clustered_bars(ours: dict[tuple[str, str], tuple], study: dict[tuple[str, str], float], path: str,
                   title: str, ylabel: str) -> None:
    """Bars clustered by the keys' cluster (x axis, e.g. batch size), one bar per group (e.g. norm), in the
    order of ``study``'s (group, cluster) keys: ours with 95% CI; the study's value as a black marker."""
    groups, clusters = (list(dict.fromkeys(key[i] for key in study)) for i in (0, 1))
    fig, [[ax]] = _figure(7.5, 4.2)
    x = np.arange(len(clusters))
    width = 0.8 / max(1, len(groups))
    colors = _colors(len(groups))
    for gi, group in enumerate(groups):
        offs = x - 0.4 + width * (gi + 0.5)
        # (mean, CI) per cluster; None -> nan: no bar, no error bar
        v, e = np.array([ours.get((group, c), (None, None)) for c in clusters], dtype=float).reshape(-1, 2).T
        ax.bar(offs, v, width, yerr=np.nan_to_num(e), capsize=2, color=colors[gi], label=f"{group} (ours)")
        s = np.array([study.get((group, c), np.nan) for c in clusters], dtype=float)
        ax.scatter(offs, s, marker="_", s=(60 * width) ** 2, color="black", zorder=3,
                   label="study" if gi == 0 else None)
    ax.set_xticks(x, list(clusters))
    _label(ax, title, "batch size", ylabel, "y")
    ax.legend(fontsize=8, ncols=len(groups) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.savefig(path, format="png", dpi=DPI)


def curves(series: Sequence[tuple[str, Any]], path: str, title: str) -> None:
    """Train (dashed) and validation (solid) accuracy and loss against optimizer steps, runs on shared
    axes (series: label, DataFrame of figures.CURVE_KEYS per epoch end); the loss axis clipped at spikes."""
    fig, axes = _figure(11.0, 4.2, ncols=2)
    for (label, c), color in zip(series, _colors(len(series)), strict=True):
        for ax, kind, scale in ((axes[0][0], "acc", 100), (axes[0][1], "loss", 1)):
            ax.plot(c["step"], c[f"train/{kind}"] * scale, "--", color=color, lw=1.2)
            ax.plot(c["step"], c[f"val/{kind}"] * scale, "-", color=color, lw=1.6, label=_short(label))
    for ax, name, ylabel in zip(axes[0], ("accuracy", "loss"), ("accuracy (%)", "loss"), strict=True):
        _label(ax, f"{name}: train dashed, validation solid", "optimizer steps", ylabel, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    loss = axes[0][1]
    if _clip_to_quantiles(loss, [c[k] for _, c in series for k in ("train/loss", "val/loss")]):
        low, high = CLIP_QUANTILES
        loss.set_title(f"{loss.get_title()}\n(y clipped to the {low:.0%}–{high:.0%} quantiles: a run spikes)",
                       fontsize=9)
    if len(series) <= 4:
        axes[0][1].legend(fontsize=7, loc="upper right")
    else:
        fig.set_figheight(4.2 + 0.2 * math.ceil(len(series) / 2))
        _legend_below(fig, axes[0][0], len(series))
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, format="png", dpi=DPI)


def _clip_to_quantiles(ax, arrays: Sequence[np.ndarray]) -> bool:
    """Limit the y axis to the CLIP_QUANTILES range of the values (with a margin) when some value lies
    further than that range's width outside it: one run's spike would flatten every other curve."""
    values = np.concatenate([np.asarray(a, dtype=float) for a in arrays] or [np.array([])])
    values = values[np.isfinite(values)]
    lo, hi = np.quantile(values, CLIP_QUANTILES) if values.size > 1 else (0.0, 0.0)
    pad = max(hi - lo, 1e-6) * 0.15
    if values.size < 2 or lo - 6 * pad <= values.min() <= values.max() <= hi + 6 * pad:
        return False
    ax.set_ylim(lo - pad, hi + pad)
    return True


@dataclass
class Band:
    label: str
    step: np.ndarray
    low: np.ndarray
    high: np.ndarray
    mean: np.ndarray | None = None


def band_plot(bands: Sequence[Band], path: str, title: str, ylabel: str,
              ref_ranges: Sequence[tuple[float, float] | None]) -> None:
    """Per-step min-max bands (e.g. training loss over the runs of several learning rates); reference
    ranges per band (or None) drawn as dashed lines in the band's colour; log scale for a wide range."""
    fig, [[ax]] = _figure(7.5, 4.2)
    for band, color, ref in zip(bands, _colors(len(bands)), ref_ranges, strict=True):
        ax.fill_between(band.step, band.low, band.high, color=color, alpha=0.35, lw=0, label=band.label)
        if band.mean is not None:
            ax.plot(band.step, band.mean, color=color, lw=1)
        if ref is not None:
            for y in ref:
                ax.axhline(y, color=color, ls="--", lw=1)
    lows, highs = (np.concatenate([getattr(b, k) for b in bands]) for k in ("low", "high"))
    positive = lows[lows > 0]
    if positive.size and np.nanmax(highs) / np.nanmin(positive) > 50:
        ax.set_yscale("log")
    _label(ax, title, "step", ylabel)
    ax.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=DPI)


def probe_panels(panels: dict[str, Sequence[Band]], path: str, title: str) -> None:
    """One panel per probe metric; each group (e.g. plain / BN) as mean line with min-max band."""
    ncols, nrows = min(2, len(panels)), math.ceil(len(panels) / 2)
    fig, axes = _figure(5.5 * ncols, 3.6 * nrows, ncols=ncols, nrows=nrows)
    flat = axes.ravel()
    for ax, (name, bands) in zip(flat, panels.items(), strict=False):
        for band, color in zip(bands, _colors(len(bands)), strict=True):
            ax.fill_between(band.step, band.low, band.high, color=color, alpha=0.3, lw=0)
            ax.plot(band.step, band.mean if band.mean is not None else band.high, color=color, lw=1.2,
                    label=band.label)
        _label(ax, name, "step", fontsize=9)
        ax.legend(fontsize=7)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, format="png", dpi=DPI)
