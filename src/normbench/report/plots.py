"""Report figures (matplotlib, Agg canvas, PNG files). No pyplot: no global state, no display."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110
MAX_LABEL = 64  # characters of a tick or legend label (an Optuna sweep's settings run long)


def _short(label: str) -> str:
    """Group prefixes dropped (optimizer.lr=... -> lr=...), then cut to MAX_LABEL characters."""
    label = re.sub(r"\b(?:model|optimizer|scheduler|data|trainer|loss|norm)\.(?=\w+=)", "", label)
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def _legend_below(fig, ax, n: int) -> None:
    """One legend for the figure, under the axes: never on top of the curves, however many entries."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncols=max(1, min(2, n)),
               frameon=False)


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Figure, path: str) -> str:
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _colors(n: int) -> list:
    from matplotlib import colormaps

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


def summary_bars(rows: Sequence[BarRow], path: str, title: str, ylabel: str) -> str:
    """Ours (mean with 95% CI, n under the bar) next to the study's number, one pair per row."""
    fig, axes = _figure(max(5.0, 0.55 * len(rows) + 2.5), 4.2)
    ax = axes[0][0]
    x = np.arange(len(rows))
    width = 0.4
    ours = np.array([np.nan if r.ours is None else r.ours for r in rows], dtype=float)
    err = np.array([0.0 if r.ci is None else r.ci for r in rows], dtype=float)
    study = np.array([np.nan if r.study is None else r.study for r in rows], dtype=float)
    ax.bar(x - width / 2, ours, width, yerr=err, capsize=3, color="#3b75af", label="ours (mean ± 95% CI)")
    ax.bar(x + width / 2, study, width, color="#c9c9c9", edgecolor="#666666", label="study")
    px = [xi - width / 2 for xi, r in zip(x, rows, strict=True) for _ in r.points]
    py = [v for r in rows for v in r.points]
    if py:
        ax.scatter(px, py, s=14, color="black", zorder=3, label="runs (n < 3)")
    for xi, r, v in zip(x, rows, ours, strict=True):
        if not math.isnan(v):
            ax.annotate(f"n={r.n}", (xi - width / 2, 0), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize=7, color="white")
    ax.set_xticks(x, [_short(r.label) for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # off the bars
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def clustered_bars(groups: Sequence[str], clusters: Sequence[str], ours: dict[tuple[str, str], tuple],
                   study: dict[tuple[str, str], float], path: str, title: str, ylabel: str) -> str:
    """Bars clustered by ``clusters`` (x axis, e.g. batch size), one bar per group (e.g. norm):
    ours with 95% CI; the study's value as a black marker on the bar."""
    fig, axes = _figure(7.5, 4.2)
    ax = axes[0][0]
    x = np.arange(len(clusters))
    width = 0.8 / max(1, len(groups))
    colors = _colors(len(groups))
    for gi, group in enumerate(groups):
        offs = x - 0.4 + width * (gi + 0.5)
        vals = [ours.get((group, c), (None, None))[0] for c in clusters]
        errs = [ours.get((group, c), (None, None))[1] for c in clusters]
        v = np.array([np.nan if a is None else a for a in vals], dtype=float)
        e = np.array([0.0 if a is None else a for a in errs], dtype=float)
        ax.bar(offs, v, width, yerr=e, capsize=2, color=colors[gi], label=f"{group} (ours)")
        s = np.array([study.get((group, c), np.nan) for c in clusters], dtype=float)
        ax.scatter(offs, s, marker="_", s=(60 * width) ** 2, color="black", zorder=3,
                   label="study" if gi == 0 else None)
    ax.set_xticks(x, list(clusters))
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncols=len(groups) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


@dataclass
class Curve:
    label: str
    epoch: np.ndarray
    train_acc: np.ndarray
    val_acc: np.ndarray
    train_loss: np.ndarray
    val_loss: np.ndarray


def curves(series: Sequence[Curve], path: str, title: str) -> str:
    """Train (dashed) and validation (solid) accuracy and loss per epoch, runs on shared axes."""
    fig, axes = _figure(11.0, 4.2, ncols=2)
    colors = _colors(len(series))
    for c, color in zip(series, colors, strict=True):
        for ax, train, val in ((axes[0][0], c.train_acc, c.val_acc), (axes[0][1], c.train_loss, c.val_loss)):
            ax.plot(c.epoch, train, "--", color=color, lw=1.2)
            ax.plot(c.epoch, val, "-", color=color, lw=1.6, label=_short(c.label))
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][1].set_ylabel("loss")
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
    axes[0][0].set_title("accuracy: train dashed, validation solid", fontsize=9)
    axes[0][1].set_title("loss: train dashed, validation solid", fontsize=9)
    if len(series) <= 4:
        axes[0][1].legend(fontsize=7, loc="upper right")
    else:
        fig.set_figheight(4.2 + 0.2 * math.ceil(len(series) / 2))
        _legend_below(fig, axes[0][0], len(series))
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


@dataclass
class Band:
    label: str
    step: np.ndarray
    low: np.ndarray
    high: np.ndarray
    mean: np.ndarray | None = None


def band_plot(bands: Sequence[Band], path: str, title: str, ylabel: str, logy: bool | None = None,
              ref_ranges: Sequence[tuple[float, float] | None] | None = None) -> str:
    """Per-step min-max bands (e.g. training loss over the runs of several learning rates); optional
    reference ranges per band drawn as dashed lines in the band's colour."""
    fig, axes = _figure(7.5, 4.2)
    ax = axes[0][0]
    refs = list(ref_ranges) if ref_ranges is not None else [None] * len(bands)
    for band, color, ref in zip(bands, _colors(len(bands)), refs, strict=True):
        ax.fill_between(band.step, band.low, band.high, color=color, alpha=0.35, lw=0, label=band.label)
        if band.mean is not None:
            ax.plot(band.step, band.mean, color=color, lw=1)
        if ref is not None:
            for y in ref:
                ax.axhline(y, color=color, ls="--", lw=1)
    if logy is None:
        lows = np.concatenate([b.low for b in bands]) if bands else np.array([1.0])
        highs = np.concatenate([b.high for b in bands]) if bands else np.array([1.0])
        positive = lows[lows > 0]
        logy = bool(positive.size and np.nanmax(highs) / np.nanmin(positive) > 50)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def probe_panels(panels: dict[str, Sequence[Band]], path: str, title: str) -> str:
    """One panel per probe metric; each group (e.g. plain / BN) as mean line with min-max band."""
    names = list(panels)
    ncols = min(2, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = _figure(5.5 * ncols, 3.6 * nrows, ncols=ncols, nrows=nrows)
    flat = [ax for row in axes for ax in row]
    for ax, name in zip(flat, names, strict=False):
        bands = panels[name]
        for band, color in zip(bands, _colors(len(bands)), strict=True):
            ax.fill_between(band.step, band.low, band.high, color=color, alpha=0.3, lw=0)
            ax.plot(band.step, band.mean if band.mean is not None else band.high, color=color, lw=1.2,
                    label=band.label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in flat[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
