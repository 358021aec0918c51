"""Scoring predictions: the expected numbers are worked out by hand from hand-written confusion matrices and
logits, never by calling the code under test a second time."""
from __future__ import annotations

import csv
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.records.evaluation import (Evaluation, cluster_order, confusion_matrix, evaluate_logits, most_confused_pairs,
                               per_class_metrics, plot_errors, write_evaluation)

# Rows = true class, columns = predicted class.
#            cat dog bird        support
CM3 = [[5, 2, 1],              # cat   8
       [1, 6, 0],              # dog   7
       [2, 0, 3]]              # bird  5
#  predicted: 8  8   4   total 20, correct 14
CLASSES3 = ["cat", "dog", "bird"]


def logits_for(cm, margin: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample per count in `cm`, each predicted as its column (one-hot logits scaled by `margin`)."""
    ys, ps = [], []
    for t, row in enumerate(cm):
        for p, count in enumerate(row):
            ys += [t] * count
            ps += [p] * count
    logits = torch.zeros(len(ys), len(cm))
    logits[torch.arange(len(ys)), torch.tensor(ps)] = margin
    return logits, torch.tensor(ys)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- per-class metrics

def test_per_class_metrics_by_hand():
    pc = {d["class"]: d for d in per_class_metrics(np.array(CM3), CLASSES3)}
    # cat: P = 5/8, R = 5/8, F1 = 0.625; its worst confusion is dog, 2 of its 8 images
    assert pc["cat"]["support"] == 8
    assert pc["cat"]["precision"] == pytest.approx(0.625)
    assert pc["cat"]["recall"] == pytest.approx(0.625)
    assert pc["cat"]["f1"] == pytest.approx(0.625)
    assert (pc["cat"]["most_confused_with"], pc["cat"]["most_confused_rate"]) == ("dog", pytest.approx(0.25))
    # dog: P = 6/8, R = 6/7, F1 = 2*(3/4)(6/7) / (3/4 + 6/7) = (36/28)/(45/28) = 0.8
    assert pc["dog"]["precision"] == pytest.approx(0.75)
    assert pc["dog"]["recall"] == pytest.approx(6 / 7)
    assert pc["dog"]["f1"] == pytest.approx(0.8)
    assert (pc["dog"]["most_confused_with"], pc["dog"]["most_confused_rate"]) == ("cat", pytest.approx(1 / 7))
    # bird: P = 3/4, R = 3/5, F1 = 0.9/1.35 = 2/3
    assert pc["bird"]["precision"] == pytest.approx(0.75)
    assert pc["bird"]["recall"] == pytest.approx(0.6)
    assert pc["bird"]["f1"] == pytest.approx(2 / 3)
    assert (pc["bird"]["most_confused_with"], pc["bird"]["most_confused_rate"]) == ("cat", pytest.approx(0.4))


def test_evaluate_logits_matches_the_hand_computed_matrix():
    logits, y = logits_for(CM3)
    ev = evaluate_logits(logits, y, CLASSES3)
    assert isinstance(ev, Evaluation)
    assert ev.n == 20
    assert ev.confusion.dtype == np.int64
    np.testing.assert_array_equal(ev.confusion, np.array(CM3))
    assert ev.top1 == pytest.approx(14 / 20)
    assert ev.top5 is None                                   # 3 classes: top-5 is meaningless
    assert ev.macro_f1 == pytest.approx((0.625 + 0.8 + 2 / 3) / 3)   # 0.697222...
    assert [d["f1"] for d in ev.per_class] == pytest.approx([0.625, 0.8, 2 / 3])
    assert ev.summary() == {"test_macro_f1": pytest.approx(0.6972222)}
    assert ev.summary("val") == {"val_macro_f1": pytest.approx(0.6972222)}


def test_confusion_matrix_from_labels():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)


def test_a_class_never_predicted_scores_zero():
    #        a  b  c  d     support
    cm = [[3, 1, 0, 0],   # a 4
          [1, 2, 0, 1],   # b 4
          [2, 0, 0, 0],   # c 2   (c is never predicted)
          [0, 0, 0, 4]]   # d 4
    # predicted: 6 3 0 5
    logits, y = logits_for(cm)
    ev = evaluate_logits(logits, y, list("abcd"))
    pc = {d["class"]: d for d in ev.per_class}
    assert pc["c"]["precision"] == 0.0 and pc["c"]["recall"] == 0.0 and pc["c"]["f1"] == 0.0
    assert (pc["c"]["most_confused_with"], pc["c"]["most_confused_rate"]) == ("a", pytest.approx(1.0))
    # a: P 3/6, R 3/4 -> F1 0.6; b: P 2/3, R 1/2 -> F1 4/7; d: P 4/5, R 1 -> F1 8/9, never wrong
    assert pc["a"]["f1"] == pytest.approx(0.6)
    assert pc["b"]["f1"] == pytest.approx(4 / 7)
    assert pc["d"]["f1"] == pytest.approx(8 / 9)
    assert (pc["d"]["most_confused_with"], pc["d"]["most_confused_rate"]) == ("", 0.0)
    assert ev.macro_f1 == pytest.approx((0.6 + 4 / 7 + 0 + 8 / 9) / 4)   # 0.515079...
    assert ev.top1 == pytest.approx(9 / 14)


def test_macro_f1_skips_a_class_absent_from_labels_and_predictions():
    # class z has no images and is never predicted: sklearn's default labels leave it out of the mean
    cm = [[2, 0, 0],      # a: P 2/3, R 1   -> F1 0.8
          [1, 1, 0],      # b: P 1,   R 1/2 -> F1 2/3
          [0, 0, 0]]
    ev = evaluate_logits(*logits_for(cm), ["a", "b", "z"])
    assert ev.macro_f1 == pytest.approx((0.8 + 2 / 3) / 2)


def test_top5_and_loss_by_hand():
    logits = torch.tensor([[7., 6, 5, 4, 3, 2, 1],     # y=4: 5th largest -> top-5 yes, top-1 no
                           [7., 6, 5, 4, 3, 2, 1],     # y=5: 6th largest -> top-5 no
                           [0., 0, 0, 0, 0, 0, 9],     # y=6: top-1 yes
                           [1., 2, 3, 4, 5, 6, 7]])    # y=2: 5th largest (6,5,4,3,2) -> top-5 yes
    y = torch.tensor([4, 5, 6, 2])
    ev = evaluate_logits(logits, y, [f"c{i}" for i in range(7)])
    assert ev.top1 == pytest.approx(0.25)
    assert ev.top5 == pytest.approx(0.75)
    assert ev.summary() == {"test_top5": pytest.approx(0.75), "test_macro_f1": pytest.approx(ev.macro_f1)}
    # cross-entropy: row 0 is -log(e^3 / sum_{k=1..7} e^k), etc.
    z = sum(math.exp(k) for k in range(1, 8))
    expected = [-(3 - math.log(z)), -(2 - math.log(z)), -(9 - math.log(6 + math.exp(9))), -(3 - math.log(z))]
    assert ev.loss == pytest.approx(sum(expected) / 4, rel=1e-5)


def test_loss_two_classes_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])   # p(y=0) = 1/2 and 3/4
    ev = evaluate_logits(logits, torch.tensor([0, 0]), ["a", "b"])
    assert ev.loss == pytest.approx((math.log(2) - math.log(0.75)) / 2, rel=1e-6)
    assert ev.top1 == 1.0 and ev.errors == []
    assert ev.per_class[0]["most_confused_with"] == ""


def test_errors_are_wrong_only_and_sorted_by_confidence():
    probs = torch.tensor([[0.10, 0.80, 0.10],    # y=0 -> wrong, pred 1 at 0.8
                          [0.95, 0.03, 0.02],    # y=0 -> right, and the most confident: must not appear
                          [0.20, 0.20, 0.60],    # y=1 -> wrong, pred 2 at 0.6
                          [0.05, 0.05, 0.90],    # y=0 -> wrong, pred 2 at 0.9
                          [0.30, 0.50, 0.20]])   # y=1 -> right
    y = torch.tensor([0, 0, 1, 0, 1])
    ev = evaluate_logits(probs.log(), y, ["a", "b", "c"])
    assert [e["index"] for e in ev.errors] == [3, 0, 2]
    assert [(e["true"], e["pred"]) for e in ev.errors] == [("a", "c"), ("a", "b"), ("b", "c")]
    assert [e["prob"] for e in ev.errors] == pytest.approx([0.9, 0.8, 0.6], abs=1e-6)
    assert [e["index"] for e in evaluate_logits(probs.log(), y, ["a", "b", "c"], n_errors=2).errors] == [3, 0]


def test_errors_capped_at_16():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 4, generator=g)
    y = (logits.argmax(1) + 1) % 4                      # every prediction wrong
    ev = evaluate_logits(logits, y, list("abcd"))
    assert len(ev.errors) == 16
    probs = [e["prob"] for e in ev.errors]
    assert probs == sorted(probs, reverse=True)
    assert probs[-1] >= float(logits.softmax(1).max(1).values.sort(descending=True).values[15]) - 1e-6


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="outside"):
        evaluate_logits(torch.zeros(2, 3), torch.tensor([0, 3]), list("abc"))
    with pytest.raises(ValueError, match="class names"):
        evaluate_logits(torch.zeros(2, 3), torch.tensor([0, 1]), list("ab"))
    with pytest.raises(ValueError, match="empty"):
        evaluate_logits(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), list("abc"))


def test_most_confused_pairs_order():
    pairs = most_confused_pairs(np.array(CM3), CLASSES3)
    # off-diagonal cells: bird->cat 2 (2/5), cat->dog 2 (2/8), dog->cat 1 (1/7), cat->bird 1 (1/8)
    assert [(p["true"], p["pred"], p["count"]) for p in pairs] == [
        ("bird", "cat", 2), ("cat", "dog", 2), ("dog", "cat", 1), ("cat", "bird", 1)]
    assert [p["rate"] for p in pairs] == pytest.approx([0.4, 0.25, 1 / 7, 0.125])
    assert len(most_confused_pairs(np.array(CM3), CLASSES3, n=2)) == 2
    assert most_confused_pairs(np.eye(3, dtype=np.int64) * 5, CLASSES3) == []


def test_cluster_order_puts_confused_pairs_side_by_side():
    # 40 classes in 20 pairs that are confused with each other, the pairs scattered over the class indices
    k = 40
    perm = np.random.default_rng(0).permutation(k)
    cm = np.eye(k, dtype=np.int64) * 50
    for a, b in perm.reshape(-1, 2):
        cm[a, b] = cm[b, a] = 20
    order = list(cluster_order(cm))
    assert sorted(order) == list(range(k))
    pos = {c: i for i, c in enumerate(order)}
    assert all(abs(pos[a] - pos[b]) == 1 for a, b in perm.reshape(-1, 2))


# ---------------------------------------------------------------- writing the folder

def synthetic(k: int, n: int = 600, seed: int = 0):
    """Logits for a k-class split where every class is right on 2/3 of its images and predicted as the next
    class on the other 1/3 (with noise, so confidences differ)."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n)
    y = i % k
    logits = 0.5 * torch.randn(n, k, generator=g)
    logits[i, y] += 3.0
    swap = (i // k) % 3 == 0
    logits[i[swap], (y[swap] + 1) % k] += 4.0
    return logits, y


def assert_png(path, min_bytes=5_000, min_h=300):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > min_bytes
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert w >= 400 and h >= min_h
        assert len(set(im.convert("L").get_flattened_data())) > 10            # not a blank canvas


@pytest.mark.parametrize("k", [3, 10, 25, 120])
def test_write_evaluation(tmp_path, k):
    logits, y = synthetic(k, n=max(600, 6 * k))
    classes = [f"class_{i:03d}" for i in range(k)]
    ev = evaluate_logits(logits, y, classes)
    images = torch.randint(0, 256, (len(y), 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    paths = write_evaluation(tmp_path / "eval", ev, images, title=f"k={k}")
    names = {p.name for p in paths}
    assert names == {"per_class.csv", "confused_pairs.csv", "confusion.png", "errors.png"}
    assert all(p.is_file() for p in paths)

    rows = read_csv(tmp_path / "eval" / "per_class.csv")
    assert list(rows[0]) == ["class", "support", "precision", "recall", "f1", "most_confused_with",
                             "most_confused_rate"]
    assert [r["class"] for r in rows] == classes
    assert sum(int(r["support"]) for r in rows) == len(y)
    for r, d in zip(rows, ev.per_class):
        assert r["f1"] == f"{d['f1']:.4f}" and r["most_confused_rate"] == f"{d['most_confused_rate']:.4f}"
        assert len(r["precision"].split(".")[1]) == 4
    # class 0's images get an extra push toward class 1, so that is its most common mistake
    assert rows[0]["most_confused_with"] == "class_001"

    pairs = read_csv(tmp_path / "eval" / "confused_pairs.csv")
    assert list(pairs[0]) == ["true", "pred", "count", "rate"]
    assert 1 <= len(pairs) <= 10
    counts = [int(p["count"]) for p in pairs]
    assert counts == sorted(counts, reverse=True)
    top = pairs[0]
    i, j = classes.index(top["true"]), classes.index(top["pred"])
    assert int(top["count"]) == ev.confusion[i, j] == ev.confusion[~np.eye(k, dtype=bool)].max()

    assert_png(tmp_path / "eval" / "confusion.png")
    assert_png(tmp_path / "eval" / "errors.png")


def test_errors_png_without_images(tmp_path):
    ev = evaluate_logits(*synthetic(5, n=100), list("abcde"))
    paths = write_evaluation(tmp_path / "e", ev, None)           # no images: captions only
    assert len(paths) == 4
    assert_png(tmp_path / "e" / "errors.png")
    # not image data (2-D features, or indices beyond the tensor) is drawn the same way, not indexed blindly
    for images in (torch.zeros(100, 16), torch.zeros(3, 3, 8, 8, dtype=torch.uint8)):
        fig = plot_errors(ev.errors, images)
        assert sum(len(ax.images) for ax in fig.axes) == 0
        plt.close(fig)
    fig = plot_errors(ev.errors, torch.zeros(100, 1, 8, 8))      # 1-channel floats are images
    assert sum(len(ax.images) for ax in fig.axes) == len(ev.errors) == 16
    plt.close(fig)


def test_write_evaluation_with_no_errors(tmp_path):
    logits, y = logits_for([[4, 0], [0, 3]])
    ev = evaluate_logits(logits, y, ["a", "b"])
    write_evaluation(tmp_path, ev, None)
    assert read_csv(tmp_path / "confused_pairs.csv") == []
    assert_png(tmp_path / "errors.png", min_bytes=2_000, min_h=100)
