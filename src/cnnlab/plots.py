"""Training curves like the practice's figures: train vs validation accuracy, and loss, per epoch."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from cnnlab.runs import atomic_write  # noqa: E402


def plot_curves(history: list[dict], folder: Path, title: str = "") -> list[Path]:
    """Writes accuracy.png and loss.png; returns their paths."""
    out = []
    epochs = [h["epoch"] for h in history]
    for metric in ("accuracy", "loss"):
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
        ax.plot(epochs, [h[metric] for h in history], label="train", marker=".")
        if history and f"val_{metric}" in history[0]:
            ax.plot(epochs, [h[f"val_{metric}"] for h in history], label="validation", marker=".")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{title} {metric}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(folder) / f"{metric}.png"
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png")
        plt.close(fig)
        out.append(path)
    return out
