"""Heat-map picture of an accuracy matrix (matplotlib, headless)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mllmcl.evaluation.metrics import AccuracyMatrix  # noqa: E402


def _png(fig, ax, title: str = "") -> bytes:
    """The figure as PNG bytes (titled, laid out, closed)."""
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def heatmap_png(matrix: AccuracyMatrix, title: str = "") -> bytes:
    rows = list(matrix.rows)
    labels = [f"after {matrix.tasks[t]}" for t in range(len(rows))]
    if matrix.zero_shot is not None:
        rows = [list(matrix.zero_shot)] + rows
        labels = ["zero-shot"] + labels
    data = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)
    T = len(matrix.tasks)
    ahead = np.full_like(data, np.nan)  # the next task before it is trained: drawn in brackets
    offset = 1 if matrix.zero_shot is not None else 0
    for j, v in enumerate(matrix.forward or []):
        if v is not None and j - 1 + offset < len(rows):
            ahead[j - 1 + offset, j] = v
    fig, ax = plt.subplots(figsize=(1.2 * T + 2.5, 0.7 * len(rows) + 1.8), dpi=110)
    im = ax.imshow(np.ma.masked_invalid(data), vmin=0, vmax=100, cmap="viridis")
    ax.imshow(np.ma.masked_invalid(ahead), vmin=0, vmax=100, cmap="viridis", alpha=0.35)
    ax.set_xticks(range(T), matrix.tasks)
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlabel("evaluated task")
    for i in range(data.shape[0]):
        for j in range(T):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center",
                        color="white" if data[i, j] < 60 else "black", fontsize=9)
            elif not np.isnan(ahead[i, j]):
                ax.text(j, i, f"({ahead[i, j]:.1f})", ha="center", va="center", fontsize=8, style="italic")
    fig.colorbar(im, ax=ax, label="accuracy (%)", fraction=0.046)
    return _png(fig, ax, title)


def curves_png(curves: dict[str, list[float]], title: str = "") -> bytes:
    """Mean accuracy over the seen tasks after each stage, one line per experiment."""
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name)
    ax.set_xlabel("stage (tasks trained)")
    ax.set_ylabel("mean accuracy over seen tasks (%)")
    ax.set_ylim(0, 100)
    if curves:
        ax.set_xticks(range(1, max(len(v) for v in curves.values()) + 1))
        ax.legend(fontsize=8)
    return _png(fig, ax, title)


def confusion_png(confusion: dict[str, dict[str, int]], title: str = "") -> bytes:
    """A router's confusion matrix as a heat-map: row = a task's questions, column = the expert
    chosen, cell = percent of the row (the diagonal is routing accuracy per task)."""
    tasks = list(confusion)
    experts = list(next(iter(confusion.values()))) if confusion else []
    data = np.array([[confusion[t].get(e, 0) for e in experts] for t in tasks], dtype=float)
    pct = 100.0 * data / np.maximum(data.sum(axis=1, keepdims=True), 1.0)
    fig, ax = plt.subplots(figsize=(1.1 * len(experts) + 2.5, 0.7 * len(tasks) + 1.8), dpi=110)
    im = ax.imshow(pct, vmin=0, vmax=100, cmap="magma")
    ax.set_xticks(range(len(experts)), experts)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("chosen expert")
    ax.set_ylabel("question's task")
    for i in range(len(tasks)):
        for j in range(len(experts)):
            ax.text(j, i, f"{pct[i, j]:.0f}", ha="center", va="center",
                    color="white" if pct[i, j] < 60 else "black", fontsize=9)
    fig.colorbar(im, ax=ax, label="% of the task's questions", fraction=0.046)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
