"""One input path (models/forward.py): the same uint8 images give the same logits through every door, and
`cnnlab evaluate` on a run's own test split says exactly what the run's results.json says."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import cnnlab
from cnnlab.config import from_dict
from cnnlab.data import load_dataset
from cnnlab.data.stream import Batches
from cnnlab.experiments.run import run_experiment
from cnnlab.inference.evaluate import model_logits
from cnnlab.training.callbacks import Callback

CFG = {"name": "onepath", "data": {"source": "synthetic", "classes": 5, "synthetic_train": 300, "synthetic_test": 130},
       "model": {"name": "basenet"},
       "train": {"optimizer": "adam", "epochs": 1, "batch_size": 32, "eval_batch_size": 96, "normalize": "featurewise",
                 "precision": "fp32"},          # the exported file is fp32: every door on the same arithmetic
       "augment": {"test_flip": True}}


class KeepTrainer(Callback):
    def on_fit_end(self, trainer):
        self.trainer = trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = from_dict(CFG)
    keep = KeepTrainer()
    out = run_experiment(cfg, tmp_path_factory.mktemp("runs"), progress="none", callbacks=[keep])
    return cfg, out, keep.trainer


def test_evaluate_on_the_runs_own_test_split_equals_its_results_exactly(trained):
    _, out, _ = trained
    ev, folder = cnnlab.load(out.path).evaluate()
    assert ev.top1 == out.results.test_accuracy                # equality, not closeness
    assert ev.loss == out.results.test_loss
    recorded = json.loads((folder / "evaluation.json").read_text())
    assert recorded["accuracy"] == json.loads((out.path / "results.json").read_text())["test_accuracy"]
    assert recorded["weights"] == "last"                         # the file scored, not "auto"


def test_the_same_images_give_the_same_logits_through_every_door(trained, tmp_path):
    cfg, out, trainer = trained
    ds = load_dataset(cfg.data, quiet=True)
    x, y = ds.x_test, ds.y_test
    # 1. the training loop's own evaluation (test-time views included, as the run scored)
    reference = trainer.predict_logits(Batches(x, y), tta=True)
    # 2. `cnnlab evaluate`'s path
    model = cnnlab.load(out.path)
    assert torch.equal(model_logits(model, x), reference)
    # 3. cnnlab.load(...).predict / .probabilities, from HWC uint8 arrays (decoded as image files are)
    arrays = [img.permute(1, 2, 0).numpy() for img in x]
    assert torch.equal(model.probabilities(arrays), reference.softmax(1))
    # 4. the CLI's predict, from PNG files (lossless): the same probabilities
    from PIL import Image

    from cnnlab.inference.predict import predict_files
    n = min(cfg.train.eval_batch_size, len(arrays))   # one evaluation batch, as the loop batched it: a smaller batch may
    for i in range(n):                   # round differently in the convolution's kernels (1 ulp, not a second path)
        Image.fromarray(arrays[i]).save(tmp_path / f"{i:03d}.png")
    rows, failures = predict_files(model._predictor, [tmp_path], topk=1)
    assert not failures and len(rows) == n
    best = reference.softmax(1)[:n].max(1)
    assert [r["top"][0][1] for r in rows] == best.values.tolist()
    # 5. the exported file (TorchScript): the same numbers up to float rounding of the traced graph
    path, diff = cnnlab.export_run(out.path, "torchscript")
    probs = torch.jit.load(str(path))(x[:16])
    torch.testing.assert_close(probs, reference.softmax(1)[:16], atol=1e-6, rtol=1e-5)


def test_feature_extraction_runs_the_same_preprocess():
    from cnnlab.data.preprocess import Preprocess
    from cnnlab.transfer.features import extract
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    pre = Preprocess(20, 16, eval_crop=0.8, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    x = torch.randint(0, 256, (10, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = extract(backbone, x, pre, torch.device("cpu"), False, batch_size=4, quiet=True, compile=False)
    with torch.no_grad():
        expected = torch.cat([backbone(pre(x[i:i + 4])) for i in range(0, 10, 4)])
    assert torch.equal(feats, expected)


def test_a_run_records_how_it_scored_and_evaluate_reuses_it(trained):
    _, out, trainer = trained
    results = json.loads((out.path / "results.json").read_text())
    assert results["scoring"] == {"eval_batch": 96, "train_batch": 32, "channels_last": True, "bf16": trainer.bf16}
    assert cnnlab.load(out.path).scoring.to_dict() == results["scoring"]


def test_bf16_at_evaluation_would_have_changed_the_answer_so_it_is_not_chosen_afresh(trained, monkeypatch):
    """The cause of one image in 500 scored differently: `cnnlab evaluate` timed 'auto' precision for itself (an
    eval-mode measurement) while the run had settled on fp32 (a training-step measurement). Now it never asks."""
    import cnnlab.runtime.device as device
    _, out, _ = trained
    monkeypatch.setattr(device, "use_bf16", lambda *a, **k: pytest.fail("evaluation chose its own precision"))
    monkeypatch.setattr(device, "measured_bf16_faster", lambda *a, **k: pytest.fail("evaluation timed precision"))
    ev, _ = cnnlab.load(out.path).evaluate()
    assert ev.top1 == out.results.test_accuracy
    assert np.isfinite(ev.loss)
