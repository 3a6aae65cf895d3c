"""The loss-curve picture of a training run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_loss_curve(path: Path, loss_history: list[list[float]], segments: list[dict], title: str) -> Path:
    """Per-step loss (thin) and its moving average (thick); dotted lines where a run resumed."""
    # Kept here, not at the top: selecting the Agg backend is process-wide, so it happens only
    # when a curve is drawn, not whenever the training modules are imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([s for s, _ in loss_history], dtype=float)
    losses = np.array([v for _, v in loss_history], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="loss per step")
    k = max(1, min(50, len(losses) // 10))
    if len(losses) >= k:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=2.0, label=f"moving average ({k} steps)")
    for seg in segments[1:]:
        if seg.get("start_step"):
            ax.axvline(seg["start_step"], ls=":", color="grey")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
