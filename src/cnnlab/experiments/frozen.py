"""The frozen-feature recipe as one transform of the plan, Plan -> Plan: the only place that reads [train]
freeze_backbone and probe_epochs while a run is prepared.

freeze_backbone = true (the practice's exercise 3, part one):
  1. the backbone's pooled features of every image replace the images (computed once, cached on disk:
     transfer/features.py), and the head becomes what trains;
  2. [model] standardize_features: the head's Standardize layer gets the training split's feature mean/std;
  3. [search]: the head's hyper-parameters chosen on the validation split (transfer/search.py); the chosen
     values go into `plan.chosen`, never into the user's config. Or [search] C: the linear head solved as a
     logistic regression, C by cross-validation over every training image (transfer/logistic.py): `plan.solved`,
     nothing left to train.
probe_epochs = N with a trainable backbone: the head starts from a linear probe on the same cached features of the
training images (transfer/probe.py), then the whole network fine-tunes.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cnnlab.data import Dataset
from cnnlab.data.stream import RowFile
from cnnlab.experiments.plan import Plan, backbone_of, place_splits
from cnnlab.runtime.device import use_bf16
from cnnlab.transfer.features import feature_array, release_compiled, weights_fingerprint
from cnnlab.transfer.logistic import fit_logistic_head
from cnnlab.transfer.probe import probe_head
from cnnlab.transfer.search import search_head


def apply(plan: Plan, progress: str, resume: bool) -> Plan:
    """The plan with the recipe applied; the plan itself when neither key is set. progress: bar (bars and
    lines), line (lines only), none."""
    train, quiet = plan.cfg.train, progress != "bar"
    if train.freeze_backbone:
        return frozen_head(plan, progress, resume)
    if train.probe_epochs and not resume:     # a resumed run's checkpoint already holds the probed head
        feats = features(plan, quiet, test=False)
        probe = probe_head(plan.model.head, feats.x_train, feats.y_train, plan.tr_idx, plan.va_idx, train,
                           plan.cfg.seed, plan.device, quiet)
        return dataclasses.replace(plan, extra={**plan.extra, **probe})
    return plan


def frozen_head(plan: Plan, progress: str, resume: bool) -> Plan:
    """Features for images, the head for the model; standardization; the [search] grid (a resumed run reads what
    its first attempt chose from its checkpoint instead: see experiments/run.py)."""
    feats = features(plan, quiet=progress != "bar")
    head = plan.model.head
    plan = dataclasses.replace(plan, data=feats, trained=head,
                               extra={**plan.extra, "features_from_cache": feats.from_cache})
    plan.splits = place_splits(plan, quiet=progress == "none")
    if plan.cfg.search.C:                   # the head solved in closed form, on every training image
        return logistic_head(plan, head, quiet=progress == "none")
    if hasattr(head, "standardize"):        # the head's own layer (models/backbones.make_head)
        head.standardize.fit(plan.splits.train.x)
    if plan.cfg.search.grid() and not resume:
        chosen, record = search_head(plan.cfg, head, plan.splits.train, plan.splits.val, plan.device,
                                     quiet=progress == "none")
        plan = dataclasses.replace(plan, chosen=chosen, extra={**plan.extra, **record})
    return plan


def logistic_head(plan: Plan, head, quiet: bool) -> Plan:
    """[search] C: the linear head fitted as a cross-validated LogisticRegression (transfer/logistic.py) on the
    training and validation images together (cross-validation replaces the hold-out); no epochs are left to
    train. Deterministic (seeded folds, a convex problem), so a resumed run fits it again."""
    rows = torch.cat([plan.tr_idx, plan.va_idx]).sort().values      # record order: the folds depend on it
    x, y = plan.data.x_train[rows], plan.data.y_train[rows]
    if hasattr(head, "standardize"):
        head.standardize.fit(x.to(plan.device))
    s = plan.cfg.search
    record = fit_logistic_head(head, x, y, len(plan.data.classes), s.C, s.cv_folds, plan.cfg.seed, quiet)
    return dataclasses.replace(plan, solved=True, extra={**plan.extra, "logistic": record})


class FeatureSet(Dataset):
    """A Dataset of cached features, that knows whether they all came from the cache."""
    from_cache: bool = False


def features(plan: Plan, quiet: bool, test: bool = True) -> FeatureSet:
    """The frozen backbone's cached features of the plan's images (test split too unless `test` is False)."""
    backbone = backbone_of(plan, "[train] freeze_backbone = true (or probe_epochs)")
    ds, pre = plan.data, plan.preprocess
    bf16 = use_bf16(plan.cfg.train.precision, plan.device, backbone, (16, 3, pre.input_size, pre.input_size),
                    train=False)
    ident = {"backbone": plan.cfg.model.name, "weights": weights_fingerprint(backbone)}
    kw = {"quiet": quiet, "flip_average": plan.model.flip_average}
    f_tr, hit_tr = feature_array(backbone, ident, ds.x_train, ds.y_train, pre, plan.device, bf16, split="train",
                                 file=ds.files.get("x_train"), **kw)
    files = {"x_train": RowFile.of(f_tr)}          # memory-mapped: streamed when over the budget
    if test:
        f_te, hit_te = feature_array(backbone, ident, ds.x_test, ds.y_test, pre, plan.device, bf16, split="test",
                                     file=ds.files.get("x_test"), **kw)
        files["x_test"] = RowFile.of(f_te)
    else:
        f_te, hit_te = np.zeros((0, f_tr.shape[1]), dtype=np.float32), True
    release_compiled()
    out = FeatureSet(torch.from_numpy(f_tr), ds.y_train, torch.from_numpy(f_te), ds.y_test, ds.classes, ds.name, files,
                     ds.skipped)
    out.from_cache = hit_tr and hit_te
    return out
