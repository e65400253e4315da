"""Training curves of a run: the classifier's and the simulator's logs, as matplotlib figures.

Each function takes the rows of a log CSV (as ``csv.DictReader`` reads them) and returns a
``Figure`` on an Agg canvas (no pyplot state); the caller saves or embeds it.
"""

from __future__ import annotations

import matplotlib.figure
import numpy as np


def _column(rows: list[dict[str, str]], name: str) -> np.ndarray:
    """Float column of CSV rows; blanks and unparsable entries become nan."""
    out = []
    for row in rows:
        try:
            out.append(float(row.get(name, "") or "nan"))
        except ValueError:
            out.append(float("nan"))
    return np.asarray(out, dtype=np.float64)


def classifier_curves_figure(rows: list[dict[str, str]]) -> matplotlib.figure.Figure:
    """Training curves of the classifier from ``classifier_log.csv`` rows (as read by
    ``csv.DictReader``): train / validation loss and validation AUC per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epoch = _column(rows, "epoch")
    fig = Figure(figsize=(8.0, 2.8))
    FigureCanvasAgg(fig)
    loss_ax, auc_ax = fig.subplots(1, 2)
    loss_ax.plot(epoch, _column(rows, "train_loss"), label="train")
    loss_ax.plot(epoch, _column(rows, "val_loss"), label="validation")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss (BCE)")
    loss_ax.legend(fontsize=8)
    auc_ax.plot(epoch, _column(rows, "val_auc"), label="AUC")
    auc_ax.plot(epoch, _column(rows, "val_balanced_accuracy"), label="balanced accuracy")
    auc_ax.set_ylim(0.0, 1.02)
    auc_ax.set_xlabel("epoch")
    auc_ax.set_ylabel("validation")
    auc_ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def simulator_curves_figure(
    rows: list[dict[str, str]], window: int = 10
) -> matplotlib.figure.Figure:
    """Training curves of the simulator from ``simulator_log.csv`` rows: every loss term
    (log scale) and the share of the batch moved past the margin (raw and running mean over
    ``window`` steps) against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    step = _column(rows, "step")
    fig = Figure(figsize=(8.0, 2.8))
    FigureCanvasAgg(fig)
    loss_ax, moved_ax = fig.subplots(1, 2)
    positive = []
    for name in ("loss", "shift", "cycle", "smooth", "magnitude"):
        values = _column(rows, name)
        if np.any(values > 0):
            loss_ax.plot(step, np.where(values > 0, values, np.nan), label=name, lw=1)
            positive.append(values[values > 0])
    loss_ax.set_yscale("log")
    if positive:  # a first step's near-zero term must not squash the curves
        loss_ax.set_ylim(bottom=0.5 * float(np.percentile(np.concatenate(positive), 2)))
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss term")
    loss_ax.legend(fontsize=7)
    moved = _column(rows, "moved_share")
    moved_ax.plot(step, moved, lw=0.6, alpha=0.5, label="per step")
    if moved.size:
        size = max(1, min(window, moved.size))
        running = np.convolve(np.nan_to_num(moved), np.ones(size) / size, mode="valid")
        moved_ax.plot(step[size - 1:], running, lw=1.5, label=f"mean of {size} steps")
    moved_ax.set_ylim(-0.02, 1.02)
    moved_ax.set_xlabel("step")
    moved_ax.set_ylabel("moved past margin (share)")
    moved_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
