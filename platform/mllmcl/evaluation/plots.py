"""Heat-map picture of an accuracy matrix (matplotlib, headless)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mllmcl.evaluation.metrics import AccuracyMatrix  # noqa: E402


def heatmap_png(matrix: AccuracyMatrix, title: str = "") -> bytes:
    rows = list(matrix.rows)
    labels = [f"after {matrix.tasks[t]}" for t in range(len(rows))]
    if matrix.zero_shot is not None:
        rows = [list(matrix.zero_shot)] + rows
        labels = ["zero-shot"] + labels
    data = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)
    T = len(matrix.tasks)
    fig, ax = plt.subplots(figsize=(1.2 * T + 2.5, 0.7 * len(rows) + 1.8), dpi=110)
    im = ax.imshow(np.ma.masked_invalid(data), vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(T), matrix.tasks)
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlabel("evaluated task")
    for i in range(data.shape[0]):
        for j in range(T):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center",
                        color="white" if data[i, j] < 60 else "black", fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy (%)", fraction=0.046)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
