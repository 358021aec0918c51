"""Training speed of the practice's CIFAR recipes, cnnlab vs the Keras reference, measured in one run.

  BaseNet recipe: SGD, batch 64, no augmentation (Keras: ../shared/reference/keras_basenet.py)
  augmented recipe: BN-before-ReLU deeper net, Adam, batch 32, featurewise normalization, zoom 0.2 + flip
                    (Keras: keras_practice.py row 'bnpre', ImageDataGenerator, 30 epochs)

Both sides time the whole fit (training + per-epoch validation) and report training images/s
(= 90% of the training images x epochs / seconds), exactly as the Keras scripts compute it. Each
measurement runs in a fresh process (the Keras script; cnnlab via `--child`), so every figure pays its
own warm-up, as Keras's does.

--under-load: one other CPU-bound process (`python3 -c "while True: pass"`) runs beside each
measurement, on both sides: started before it, killed after it. --fixed-threads: also measure cnnlab
with its thread count pinned (OMP_NUM_THREADS = torch's default, which turns cnnlab.runtime.threads off): the
figure before that module existed. --repeat N: the median of N measurements of each figure.
Each figure also reports the cores other processes (not this benchmark's) used meanwhile ('other').

Usage: python benchmarks/cifar_speed.py [--epochs 5] [--aug-train 3000] [--under-load] [--fixed-threads]
                                        [--repeat 3] [--only basenet,bnpre] [--no-keras]
Needs the Keras reference venv (see ../shared/reference/README.md); KERAS_PYTHON points at its python.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import OtherLoad, busy_process, random_npz, run_keras, timed, wait_for_quiet

RECIPES = {
    "basenet": ("BaseNet, SGD, batch 64", "basenet", {"train": {"optimizer": "sgd", "batch_size": 64}}),
    "bnpre": ("BN-before-ReLU + zoom/flip, Adam, batch 32", "deepnet_bn_pre",
              {"train": {"optimizer": "adam", "batch_size": 32, "normalize": "featurewise"},
               "augment": {"zoom": 0.2, "hflip": True}}),
}


def cnnlab_fit(npz: Path, recipe: str, epochs: int, device: str = "cpu") -> dict:
    """Train images/s of cnnlab on the npz data with the recipe's config tables (whole fit timed)."""
    import numpy as np
    import torch

    from cnnlab.training import engine
    from cnnlab.runtime import threads
    from cnnlab.data.augment import Augmenter
    from cnnlab.config import from_dict
    from cnnlab.data import Dataset
    from cnnlab.experiments.prepare import prepare_splits
    from cnnlab.models import create_model

    _, model, raw = RECIPES[recipe]
    d = np.load(npz)
    ds = Dataset(torch.from_numpy(d["x_train"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(d["y_train"]).long(),
                 torch.from_numpy(d["x_test"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(d["y_test"]).long(),
                 [str(i) for i in range(25)], "bench")
    raw = {**raw, "train": {**raw["train"], "epochs": epochs}, "data": {"source": "synthetic", "val_split": "last"}}
    cfg = from_dict(raw)
    dev = torch.device(device)
    sp, pre = prepare_splits(ds, cfg.data, cfg.train.normalize, 0, dev)
    torch.manual_seed(0)
    tr = engine.Trainer(create_model(model, 25), cfg.train, dev, 0, pre, Augmenter(cfg.augment))
    # cnnlab's engine calls threads.configure at the start of fit, threads.on_step after each step and
    # threads.on_epoch_end after each epoch; whichever of these this engine does not call yet is called
    # here, from a callback, at the same place.
    src = _source(engine.fit) + _source(engine.Trainer.train_epoch)
    missing = [h for h in ("configure", "on_step", "on_epoch_end") if f"threads.{h}(" not in src]
    callbacks = [_thread_hooks(missing)] if missing else []
    # Timed like Keras's model.fit: every epoch (the first one's warm-up included) and its validation.
    _, dt = timed(lambda: engine.fit(tr, sp.train, sp.val, callbacks))
    return {"img_s": len(sp.train) * epochs / dt, "threads": threads.summary(), "hooks_from_callback": missing,
            "final_loss": tr.history[-1]["loss"]}


def _source(fn) -> str:
    import inspect
    return inspect.getsource(fn)


def _thread_hooks(missing: list[str]):
    """The threads calls the engine does not make itself, made by a callback at the same places."""
    from cnnlab.runtime import threads
    from cnnlab.training.callbacks import Callback

    class ThreadHooks(Callback):
        if "configure" in missing:
            def on_fit_start(self, trainer):
                threads.configure(trainer.model, trainer.device)
        if "on_step" in missing:
            def on_batch_end(self, trainer, n, loss):
                threads.on_step()
        if "on_epoch_end" in missing:
            def on_epoch_end(self, trainer, logs):
                threads.on_epoch_end(trainer.model, logs["seconds"])
    return ThreadHooks()


def measure(fn, load: bool, wait: bool) -> tuple[float, float, str]:
    """(result, cores used by other processes meanwhile, note) of fn() run with or without the busy process."""
    note = wait_for_quiet() if wait else ""
    with OtherLoad() as other, busy_process(load):
        r = fn()
    return r, other.cores, note


def child(npz: Path, recipe: str, epochs: int, fixed: bool, device: str) -> tuple[float, str]:
    """cnnlab's images/s in a fresh process, and its thread counts ('2' or e.g. '2>1>2' when they changed)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    if fixed:
        import torch
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    out = subprocess.run([sys.executable, __file__, "--child", recipe, "--npz", str(npz), "--epochs", str(epochs), "--device", device],
                         env=env, capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    counts = [str(c["threads"]) for c in r["threads"]["changes"]] or [str(r["threads"]["threads"])]
    return r["img_s"], "threads " + ">".join(c for i, c in enumerate(counts) if i == 0 or c != counts[i - 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5, help="BaseNet epochs timed on each side")
    ap.add_argument("--aug-train", type=int, default=3000, help="training images for the augmented recipe (30 epochs)")
    ap.add_argument("--under-load", action="store_true", help="one other CPU-bound process beside every measurement")
    ap.add_argument("--fixed-threads", action="store_true", help="also measure cnnlab with its thread count pinned")
    ap.add_argument("--repeat", type=int, default=1, help="median of this many measurements per figure")
    ap.add_argument("--only", default="basenet,bnpre")
    ap.add_argument("--no-keras", action="store_true")
    ap.add_argument("--wait-quiet", action="store_true", help="before each measurement wait (<= 5 min) for other heavy processes to end")
    ap.add_argument("--device", default="cpu", help="cnnlab's device (cuda on a GPU machine; Keras stays on the CPU)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--npz", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(cnnlab_fit(Path(a.npz), a.child, a.epochs, a.device)))
        return
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{'one busy process beside each measurement' if a.under_load else 'no added load'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in a.only.split(","):
            if recipe == "basenet":
                npz = random_npz(Path(tmp) / "basenet.npz", 12500, 2500, 25)
                keras = lambda: (run_keras("keras_basenet.py", "--epochs", str(a.epochs))[0]["train_img_per_s"], "")  # noqa: E731
                epochs = a.epochs
            else:
                npz = random_npz(Path(tmp) / "aug.npz", a.aug_train, 500, 25)

                def keras():
                    kr = run_keras("keras_practice.py", str(npz), "bnpre")[0]
                    return 0.9 * a.aug_train * kr["epochs_run"] / kr["seconds"], ""
                epochs = 30
            sides = ([] if a.no_keras else [("keras", keras)]) + [("cnnlab", lambda: child(npz, recipe, epochs, False, a.device))]
            if a.fixed_threads:
                sides.append(("cnnlab fixed threads", lambda: child(npz, recipe, epochs, True, a.device)))
            fig = {}
            for side, fn in sides:
                runs = [measure(fn, a.under_load, a.wait_quiet) for _ in range(a.repeat)]
                fig[side] = statistics.median(r for (r, _), _, _ in runs)
                detail = ", ".join(f"{r:.0f} (other {o:.2f}{'; ' + t if t else ''})" + (f" [{n}]" if n else "")
                                   for (r, t), o, n in runs)
                print(f"  {recipe:<8} {side:<22} {fig[side]:>7.0f} img/s   runs: {detail}", flush=True)
            rows.append((RECIPES[recipe][0], fig))
    cols = list(rows[0][1])
    print(f"\n{'recipe':<46}" + "".join(f"{c + ' img/s':>27}" for c in cols) + ("" if a.no_keras else "  ratio to Keras"))
    for name, fig in rows:
        ratios = "" if a.no_keras else "  ".join(f"{fig[c] / fig['keras']:.2f}x" for c in cols if c != "keras")
        print(f"{name:<46}" + "".join(f"{fig[c]:>27.0f}" for c in cols) + f"  {ratios}")
    print(json.dumps({"under_load": a.under_load, **{name: {c: round(v, 1) for c, v in fig.items()} for name, fig in rows}}))


if __name__ == "__main__":
    main()
