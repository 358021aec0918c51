"""Training curves like the practice's figures: train vs validation accuracy, and loss, per epoch."""
from __future__ import annotations

from pathlib import Path

# Figures drawn on matplotlib.figure.Figure, never pyplot: files only, no global backend or state, so
# cnnlab leaves a notebook's inline backend as it found it.
from matplotlib.figure import Figure

from cnnlab.records.io import atomic_write


def subplots(nrows: int = 1, ncols: int = 1, figsize=(6.4, 4.8), dpi: int = 100):
    """pyplot.subplots without pyplot: (figure, axes) for a figure that only goes to a file."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols)


def plot_curves(history: list[dict], folder: Path, title: str = "") -> list[Path]:
    """Writes accuracy.png and loss.png; returns their paths."""
    out = []
    epochs = [h["epoch"] for h in history]
    for metric in ("accuracy", "loss"):
        fig, ax = subplots(figsize=(5.5, 3.8))
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
            out.append(path)
    return out
