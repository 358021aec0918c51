"""Reading training curves: hand-written histories whose answer is known by looking at them."""
from __future__ import annotations

import pytest
from PIL import Image

from cnnlab.records.analysis import _band, curve_summary, describe, overfitting_onset, plot_compare


def hist(train_loss, val_loss=None, acc=None, val_acc=None):
    """A history in the run-folder format from parallel lists (val_* left out when not given)."""
    out = []
    for i, tl in enumerate(train_loss):
        h = {"epoch": i + 1, "loss": tl, "accuracy": acc[i] if acc else 0.5, "lr": 1e-3, "seconds": 1.0}
        if val_loss is not None:
            h["val_loss"] = val_loss[i]
            h["val_accuracy"] = val_acc[i] if val_acc else 0.5
        out.append(h)
    return out


FALLING = [1.2, 0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1]


def test_clear_overfitting_returns_the_epoch_of_the_minimum():
    h = hist(FALLING, [1.0, 0.8, 0.65, 0.6, 0.62, 0.7, 0.8, 0.9])
    assert overfitting_onset(h) == 4


def test_sharp_turn_is_found():
    h = hist(FALLING[:7], [1.0, 0.8, 0.6, 0.5, 0.6, 0.7, 0.8])
    assert overfitting_onset(h) == 4


def test_steadily_improving_is_not_overfitting():
    assert overfitting_onset(hist(FALLING, [1.0, 0.9, 0.8, 0.72, 0.66, 0.61, 0.58, 0.56])) is None


def test_noisy_but_flat_is_not_overfitting():
    # validation loss levels off at about 1.0 with +-0.03 noise; its lowest epoch (0.97) is luck, and compared
    # with that single epoch the later ones look 4% worse. Against the median around the minimum they do not.
    val = [1.3, 1.1, 1.0, 0.97, 1.03, 0.99, 1.02, 1.0, 1.03, 1.01]
    train = [1.5, 1.2, 1.0, 0.9, 0.85, 0.8, 0.76, 0.73, 0.7, 0.68]
    assert overfitting_onset(hist(train, val)) is None


def test_rising_training_loss_is_divergence_not_overfitting():
    val = [1.0, 0.8, 0.7, 0.9, 1.2, 1.6]
    assert overfitting_onset(hist([1.0, 0.8, 0.7, 0.9, 1.3, 2.0], val)) is None
    # the same validation curve with falling training loss is overfitting from epoch 3
    assert overfitting_onset(hist([1.0, 0.8, 0.7, 0.6, 0.5, 0.4], val)) == 3


def test_nan_loss_is_not_overfitting():
    assert overfitting_onset(hist([1.0, 0.8, 0.7, 0.6, float("nan")], [1.0, 0.8, 0.7, 0.9, 1.2])) is None


def test_no_validation_is_none():
    assert overfitting_onset(hist(FALLING)) is None
    assert overfitting_onset([]) is None


def test_min_rise_epochs_and_tolerance():
    val = [1.0, 0.8, 0.7, 0.68, 0.66, 0.9]               # only one epoch after the minimum
    assert overfitting_onset(hist(FALLING[:6], val)) is None
    assert overfitting_onset(hist(FALLING[:6], val), min_rise_epochs=1) == 5
    small = [1.0, 0.8, 0.7, 0.6, 0.605, 0.61, 0.615, 0.62]   # rises 1-3%: within the default 2% on average
    assert overfitting_onset(hist(FALLING, small)) is None
    assert overfitting_onset(hist(FALLING, small), tolerance=0.005) == 4


def test_a_bump_that_comes_back_down_is_not_overfitting():
    val = [1.0, 0.8, 0.7, 0.6, 0.7, 0.75, 0.65, 0.6, 0.61]
    assert overfitting_onset(hist(FALLING + [0.05], val)) is None


def test_curve_summary_and_describe():
    h = hist(FALLING, [1.0, 0.8, 0.65, 0.6, 0.62, 0.7, 0.8, 0.9],
             acc=[0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98],
             val_acc=[0.45, 0.52, 0.58, 0.61, 0.61, 0.6, 0.59, 0.58])
    s = curve_summary(h)
    assert s["best_val_epoch"] == 4                        # the first epoch with 0.61
    assert s["best_val_accuracy"] == pytest.approx(0.61)
    assert s["final_gap"] == pytest.approx(0.98 - 0.58)
    assert s["overfit_onset"] == 4
    assert describe(s) == ("best validation accuracy 0.61 at epoch 4; final train−validation gap +0.40; "
                           "validation loss rises from epoch 4 while training loss falls (overfitting)")
    fine = curve_summary(hist(FALLING[:3], [1.0, 0.9, 0.8], acc=[0.5, 0.6, 0.7], val_acc=[0.5, 0.55, 0.62]))
    assert describe(fine) == ("best validation accuracy 0.62 at epoch 3; final train−validation gap +0.08; "
                              "no overfitting seen")


def test_curve_summary_without_validation():
    s = curve_summary(hist(FALLING, acc=[0.1 * i for i in range(1, 9)]))
    assert s["best_val_epoch"] is None and s["best_val_accuracy"] is None and s["final_gap"] is None
    assert s["overfit_onset"] is None
    assert "no validation" in describe(s) and "0.80" in describe(s)
    assert describe(curve_summary([])) == "no epochs recorded"


def test_band_averages_over_the_seeds_that_reached_each_epoch():
    seeds = [hist([1.0] * 5, [1.0, 0.9, 0.8, 0.7, 0.6]),
             hist([1.0] * 3, [0.8, 0.7, 0.6]),             # stopped early after 3 epochs
             hist([1.0] * 4, [0.9, 0.8, 0.7, 0.65])]
    epochs, mean, lo, hi = _band(seeds, "val_loss")
    assert epochs == [1, 2, 3, 4, 5]
    assert mean == pytest.approx([0.9, 0.8, 0.7, 0.675, 0.6])
    assert lo == pytest.approx([0.8, 0.7, 0.6, 0.65, 0.6])
    assert hi == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6])


def png_ok(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with Image.open(path) as im:
        assert im.size[0] >= 800 and len(set(im.convert("L").get_flattened_data())) > 10


def test_plot_compare_one_and_three_seeds(tmp_path):
    one = [hist(FALLING, [1.0, 0.8, 0.65, 0.6, 0.62, 0.7, 0.8, 0.9],
                val_acc=[0.4, 0.5, 0.55, 0.6, 0.6, 0.59, 0.58, 0.57])]
    three = [hist(FALLING[:n], [1.1 - 0.06 * i - 0.01 * s for i in range(n)],
                  val_acc=[0.4 + 0.03 * i + 0.01 * s for i in range(n)]) for s, n in enumerate((8, 6, 4))]
    out = plot_compare(one, three, "adam", "sgd", tmp_path / "cmp" / "compare.png", title="adam vs sgd")
    assert out == tmp_path / "cmp" / "compare.png"
    png_ok(out)
    # rows without validation still give a figure (panels say so)
    out2 = plot_compare([hist(FALLING)], [hist(FALLING)], "a", "b", tmp_path / "noval.png")
    png_ok(out2)
