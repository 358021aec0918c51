"""What the training curves show, in numbers and words: the best validation epoch, the final train-validation
gap, and whether (and from when) the model overfits; plus a figure overlaying two rows of a suite, seeds and all.

Input is a run's history: one dict per epoch with epoch (1-based), loss, accuracy, val_loss, val_accuracy, lr,
seconds; the val_* keys are missing when the run had no validation split.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from cnnlab.records.plots import subplots
from cnnlab.records.io import atomic_write


def _epoch(h: dict, i: int) -> int:
    """The record's own epoch number (1-based), or its position when a history lacks the key."""
    return int(h.get("epoch", i + 1))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def overfitting_onset(history: list[dict], tolerance: float = 0.02, min_rise_epochs: int = 2) -> int | None:
    """The epoch after which validation loss rises while training loss falls, or None ("no overfitting seen").

    Rule, on the epochs that have a val_loss (v_1..v_n validation loss, t_1..t_n training loss):
      e*    = the first epoch with the lowest v;
      level = the median of v at e*-1, e*, e*+1 (those that exist): the validation loss *around* its minimum,
              so a single lucky low epoch in a noisy but flat curve does not set an unbeatable reference;
    it is overfitting, and e* is returned, when all of
      1. at least `min_rise_epochs` epochs follow e*                      (a rise needs epochs to rise over),
      2. the mean of v over the epochs after e* > level * (1 + tolerance)  (a sustained rise, not one spike),
      3. v_n > level * (1 + tolerance)                                      (still up at the end, not a bump),
      4. t_n < t_e*                                                         (training loss fell meanwhile; when it
         rose too the run is diverging or unstable, which is not overfitting).
    None without validation losses, and None when any loss is NaN/inf (a diverged run tells another story).
    """
    rows = [(i, h) for i, h in enumerate(history) if "val_loss" in h and h["val_loss"] is not None]
    if not rows or not all(_finite(h["val_loss"]) and _finite(h.get("loss")) for _, h in rows):
        return None
    v = [h["val_loss"] for _, h in rows]
    t = [h["loss"] for _, h in rows]
    best = min(range(len(v)), key=lambda i: (v[i], i))
    after = v[best + 1:]
    if len(after) < min_rise_epochs or not after:
        return None
    level = statistics.median(v[max(0, best - 1):best + 2])
    limit = level * (1 + tolerance)
    if statistics.fmean(after) > limit and v[-1] > limit and t[-1] < t[best]:
        i, h = rows[best]
        return _epoch(h, i)
    return None


def curve_summary(history: list[dict]) -> dict:
    """The curve in a few numbers: best_val_epoch / best_val_accuracy (the first epoch of the highest validation
    accuracy; None without validation), final_gap (train minus validation accuracy at the last epoch: positive
    means the model fits its training images better than unseen ones), overfit_onset (see overfitting_onset),
    plus epochs and final_accuracy (training) so a run without validation still has something to say."""
    out = {"epochs": len(history), "final_accuracy": history[-1].get("accuracy") if history else None,
           "best_val_epoch": None, "best_val_accuracy": None, "final_gap": None,
           "overfit_onset": overfitting_onset(history)}
    val = [(i, h) for i, h in enumerate(history) if _finite(h.get("val_accuracy"))]
    if val:
        i, h = max(val, key=lambda ih: (ih[1]["val_accuracy"], -ih[0]))
        out["best_val_epoch"], out["best_val_accuracy"] = _epoch(h, i), float(h["val_accuracy"])
        last = history[-1]
        if _finite(last.get("val_accuracy")) and _finite(last.get("accuracy")):
            out["final_gap"] = float(last["accuracy"] - last["val_accuracy"])
    return out


def describe(summary: dict) -> str:
    """One sentence for a report, e.g. "best validation accuracy 0.61 at epoch 14; final train−validation gap
    +0.12; validation loss rises from epoch 9 while training loss falls (overfitting)"."""
    if not summary.get("epochs", 1):
        return "no epochs recorded"
    if summary.get("best_val_epoch") is None:
        acc = summary.get("final_accuracy")
        tail = f"; final training accuracy {acc:.2f}" if _finite(acc) else ""
        return f"no validation split, so no overfitting can be measured{tail}"
    parts = [f"best validation accuracy {summary['best_val_accuracy']:.2f} at epoch {summary['best_val_epoch']}"]
    if summary.get("final_gap") is not None:
        parts.append(f"final train−validation gap {summary['final_gap']:+.2f}")
    onset = summary.get("overfit_onset")
    parts.append(f"validation loss rises from epoch {onset} while training loss falls (overfitting)"
                 if onset is not None else "no overfitting seen")
    return "; ".join(parts)


def _band(histories: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per epoch: mean, min and max of `key` over the seeds that reached that epoch (early stopping makes
    histories of different lengths; a seed that stopped simply no longer contributes)."""
    by_epoch: dict[int, list[float]] = {}
    for hist in histories:
        for i, h in enumerate(hist):
            if _finite(h.get(key)):
                by_epoch.setdefault(_epoch(h, i), []).append(float(h[key]))
    epochs = sorted(by_epoch)
    return (epochs, [statistics.fmean(by_epoch[e]) for e in epochs],
            [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs])


def plot_compare(a: list[list[dict]], b: list[list[dict]], label_a: str, label_b: str, path: Path,
                 title: str = "") -> Path:
    """Validation accuracy and loss of two suite rows on one figure: each row's mean over its seeds as a line,
    with the min-max range over seeds as a band when it has more than one, so a difference can be judged
    against the seed-to-seed spread at a glance. Returns `path`."""
    fig, axes = subplots(1, 2, figsize=(11, 4.0))
    for ax, key in zip(axes, ("val_accuracy", "val_loss")):
        drawn = False
        for runs, label, color in ((a, label_a, "tab:blue"), (b, label_b, "tab:orange")):
            runs = [h for h in runs if h]
            epochs, mean, lo, hi = _band(runs, key)
            if not epochs:
                continue
            seeds = f" ({len(runs)} seeds, mean)" if len(runs) > 1 else ""
            ax.plot(epochs, mean, color=color, marker="." if len(epochs) <= 40 else None, label=f"{label}{seeds}")
            if len(runs) > 1:
                ax.fill_between(epochs, lo, hi, color=color, alpha=0.2, linewidth=0)
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no validation data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(key.replace("val_", "validation "))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=9)
    fig.suptitle(title or f"{label_a} vs {label_b}")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return path
