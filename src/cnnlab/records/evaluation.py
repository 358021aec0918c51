"""Scoring a trained model on a split beyond one accuracy number: top-5, macro F1, a confusion matrix,
per-class precision/recall/F1, the classes most often mistaken for each other, and the most confident errors.

The scoring runs on the model's device as batched tensor ops, with one copy to the host at the end, so a
50,000-image split costs about as much as one forward pass over its logits. Writing the folder
(per_class.csv, confused_pairs.csv, confusion.png, errors.png) is plain numpy/matplotlib on the host.

Convention for undefined ratios (the same as scikit-learn's zero_division=0): a class that is never
predicted has precision 0.0, a class with no images has recall 0.0, and F1 is 0.0 whenever precision + recall
is 0. Macro F1 averages F1 over the classes that occur in the split or in the predictions (scikit-learn's
default labels), so a class absent from both does not drag the mean down.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure     # figures on Figure, never pyplot: files only, no global state

from cnnlab.records.plots import subplots
from cnnlab.records.io import atomic_write

PER_CLASS_KEYS = ("class", "support", "precision", "recall", "f1", "most_confused_with", "most_confused_rate")
PAIR_KEYS = ("true", "pred", "count", "rate")
LABELLED_MAX = 30      # up to this many classes the confusion matrix gets a tick label per class
VALUES_MAX = 12        # up to this many classes each cell also shows its value


@dataclass
class Evaluation:
    """Everything the scoring found on one split; `confusion` rows are true classes, columns predictions."""
    classes: list[str]
    n: int
    loss: float
    top1: float
    top5: float | None
    macro_f1: float
    confusion: np.ndarray
    per_class: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)

    def summary(self, prefix: str = "test") -> dict:
        """The numbers a results.json lacks (loss and accuracy are already there): top-5 (omitted when the
        split has 5 classes or fewer, where it is always 1) and macro F1."""
        out = {}
        if self.top5 is not None:
            out[f"{prefix}_top5"] = self.top5
        out[f"{prefix}_macro_f1"] = self.macro_f1
        return out


def evaluate_logits(logits: torch.Tensor, y: torch.Tensor, classes: list[str], n_errors: int = 16) -> Evaluation:
    """Scores logits (N, K) against labels y (N,) on whatever device they are on.

    Confusion counts come from one torch.bincount over y * K + pred; the errors are the `n_errors` wrong
    predictions with the highest softmax probability (ties: any order). All results are packed into a single
    tensor and copied to the host once, so a CUDA split is never synchronised per image or per class.
    """
    if logits.ndim != 2 or y.ndim != 1 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"logits must be (N, K) and y (N,); got {tuple(logits.shape)} and {tuple(y.shape)}")
    n, k = logits.shape
    if k != len(classes):
        raise ValueError(f"logits have {k} columns but there are {len(classes)} class names")
    if n == 0:
        raise ValueError("nothing to evaluate: the split is empty")
    logits = logits.detach().float()
    y = y.detach().to(device=logits.device, dtype=torch.long)
    # Out-of-range labels would fire a device-side assert on CUDA (which poisons the whole process), so they are
    # clamped for the arithmetic and counted, and the error is raised on the host after the single copy.
    bad = ((y < 0) | (y >= k)).sum()
    y = y.clamp(0, k - 1)

    # summed, then divided in float64: the arithmetic of the run's own test loss (Trainer.score), to the last digit
    loss = F.cross_entropy(logits, y, reduction="sum").double() / n
    pred = logits.argmax(dim=1)
    cm = torch.bincount(y * k + pred, minlength=k * k)
    top5 = (logits.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum() if k > 5 else torch.zeros((), device=y.device)

    probs = logits.softmax(dim=1)
    conf = probs.gather(1, pred[:, None]).squeeze(1)
    # Right predictions get a confidence of -1 so that topk ranks wrong ones first; they are dropped on the host.
    ranked = torch.where(pred != y, conf, torch.full_like(conf, -1.0))
    m = min(n_errors, n)
    err_conf, err_idx = ranked.topk(m) if m > 0 else (ranked[:0], y[:0])
    # float64 holds every count and index exactly (MPS has no float64; its float32 is exact below 2**24).
    dtype = torch.float32 if logits.device.type == "mps" else torch.float64
    packed = torch.cat([torch.stack([loss.to(dtype), top5.to(dtype), bad.to(dtype)]), cm.to(dtype),
                        err_conf.to(dtype), err_idx.to(dtype), pred[err_idx].to(dtype), y[err_idx].to(dtype)])
    host = packed.cpu().numpy()

    if host[2]:
        raise ValueError(f"{int(host[2])} labels are outside 0..{k - 1}")
    confusion = np.rint(host[3:3 + k * k]).astype(np.int64).reshape(k, k)
    e = host[3 + k * k:].reshape(4, m) if m else np.zeros((4, 0))
    errors = [{"index": int(i), "true": classes[int(t)], "pred": classes[int(p)], "prob": float(c)}
              for c, i, p, t in e.T if c >= 0]
    per_class = per_class_metrics(confusion, classes)
    return Evaluation(classes=list(classes), n=n, loss=float(host[0]), top1=float(np.trace(confusion) / n),
                      top5=float(host[1] / n) if k > 5 else None, macro_f1=macro_f1(confusion, per_class),
                      confusion=confusion, per_class=per_class, errors=errors)


def confusion_matrix(y_true, y_pred, k: int) -> np.ndarray:
    """K x K int64 counts, rows = true class, columns = predicted class (tensors or array-likes)."""
    t = torch.as_tensor(y_true, dtype=torch.long).reshape(-1)
    p = torch.as_tensor(y_pred, dtype=torch.long, device=t.device).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.numel()} labels, y_pred {p.numel()}")
    if t.numel() and (int(torch.minimum(t.min(), p.min())) < 0 or int(torch.maximum(t.max(), p.max())) >= k):
        raise ValueError(f"labels must lie in 0..{k - 1}")
    return torch.bincount(t * k + p, minlength=k * k).reshape(k, k).cpu().numpy().astype(np.int64)


def per_class_metrics(cm: np.ndarray, classes: list[str]) -> list[dict]:
    """One dict per class: support, precision, recall, F1 (0.0 where undefined, see the module docstring),
    and the class it is most often mistaken for ("" when it is never wrong; ties go to the lower index)."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    out = []
    for i, name in enumerate(classes):
        precision = tp[i] / predicted[i] if predicted[i] else 0.0
        recall = tp[i] / support[i] if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        j = int(off[i].argmax())
        wrong = int(off[i, j])
        out.append({"class": name, "support": int(support[i]), "precision": float(precision),
                    "recall": float(recall), "f1": float(f1),
                    "most_confused_with": classes[j] if wrong else "",
                    "most_confused_rate": float(wrong / support[i]) if wrong else 0.0})
    return out


def macro_f1(cm: np.ndarray, per_class: list[dict] | None = None) -> float:
    """Unweighted mean F1 over the classes present in the labels or the predictions (see the module docstring)."""
    cm = np.asarray(cm)
    per_class = per_class if per_class is not None else per_class_metrics(cm, [str(i) for i in range(len(cm))])
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    f1 = [pc["f1"] for pc, p in zip(per_class, present) if p]
    return float(np.mean(f1)) if f1 else 0.0


def most_confused_pairs(cm: np.ndarray, classes: list[str], n: int = 10) -> list[dict]:
    """The `n` largest off-diagonal cells: count descending, then rate (count / images of the true class)
    descending, then class order; cells with no mistakes are never listed."""
    cm = np.asarray(cm, dtype=np.int64)
    support = cm.sum(axis=1)
    cells = [(int(cm[i, j]), cm[i, j] / support[i], i, j)
             for i, j in zip(*np.nonzero(cm)) if i != j]
    cells.sort(key=lambda c: (-c[0], -c[1], c[2], c[3]))
    return [{"true": classes[i], "pred": classes[j], "count": count, "rate": float(rate)}
            for count, rate, i, j in cells[:n]]


def write_evaluation(folder: Path, ev: Evaluation, images: torch.Tensor | None, title: str = "",
                     heatmaps: list[np.ndarray] | None = None) -> list[Path]:
    """Writes per_class.csv, confused_pairs.csv, confusion.png and errors.png into `folder`; returns their paths.

    `images` is the split as a (N, C, H, W) tensor (uint8, or float scaled per image for display) indexed by
    the errors' "index"; without it errors.png shows the captions only. `heatmaps`: per error, the image under
    its Grad-CAM map of the predicted class (inference/explain.error_overlays), drawn beside it in errors.png.
    """
    folder = Path(folder)
    pairs = most_confused_pairs(ev.confusion, ev.classes)
    paths = [folder / "per_class.csv", folder / "confused_pairs.csv", folder / "confusion.png", folder / "errors.png"]
    _write_csv(paths[0], PER_CLASS_KEYS, ev.per_class)
    _write_csv(paths[1], PAIR_KEYS, pairs)
    _save(plot_confusion(ev.confusion, ev.classes, pairs, title), paths[2])
    _save(plot_errors(ev.errors, images, title, heatmaps), paths[3])
    return paths


def _write_csv(path: Path, keys: tuple[str, ...], rows: list[dict]) -> None:
    """CSV with floats at 4 decimals: enough to compare runs, short enough to read."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows([{k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()} for row in rows])
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def _save(fig, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


def row_normalize(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its class's image count (rows of absent classes stay 0), so the diagonal is recall
    and classes of different sizes read on one scale."""
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)


def cluster_order(cm: np.ndarray) -> np.ndarray:
    """A class order that puts classes confused with each other next to each other.

    Average-linkage clustering on the symmetrised off-diagonal confusion rates (distance = 1 - rate / max rate),
    with scipy's optimal leaf ordering up to 300 classes (cubic cost beyond). Without any confusion the
    original order is kept.
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform
    k = len(cm)
    r = row_normalize(cm)
    s = (r + r.T) / 2
    np.fill_diagonal(s, 0.0)
    if k < 3 or s.max() <= 0:
        return np.arange(k)
    d = 1.0 - s / s.max()
    np.fill_diagonal(d, 0.0)
    z = linkage(squareform(d, checks=False), method="average", optimal_ordering=k <= 300)
    return leaves_list(z)


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def plot_confusion(cm: np.ndarray, classes: list[str], pairs: list[dict], title: str = ""):
    """Row-normalised confusion matrix figure: labelled (and with values up to 12 classes) up to 30 classes;
    beyond that a clustered heatmap without per-class labels beside a table of the most confused pairs."""
    k = len(classes)
    r = row_normalize(cm)
    head = f"{title} confusion (row-normalised)".strip()
    if k > LABELLED_MAX:
        return _plot_confusion_large(r, cm, classes, pairs, head)
    side = max(5.0, 2.6 + 0.34 * k)
    fig, ax = subplots(figsize=(side + 1.2, side))
    im = ax.imshow(r, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="fraction of the true class")
    names = [_short(c, 24) for c in classes]
    fs = 9 if k <= VALUES_MAX else 8
    ax.set_xticks(range(k), names, rotation=45 if k <= VALUES_MAX else 90, ha="right" if k <= VALUES_MAX else "center",
                  rotation_mode="anchor" if k <= VALUES_MAX else "default", fontsize=fs)
    ax.set_yticks(range(k), names, fontsize=fs)
    if k <= VALUES_MAX:
        for i in range(k):
            for j in range(k):
                if cm[i, j] or i == j:
                    ax.text(j, i, f"{r[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if r[i, j] > 0.55 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(head)
    fig.tight_layout()
    return fig


def _plot_confusion_large(r: np.ndarray, cm: np.ndarray, classes: list[str], pairs: list[dict], head: str):
    """Many classes: names would not fit, so the structure (clusters of confused classes) is the message and
    the table names the worst pairs. A square-root colour scale keeps small off-diagonal rates visible."""
    order = cluster_order(cm)
    fig = Figure(figsize=(15, 7.5), dpi=100)
    grid = fig.add_gridspec(1, 2, width_ratios=[1.15, 1.0], wspace=0.08)
    ax = fig.add_subplot(grid[0])
    im = ax.imshow(r[np.ix_(order, order)], cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1),
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="fraction of the true class (square-root scale)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"predicted class ({len(classes)} classes, clustered order)")
    ax.set_ylabel("true class (same order)")
    ax.set_title(head)
    tab = fig.add_subplot(grid[1])
    tab.axis("off")
    tab.set_title("most confused pairs", loc="left")
    if pairs:
        rows = [[_short(p["true"], 30), _short(p["pred"], 30), str(p["count"]), f"{p['rate']:.2f}"] for p in pairs]
        t = tab.table(cellText=rows, colLabels=["true", "predicted as", "count", "rate"], loc="upper left",
                      colLoc="left", cellLoc="left", colWidths=[0.42, 0.42, 0.08, 0.08])
        t.auto_set_font_size(False)
        t.set_fontsize(9)
        t.scale(1.0, 1.6)
    else:
        tab.text(0.0, 0.95, "no mistakes", va="top", fontsize=11)
    fig.subplots_adjust(left=0.03, right=0.98, top=0.92, bottom=0.06)
    return fig


def _as_display(img: torch.Tensor) -> np.ndarray | None:
    """(C, H, W) tensor -> (H, W, 3) or (H, W) array imshow draws as-is; uint8 shown as stored, floats (e.g.
    normalised inputs) rescaled to their own min..max; None for anything that is not 1- or 3-channel image data."""
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        return None
    a = img.detach().cpu()
    if a.dtype == torch.uint8:
        a = a.numpy()
    else:
        a = a.float().numpy()
        lo, hi = np.nanmin(a), np.nanmax(a)
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def _caption(err: dict) -> str:
    text = f"true: {_short(err['true'], 32)} / pred: {_short(err['pred'], 32)} ({err['prob']:.2f})"
    return text if len(text) <= 42 else text.replace(" / ", " /\n", 1)


def plot_errors(errors: list[dict], images: torch.Tensor | None, title: str = "",
                heatmaps: list[np.ndarray] | None = None):
    """Grid (4 wide) of the most confident mistakes with their captions; captions alone without images.
    With `heatmaps` (one (H, W, 3) uint8 picture per error) each image has its heatmap picture beside it.

    All tiles are drawn on one axes (an image per extent, a caption above it) rather than 16 subplots: the
    figure is the same, and building it takes a fraction of the time.
    """
    ok = (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] in (1, 3)
          and all(0 <= e["index"] < images.shape[0] for e in errors))
    cols, rows = 4, max(1, math.ceil(len(errors) / 4))
    paired = ok and heatmaps is not None and len(heatmaps) == len(errors)
    # inches; captions alone need no room for a picture, two pictures side by side half the height of one
    cell_w, cell_h = 2.6, (1.75 if paired else 2.8 if ok else 0.9)
    head = 0.5
    fig = Figure(figsize=(cell_w * cols, cell_h * rows + head), dpi=100)
    ax = fig.add_axes((0.0, 0.0, 1.0, cell_h * rows / (cell_h * rows + head)))
    ch = cell_h / cell_w                                # a cell's height in units of its width (1)
    for n, err in enumerate(errors):
        c, r = n % cols, n // cols
        img = _as_display(images[err["index"]]) if ok else None
        top = r * ch + 0.04
        if img is not None:
            pictures = [img, heatmaps[n]] if paired else [img]
            side, bottom = 0.86 / len(pictures) - 0.02 * (len(pictures) - 1), (r + 1) * ch - 0.04
            top = bottom
            for j, pic in enumerate(pictures):
                h, w = pic.shape[:2]
                iw, ih = (side, side * h / w) if w >= h else (side * w / h, side)
                x = c + 0.5 + (j - (len(pictures) - 1) / 2) * 0.45      # centre of picture j in the cell
                top = min(top, bottom - ih)
                ax.imshow(pic, cmap="gray" if pic.ndim == 2 else None, interpolation="nearest",
                          extent=(x - iw / 2, x + iw / 2, bottom, bottom - ih))
        else:
            top = r * ch + 0.55 * ch
            ax.text(c + 0.5, top + 0.04, f"image #{err['index']}", ha="center", va="top", fontsize=9, color="0.4")
        ax.text(c + 0.5, top - 0.02, _caption(err), ha="center", va="bottom", fontsize=8)
    if not errors:
        ax.text(0.05, ch / 2, "no wrong predictions", va="center", fontsize=11)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows * ch, 0)
    ax.set_aspect("auto")
    ax.axis("off")
    what = " (right of each: Grad-CAM of the predicted class)" if paired else ""
    fig.suptitle(f"{title} most confident errors{what}".strip(), fontsize=11, y=1 - 0.15 / fig.get_figheight(), va="top")
    return fig
