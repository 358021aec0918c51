"""What the network looks at: Grad-CAM heatmaps (the grad-cam package, pytorch-grad-cam) of a trained run.

`cnnlab explain RUN IMAGE...`, `cnnlab.load(run).explain(images)` and the heatmaps of a run's errors.png all come
here. Per image: the top classes (the run's own scoring, test-time views included, so they equal `predict`'s) and
a Grad-CAM map of the top class over the picture the network saw (after the run's eval crop and resize).

The map is computed on the network itself (one view, fp32, eval mode: BatchNorm uses its running statistics),
at one layer with a spatial feature map. By default that is the last module whose output is still a
(N, C, H, W) map with H x W > 1 before pooling or flattening, found by running one image through the network
with hooks on every module: the last conv block of cnnlab's practice nets and layer lists, `layer4` of a
torchvision or timm ResNet, the last stage of other timm/torchvision CNNs. Grad-CAM's own recommendation, and
it needs no per-architecture table. `layer` (`--layer`) names another module of `named_modules()`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cnnlab.data.preprocess import Preprocess
from cnnlab.errors import CnnlabError

if TYPE_CHECKING:
    from cnnlab.inference.model import Model

CAM_BATCH = 32      # images per Grad-CAM pass: a backward pass keeps every activation, so fewer than scoring's


@dataclass
class Explanation:
    """One image explained: the top classes, the class the heatmap is of, and the heatmap over the image."""
    top: list[tuple[str, float]]      # (label, probability), best first
    target: str                       # the class the heatmap explains: the top-1 class
    heatmap: np.ndarray               # (H, W) float32 in [0, 1], aligned with `image`
    image: np.ndarray                 # (H, W, 3) uint8: what the network saw (the run's eval crop and resize)
    layer: str                        # the module the map was taken at

    def overlay(self) -> np.ndarray:
        """(H, W, 3) uint8: the image with the heatmap drawn over it (jet colours, half and half)."""
        return overlays(self.image[None], self.heatmap[None])[0]


# ---------------------------------------------------------------- which layer


def network_of(model: nn.Module) -> nn.Module:
    """The network inside a test-time-views wrapper: Grad-CAM explains one view, and names stay the network's."""
    from cnnlab.models.build import TestTimeAverage
    return model.net if isinstance(model, TestTimeAverage) else model


def spatial_layers(net: nn.Module, side: int) -> list[tuple[str, nn.Module, int]]:
    """(name, module, calls per forward) of every module whose output is a (N, C, H, W) map with H x W > 1,
    in the order their forward passes finish (a container after its children), found with one image."""
    finished, calls, shapes, clock = {}, Counter(), {}, count()
    modules = [(name, m) for name, m in net.named_modules() if name]

    def hook(name):
        def record(_m, _inp, out):
            calls[name] += 1
            finished[name] = next(clock)
            shapes[name] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules]
    was = net.training
    try:
        device = next(net.parameters()).device
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, 3, side, side, device=device))
    finally:
        for h in handles:
            h.remove()
        net.train(was)
    spatial = [(name, m, calls[name]) for name, m in modules
               if shapes.get(name) and len(shapes[name]) == 4 and shapes[name][2] * shapes[name][3] > 1]
    return sorted(spatial, key=lambda s: finished[s[0]])


def find_layer(net: nn.Module, preprocess: Preprocess, layer: str | None = None) -> tuple[str, nn.Module]:
    """(name, module) of the layer to map: `layer` if given (a dotted name from net.named_modules()), else the
    last spatial feature map (see the module doc). A bad name is one error listing the names that work."""
    candidates = spatial_layers(net, preprocess.input_size or preprocess.image_size)
    usable = [name for name, _, n in candidates if n == 1]
    hint = ", ".join(repr(n) for n in usable[::-1][:6]) or "none"
    if not usable:
        raise CnnlabError("the network has no layer with a spatial feature map (N, C, H, W) before its classifier, "
                          "so Grad-CAM has nothing to map (transformer tokens are not supported)")
    modules = dict(net.named_modules())
    if layer is None:
        # an nn.Identity (timm's norm_pre of a ConvNeXt) only renames the stage before it: name that stage
        name = ([n for n in usable if not isinstance(modules[n], nn.Identity)] or usable)[-1]
        return name, modules[name]
    if layer not in modules or not layer:
        raise CnnlabError(f"--layer {layer!r}: no such module in the network; layers with a feature map, "
                          f"last first: {hint}")
    if layer not in usable:
        why = ("runs more than once per image" if any(n == layer for n, _, c in candidates)
               else "gives no (N, C, H, W) feature map larger than 1x1")
        raise CnnlabError(f"--layer {layer!r}: {why}, so Grad-CAM cannot map it; try one of {hint}")
    return layer, modules[layer]


# ---------------------------------------------------------------- heatmaps


def grad_cam(net: nn.Module, preprocess: Preprocess, x_uint8: torch.Tensor, targets: list[int],
             layer: nn.Module) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] of class targets[i] for uint8 images x (N, 3, S, S), at input size."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.image import scale_cam_image
    was, grads = net.training, [p.requires_grad for p in net.parameters()]
    # Gradients reach the activations through the input, never the weights: nothing accumulates in .grad (no
    # memory, no DDP gradient hook of a training run fires) and a frozen backbone is mapped like any other.
    net.requires_grad_(False)
    out, cam = [], None
    try:
        cam = GradCAM(model=net, target_layers=[layer])      # puts the net in eval mode
        device = cam.device
        with torch.enable_grad():
            for i in range(0, len(x_uint8), CAM_BATCH):
                xb = x_uint8[i:i + CAM_BATCH].to(device)
                inputs = preprocess(xb).requires_grad_(True)
                maps = cam(inputs, [ClassifierOutputTarget(int(t)) for t in targets[i:i + CAM_BATCH]])
                if len(maps) == 2 * len(xb):          # a flip-averaged backbone saw each image and its mirror
                    maps = scale_cam_image((maps[:len(xb)] + maps[len(xb):, :, ::-1]) / 2)
                out.append(maps)
    finally:
        if cam is not None:
            cam.activations_and_grads.release()     # not `with`: its __exit__ would swallow an IndexError
        for p, g in zip(net.parameters(), grads):
            p.requires_grad_(g)
        net.train(was)
    return np.concatenate(out).astype(np.float32)


def seen_images(preprocess: Preprocess, x_uint8: torch.Tensor) -> np.ndarray:
    """(N, H, W, 3) uint8: the pictures the network saw (the eval crop resized to input size, not normalised)."""
    x = preprocess.to_input_size(x_uint8.cpu().float() / 255.0)
    return x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def overlays(images: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 images with their (N, H, W) heatmaps drawn over them."""
    from pytorch_grad_cam.utils.image import show_cam_on_image
    return np.stack([show_cam_on_image(im.astype(np.float32) / 255.0, m, use_rgb=True)
                     for im, m in zip(images, maps)]) if len(images) else np.zeros((0, 1, 1, 3), np.uint8)


def explain_arrays(model: "Model", arrays: list[np.ndarray], layer: str | None = None, topk: int = 3,
                   found: tuple[str, nn.Module] | None = None) -> list[Explanation]:
    """Decoded uint8 (3, S, S) arrays -> one Explanation each (the top classes from the run's own scoring)."""
    if not arrays:
        return []
    predictor = model._predictor
    probs = predictor.probabilities_of_arrays(arrays)
    top = predictor.top(probs, topk)
    net = network_of(model.model)
    name, module = found or find_layer(net, model.preprocess, layer)
    x = torch.from_numpy(np.stack(arrays))
    targets = probs.argmax(1).tolist()
    maps, seen = grad_cam(net, model.preprocess, x, targets, module), seen_images(model.preprocess, x)
    return [Explanation(t, model.classes[c], m, s, name) for t, c, m, s in zip(top, targets, maps, seen)]


def explain(model: "Model", images, layer: str | None = None, topk: int = 3) -> list[Explanation]:
    """Images of any kind `predict` takes (paths, PIL images, uint8 arrays, tensors) -> one Explanation each."""
    from cnnlab.inference.predict import _items, to_array
    size = model.preprocess.image_size
    return explain_arrays(model, [to_array(item, size) for item in _items(images)], layer, topk)


def error_overlays(model: nn.Module, preprocess: Preprocess, images, errors: list[dict],
                   classes: list[str]) -> tuple[list[np.ndarray] | None, str | None]:
    """Heatmaps of the predicted class over each error's image, for errors.png: (overlays, None), or
    (None, why not) where the run's images or network give none (the run's files are written either way)."""
    if not errors:
        return None, None
    try:
        x = torch.stack([torch.as_tensor(np.asarray(images[e["index"]])) for e in errors])
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            return None, "errors.png: no Grad-CAM heatmaps (the test split is not stored as RGB images)"
        net = network_of(model)
        params = list(net.parameters())
        if len({p.device for p in params}) > 1:     # a frozen run's head trained on the device, its backbone
            net.to(params[-1].device)               # maybe not (cached features): one device for the map
        _, module = find_layer(net, preprocess)
        maps = grad_cam(net, preprocess, x, [classes.index(e["pred"]) for e in errors], module)
    except (CnnlabError, RuntimeError, ValueError, TypeError, IndexError) as e:
        return None, f"errors.png: no Grad-CAM heatmaps ({str(e).splitlines()[0][:200]})"
    return list(overlays(seen_images(preprocess, x), maps)), None


# ---------------------------------------------------------------- files and figures


def plot_explanation(exp: Explanation, name: str):
    """The picture and its heatmap side by side, titled with the top classes."""
    from cnnlab.records.plots import subplots
    fig, (left, right) = subplots(1, 2, figsize=(6.4, 3.7))
    left.imshow(exp.image, interpolation="nearest")
    left.set_title("what the network saw", fontsize=9)
    right.imshow(exp.overlay(), interpolation="nearest")
    right.set_title(f"Grad-CAM of {exp.target!r} at {exp.layer}", fontsize=9)
    for ax in (left, right):
        ax.axis("off")
    fig.suptitle(f"{name}: " + ", ".join(f"{label} {p:.3f}" for label, p in exp.top), fontsize=10)
    fig.tight_layout()
    return fig


def _figure_paths(paths: list[Path], out: Path) -> list[Path]:
    """out/<stem>.png per image; a stem two images share becomes <folder>-<stem> (then -2, -3, ...), so no
    figure replaces another."""
    stems = Counter(p.stem for p in paths)
    seen: Counter = Counter()
    result = []
    for p in paths:
        name = p.stem if stems[p.stem] == 1 else f"{p.parent.name}-{p.stem}"     # cat/1.jpg, dog/1.jpg: cat-1, dog-1
        seen[name] += 1
        result.append(out / (f"{name}.png" if seen[name] == 1 else f"{name}-{seen[name]}.png"))
    return result


def explain_files(model: "Model", paths: list, out: Path, layer: str | None = None,
                  topk: int = 3) -> tuple[list[dict], list[tuple[Path, str]], str]:
    """Explain image files (folders searched as `predict` does) into out/: a figure per image, explain.csv
    (predict's columns) and explain.json. Returns (rows, failures (path, reason), "layer name (its type)")."""
    from cnnlab.inference.predict import _chunks, _decode_file, _check_topk, find_images, write_predictions
    from cnnlab.records.io import atomic_write, write_json
    _check_topk(topk, len(model.classes))
    found = find_layer(network_of(model.model), model.preprocess, layer)     # a bad --layer fails before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = find_images(paths)
    figures = dict(zip(map(str, files), _figure_paths(files, out)))
    rows, failures = [], []
    for chunk in _chunks(files, CAM_BATCH):
        decoded = [(p, _decode_file(p, model.preprocess.image_size)) for p in chunk]
        failures += [(p, a) for p, a in decoded if isinstance(a, str)]
        good = [(p, a) for p, a in decoded if not isinstance(a, str)]
        for (p, _), exp in zip(good, explain_arrays(model, [a for _, a in good], topk=topk, found=found)):
            fig = plot_explanation(exp, f"{p.parent.name}/{p.name}")
            with atomic_write(figures[str(p)], "wb") as f:
                fig.savefig(f, format="png")
            rows.append({"path": p, "top": exp.top, "target": exp.target, "figure": figures[str(p)]})
    write_predictions(rows, out / "explain.csv")
    write_json(out / "explain.json", {"layer": found[0], "images": [
        {"path": str(r["path"]), "figure": r["figure"].name, "explained": r["target"],
         "top": [{"label": label, "prob": p} for label, p in r["top"]]} for r in rows]})
    return rows, failures, f"{found[0]} ({type(found[1]).__name__})"
