"""[model] layers: a network written as the practice writes it, one Keras layer call per string.

    [model]
    name = "mynet"                 # a label only: the layer list is the model
    layers = ["Conv2D(6, 5, activation='relu')", "MaxPooling2D(2)", "Flatten()", "Dense(50, activation='relu')"]

Each string is parsed with `ast` and must be one call of a known layer whose arguments are literals
(`ast.literal_eval`): nothing is evaluated or imported, so a run folder's config.toml cannot run code
through its layers. Layers are Keras's, with Keras's defaults (strides = pool size for pooling, 'valid'
padding, 'same' padding that puts the odd extra row/column at the bottom/right, BatchNormalization momentum
0.99 and epsilon 1e-3) and Keras's initialization (keras_init_: glorot-uniform kernels, zero biases), so the
practice's nets written this way have its parameter counts and, under one seed, the registered nets' initial
weights (modules are made in the same order, drawing the same random numbers).

The last Dense is the classifier when it has no hidden activation: its units must be the number of classes.
It may be left out: a list that ends otherwise (Flatten, Dropout, Dense(50, activation='relu'), ...) gets
Dense(classes) appended. A softmax on it (`activation='softmax'`, or a final `Softmax()`) is the loss's:
the network outputs logits, which cross-entropy and every scorer read (Keras's `from_logits=True`).

`check_layers` (at config check time) parses the list and follows its ranks (image or flat features);
`build_layers` (with the classes and the image size) follows the shapes and makes the modules. Each problem
is one ConfigError naming the layer's index and text.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.errors import ConfigError
from cnnlab.models import keras_init_
from cnnlab.models.cifar import keras_batchnorm

# One layer's weights beyond this are a slip (Dense(10**8), or Flatten() of a large image into a Dense), not a
# design: refused with the layer named before anything is allocated. The practice's largest layer has 80,100.
MAX_LAYER_PARAMS = 100_000_000
MAX_TEXT = 300          # a layer call is short; a long string is a mistake (and keeps ast's recursion shallow)

# Keras activation names -> the function. 'softmax' only on the classifier (see the module doc).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda x: x, "relu": F.relu, "relu6": F.relu6, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "elu": F.elu, "selu": F.selu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "softplus": F.softplus,
    "softsign": F.softsign, "mish": F.mish, "leaky_relu": lambda x: F.leaky_relu(x, 0.2),   # Keras 3's default slope
    "exponential": torch.exp,
}
SOFTMAX = "softmax"


# ---------------------------------------------------------------- the layers' specifications

@dataclass(frozen=True)
class Spec:
    positional: tuple[str, ...]            # Keras's order of the leading arguments
    keywords: tuple[str, ...]              # accepted only by name
    defaults: dict                         # Keras's defaults; a parameter without one is required
    takes: str                             # "image", "flat" or "any": the input it needs
    gives: str                             # "image", "flat" or "same"


_CONV = Spec(("filters", "kernel_size", "strides", "padding"), ("activation", "use_bias", "dilation_rate", "input_shape"),
             {"strides": 1, "padding": "valid", "activation": None, "use_bias": True, "dilation_rate": 1,
              "input_shape": None}, "image", "image")
_POOL = Spec(("pool_size", "strides", "padding"), ("input_shape",),
             {"pool_size": 2, "strides": None, "padding": "valid", "input_shape": None}, "image", "image")
_GLOBAL = Spec((), ("input_shape",), {"input_shape": None}, "image", "flat")
_NOARGS = Spec((), ("input_shape",), {"input_shape": None}, "any", "same")

SPECS: dict[str, Spec] = {
    "Conv2D": _CONV,
    "MaxPooling2D": _POOL,
    "AveragePooling2D": _POOL,
    "GlobalAveragePooling2D": _GLOBAL,
    "GlobalMaxPooling2D": _GLOBAL,
    "BatchNormalization": Spec((), ("momentum", "epsilon", "input_shape"),
                               {"momentum": 0.99, "epsilon": 1e-3, "input_shape": None}, "any", "same"),
    "ReLU": _NOARGS,
    "LeakyReLU": Spec(("negative_slope",), ("alpha", "input_shape"),
                      {"negative_slope": None, "alpha": None, "input_shape": None}, "any", "same"),
    "ELU": Spec(("alpha",), ("input_shape",), {"alpha": 1.0, "input_shape": None}, "any", "same"),
    "Activation": Spec(("activation",), ("input_shape",), {"input_shape": None}, "any", "same"),
    "Softmax": _NOARGS,
    "Dropout": Spec(("rate",), ("input_shape",), {"input_shape": None}, "any", "same"),
    "Flatten": Spec((), ("input_shape",), {"input_shape": None}, "image", "flat"),
    "Dense": Spec(("units", "activation", "use_bias"), ("input_shape",),
                  {"activation": None, "use_bias": True, "input_shape": None}, "flat", "flat"),
    # keras.Input(shape=(32, 32, 3)), as Keras 3 starts a Sequential: first only, checked against the data
    "Input": Spec(("shape",), (), {}, "image", "same"),
}
ALIASES = {"InputLayer": "Input", "Convolution2D": "Conv2D", "MaxPool2D": "MaxPooling2D", "AvgPool2D": "AveragePooling2D",
           "GlobalAvgPool2D": "GlobalAveragePooling2D", "GlobalMaxPool2D": "GlobalMaxPooling2D"}
_PREFIXES = ("", "layers.", "keras.layers.", "tf.keras.layers.", "tensorflow.keras.layers.", "keras.", "tf.keras.")
ALLOWED = ", ".join(SPECS)


@dataclass(frozen=True)
class LayerCall:
    """One parsed layer: its place in the list, the user's text, the layer's name and all its arguments."""
    index: int
    text: str
    name: str
    args: dict

    def problem(self, msg: str) -> ConfigError:
        return ConfigError(f"layers[{self.index}] = {self.text!r}: {msg}")

    @property
    def softmax(self) -> bool:
        """Whether this layer is (or ends with) a softmax."""
        return self.name == "Softmax" or self.args.get("activation") == SOFTMAX


# ---------------------------------------------------------------- parsing (no torch work, nothing evaluated)

def _call_name(func: ast.expr) -> str | None:
    """'Conv2D' for Conv2D, layers.Conv2D or keras.layers.Conv2D; None for anything else."""
    dotted = ast.unparse(func)
    for prefix in _PREFIXES:
        if dotted.startswith(prefix) and dotted[len(prefix):].isidentifier():
            return dotted[len(prefix):]
    return None


def parse_layer(text: Any, index: int) -> LayerCall:
    """One layer string -> LayerCall, or one ConfigError naming the index, the text and what is allowed."""
    bad = lambda msg: ConfigError(f"layers[{index}] = {text!r}: {msg}")       # noqa: E731
    shape = "must be one layer call such as \"Conv2D(16, 3, padding='same')\""
    if not isinstance(text, str) or len(text) > MAX_TEXT:
        raise bad(f"{shape} (a string of at most {MAX_TEXT} characters)")
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise bad(shape) from None
    if not isinstance(node, ast.Call):
        raise bad(shape)
    name = _call_name(node.func)
    name = ALIASES.get(name, name)
    if name not in SPECS:
        raise bad(f"{ast.unparse(node.func)!r} is not a layer cnnlab builds; allowed: {ALLOWED}")
    spec = SPECS[name]

    def literal(arg: ast.expr, what: str) -> Any:
        try:
            return ast.literal_eval(arg)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise bad(f"{what} ({ast.unparse(arg)}) must be a literal: a number, a string, True/False/None, "
                      f"or a tuple/list of those") from None

    args: dict = {}
    if len(node.args) > len(spec.positional):
        raise bad(f"{name} takes at most {len(spec.positional)} positional argument"
                  f"{'' if len(spec.positional) == 1 else 's'} ({', '.join(spec.positional) or 'none'}); "
                  f"got {len(node.args)}")
    for key, arg in zip(spec.positional, node.args):
        if isinstance(arg, ast.Starred):
            raise bad("*arguments are not accepted; write each argument")
        args[key] = literal(arg, f"argument {key}")
    known = spec.positional + spec.keywords
    for kw in node.keywords:
        if kw.arg is None:
            raise bad("**arguments are not accepted; write each argument by name")
        if kw.arg not in known:
            raise bad(f"{name} has no argument {kw.arg!r}; its arguments: {', '.join(known)}")
        if kw.arg in args:
            raise bad(f"argument {kw.arg!r} is given twice")
        args[kw.arg] = literal(kw.value, f"argument {kw.arg}")
    missing = [k for k in spec.positional if k not in args and k not in spec.defaults]
    if missing:
        raise bad(f"{name} needs {', '.join(missing)}, e.g. {_EXAMPLES.get(name, name + '(...)')}")
    call = LayerCall(index, text, name, {**spec.defaults, **args})
    _check_values(call)
    return call


_EXAMPLES = {"Input": "Input(shape=(32, 32, 3))", "Conv2D": "Conv2D(16, 3)", "Dense": "Dense(100, activation='relu')", "Dropout": "Dropout(0.3)",
             "Activation": "Activation('relu')"}


def _pair(v: Any) -> tuple[int, int] | None:
    """A Keras size argument (an int or two ints) as (height, width); None when it is not one."""
    if isinstance(v, (list, tuple)) and len(v) == 2:
        h, w = v
    else:
        h = w = v
    ok = all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (h, w))
    return (h, w) if ok else None


def _check_values(c: LayerCall) -> None:
    """Each argument's own range, as Keras would refuse it."""
    a = c.args
    for key in ("filters", "units"):
        if key in a and not (isinstance(a[key], int) and not isinstance(a[key], bool) and a[key] >= 1):
            raise c.problem(f"{key} must be a positive integer; got {a[key]!r}")
    for key in ("kernel_size", "pool_size", "dilation_rate", "strides"):
        if key in a and not (key == "strides" and a[key] is None) and _pair(a[key]) is None:
            raise c.problem(f"{key} must be a positive integer or two of them, e.g. 3 or (3, 3); got {a[key]!r}")
    if "padding" in a and (not isinstance(a["padding"], str) or a["padding"].lower() not in ("valid", "same")):
        raise c.problem(f"padding must be 'valid' or 'same'; got {a['padding']!r}")
    if "activation" in a:
        act = a["activation"]
        if not (act is None and c.name != "Activation") and act not in ACTIVATIONS and act != SOFTMAX:
            raise c.problem(f"activation must be one of {', '.join([*ACTIVATIONS, SOFTMAX])}"
                            f"{'' if c.name == 'Activation' else ' or None'}; got {act!r}")
    if "use_bias" in a and not isinstance(a["use_bias"], bool):
        raise c.problem(f"use_bias must be True or False; got {a['use_bias']!r}")
    if c.name == "Dropout" and not (_number(a["rate"]) and 0 <= a["rate"] < 1):
        raise c.problem(f"rate must be a number in [0, 1); got {a['rate']!r}")
    if c.name == "BatchNormalization":
        if not (_number(a["momentum"]) and 0 <= a["momentum"] <= 1):
            raise c.problem(f"momentum must be a number in [0, 1] (Keras's 0.99 keeps 99% of the moving "
                            f"statistics each step); got {a['momentum']!r}")
        if not (_number(a["epsilon"]) and a["epsilon"] > 0):
            raise c.problem(f"epsilon must be a positive number; got {a['epsilon']!r}")
    for key in ("negative_slope", "alpha"):
        if a.get(key) is not None and not (_number(a[key]) and a[key] >= 0):
            raise c.problem(f"{key} must be a number >= 0; got {a[key]!r}")
    if c.name == "LeakyReLU" and a["negative_slope"] is not None and a["alpha"] is not None:
        raise c.problem("give negative_slope (Keras 3) or alpha (Keras 2), not both")
    shape = a.get("shape", a.get("input_shape"))
    if shape is not None and not (isinstance(shape, (list, tuple)) and len(shape) == 3
                                  and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in shape)):
        raise c.problem(f"{'shape' if c.name == 'Input' else 'input_shape'} must be (height, width, channels), "
                        f"e.g. (32, 32, 3); got {shape!r}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_layers(texts: list, where: str = "[model]") -> list[LayerCall]:
    """Parse the list and follow its ranks: every layer's arguments, Dense only on flat features, a softmax
    only at the end, input_shape only on the first layer, and a flat output for the classifier. Errors read
    "<where> layers[i] = '<text>': <what is wrong>"."""
    try:
        calls = [parse_layer(t, i) for i, t in enumerate(texts)]
        rank = "image"
        for c in calls:
            spec = SPECS[c.name]
            if spec.takes != "any" and spec.takes != rank:
                raise c.problem(_rank_hint(c.name, rank))
            rank = rank if spec.gives == "same" else spec.gives
            if c.index and (c.name == "Input" or c.args.get("input_shape") is not None):
                raise c.problem(f"{'Input' if c.name == 'Input' else 'input_shape'} belongs on the first layer only "
                                f"(the data sets it; it is checked there)")
            last = c.index == len(calls) - 1 or (c.index == len(calls) - 2 and calls[-1].name == "Softmax")
            if c.softmax and not last:
                raise c.problem("a softmax belongs at the end only (on the classifier); use e.g. 'relu' here")
        if calls and rank != "flat":
            raise calls[-1].problem("the list must end on flat features for the classifier: add Flatten() or "
                                    "GlobalAveragePooling2D() (then Dense(classes) is added, or write it)")
    except ConfigError as e:
        raise ConfigError(f"{where} {e}") from None
    return calls


def _rank_hint(name: str, rank: str) -> str:
    if rank == "image":
        return f"{name} needs flat features, and this layer gets images: put Flatten() or GlobalAveragePooling2D() before it"
    return f"{name} needs images (channels x height x width), and this layer gets flat features (after Flatten/Dense)"


# ---------------------------------------------------------------- the modules

def same_padding(n: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """Keras/TensorFlow 'same' padding of one side n: the output is ceil(n / s); the odd pixel goes after."""
    total = max((math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n, 0)
    return total // 2, total - total // 2


def _out_side(n: int, k: int, s: int, d: int, same: bool) -> int:
    return math.ceil(n / s) if same else (n - d * (k - 1) - 1) // s + 1


class Conv2D(nn.Conv2d):
    """nn.Conv2d with Keras's 'same' padding at any stride and kernel, and Keras's fused activation."""

    def __init__(self, cin: int, filters: int, kernel: tuple, stride: tuple, dilation: tuple, same: bool,
                 bias: bool, activation: str | None):
        # Odd kernels at stride 1 pad symmetrically: PyTorch's own padding, no copy. Otherwise pad in forward.
        native = same and all(s == 1 and (d * (k - 1)) % 2 == 0 for k, s, d in zip(kernel, stride, dilation))
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation)) if native else 0
        super().__init__(cin, filters, kernel, stride, padding, dilation, bias=bias)
        self.pad_same = same and not native
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_same:
            x = F.pad(x, _pads(x, self.kernel_size, self.stride, self.dilation))
        x = super().forward(x)
        return ACTIVATIONS[self.activation](x) if self.activation else x


def _pads(x: torch.Tensor, kernel, stride, dilation=(1, 1)) -> tuple[int, int, int, int]:
    """F.pad's (left, right, top, bottom) for Keras 'same' on x's height and width."""
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1], dilation[1])
    return left, right, top, bottom


class MaxPooling2D(nn.MaxPool2d):
    """Max pooling; 'same' pads with -inf, so the padding never wins (as Keras)."""

    def __init__(self, pool: tuple, stride: tuple, same: bool):
        super().__init__(pool, stride)
        self.same = same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = F.pad(x, _pads(x, self.kernel_size, self.stride), value=float("-inf"))
        return super().forward(x)


class AveragePooling2D(nn.AvgPool2d):
    """Average pooling; with 'same', each window averages its pixels inside the image only (as Keras)."""

    def __init__(self, pool: tuple, stride: tuple, same: bool):
        super().__init__(pool, stride)
        self.same = same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same:
            return super().forward(x)
        pads = _pads(x, self.kernel_size, self.stride)
        inside = F.pad(torch.ones_like(x[:1, :1]), pads)
        return super().forward(F.pad(x, pads)) / super().forward(inside)


class GlobalPooling2D(nn.Module):
    """GlobalAveragePooling2D / GlobalMaxPooling2D: (N, C, H, W) -> (N, C)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) if self.mode == "avg" else x.amax((2, 3))

    def extra_repr(self) -> str:
        return self.mode


class Activation(nn.Module):
    """Keras's Activation(name) (and LeakyReLU/ELU with their own argument)."""

    def __init__(self, name: str, alpha: float | None = None):
        super().__init__()
        self.name, self.alpha = name, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "leaky_relu" and self.alpha is not None:
            return F.leaky_relu(x, self.alpha)
        if self.name == "elu" and self.alpha is not None:
            return F.elu(x, self.alpha)
        return ACTIVATIONS[self.name](x)

    def extra_repr(self) -> str:
        return self.name if self.alpha is None else f"{self.name}, alpha={self.alpha}"


class Dense(nn.Linear):
    """nn.Linear with Keras's fused activation."""

    def __init__(self, fin: int, units: int, bias: bool, activation: str | None):
        super().__init__(fin, units, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return ACTIVATIONS[self.activation](x) if self.activation else x


# ---------------------------------------------------------------- shapes and building

Shape = tuple[int, ...]          # (channels, height, width) or (features,)


def _geometry(c: LayerCall) -> tuple[tuple, tuple, tuple, bool]:
    """(kernel, stride, dilation, same) of a convolution or pooling layer, each as (height, width)."""
    a = c.args
    kernel = _pair(a.get("kernel_size", a.get("pool_size")))
    if c.name == "Conv2D":
        stride = _pair(a["strides"])
    else:                                   # Keras: pooling strides default to the pool size
        stride = kernel if a["strides"] is None else _pair(a["strides"])
    dilation = _pair(a.get("dilation_rate", 1))
    return kernel, stride, dilation, a["padding"].lower() == "same"


def out_shape(c: LayerCall, shape: Shape) -> Shape:
    """The layer's output shape for an input of `shape` (arithmetic only: nothing runs, no random draws)."""
    if c.name in ("Conv2D", "MaxPooling2D", "AveragePooling2D"):
        kernel, stride, dilation, same = _geometry(c)
        sides = [_out_side(n, k, s, d, same) for n, k, s, d in zip(shape[1:], kernel, stride, dilation)]
        return (c.args["filters"] if c.name == "Conv2D" else shape[0], *sides)
    if c.name in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        return (shape[0],)
    if c.name == "Flatten":
        return (math.prod(shape),)
    if c.name == "Dense":
        return (c.args["units"],)
    return shape


def _module(c: LayerCall, shape: Shape) -> nn.Module | None:
    """The module of one layer for an input of `shape` (None: Input, and a final softmax, which is the loss's)."""
    a, act = c.args, c.args.get("activation")
    if c.name == "Input":
        return None
    act = None if act in (SOFTMAX, "linear") else act
    if c.name == "Conv2D":
        kernel, stride, dilation, same = _geometry(c)
        return Conv2D(shape[0], a["filters"], kernel, stride, dilation, same, a["use_bias"], act)
    if c.name in ("MaxPooling2D", "AveragePooling2D"):
        kernel, stride, _, same = _geometry(c)
        return (MaxPooling2D if c.name == "MaxPooling2D" else AveragePooling2D)(kernel, stride, same)
    if c.name in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        return GlobalPooling2D("avg" if "Average" in c.name else "max")
    if c.name == "BatchNormalization":
        bn = keras_batchnorm(shape[0], 2 if len(shape) == 3 else 1)
        if a["momentum"] != 0.99 or a["epsilon"] != 1e-3:       # else keras_batchnorm's exact values
            bn.momentum, bn.eps = 1.0 - a["momentum"], float(a["epsilon"])
        return bn
    if c.name == "ReLU":
        return nn.ReLU()
    if c.name == "LeakyReLU":
        slope = a["negative_slope"] if a["negative_slope"] is not None else a["alpha"]
        return Activation("leaky_relu", 0.3 if slope is None else float(slope))      # Keras's layer default 0.3
    if c.name == "ELU":
        return Activation("elu", float(a["alpha"]))
    if c.name in ("Activation", "Softmax"):
        return None if c.softmax else Activation(a["activation"])
    if c.name == "Dropout":
        return nn.Dropout(float(a["rate"]))
    if c.name == "Flatten":
        return nn.Flatten()
    if c.name == "Dense":
        return Dense(shape[0], a["units"], a["use_bias"], act)
    raise AssertionError(c.name)          # SPECS and this function list the same layers


def _weights(c: LayerCall, shape: Shape) -> int:
    """A Conv2D's or Dense's parameter count for an input of `shape` (arithmetic: nothing is allocated)."""
    a = c.args
    if c.name == "Conv2D":
        kh, kw = _pair(a["kernel_size"])
        return (shape[0] * kh * kw + a["use_bias"]) * a["filters"]
    if c.name == "Dense":
        return (shape[0] + a["use_bias"]) * a["units"]
    return 0


def _walk(calls: list[LayerCall], shape: Shape) -> tuple[list[Shape], LayerCall | None]:
    """The input shape of every layer, and the first layer whose output would be empty (or None)."""
    shapes = []
    for c in calls:
        shapes.append(shape)
        shape = out_shape(c, shape)
        if min(shape) < 1:
            return shapes, c
    return shapes, None


def with_classifier(calls: list[LayerCall], num_classes: int) -> list[LayerCall]:
    """The list with its classifier: a final Softmax() dropped (the loss's); a last Dense without a hidden
    activation (none, 'linear' or 'softmax') is the classifier, checked against the classes; else (a list
    ending on Flatten, Dropout, a Dense with 'relu', ...) Dense(classes) is appended."""
    body = calls[:-1] if calls and calls[-1].name in ("Softmax", "Activation") and calls[-1].softmax else calls
    last = body[-1] if body else None
    if last is not None and last.name == "Dense" and last.args["activation"] in (None, "linear", SOFTMAX):
        if last.args["units"] != num_classes:
            raise last.problem(f"the last Dense is the classifier: it has {last.args['units']} units but the data "
                               f"has {num_classes} classes; write Dense({num_classes}), or leave it out (the "
                               f"classes set it; a hidden Dense before it has an activation, e.g. 'relu')")
        return body
    return [*body, LayerCall(len(calls), f"Dense({num_classes})", "Dense",
                             {**SPECS["Dense"].defaults, "units": num_classes})]


def build_layers(texts: list[str], num_classes: int, image_size: int, in_channels: int = 3) -> nn.Module:
    """The nn.Sequential of `texts` for in_channels x image_size x image_size inputs, Keras-initialized;
    each module's `layer_text` is the user's string (the summary's row label)."""
    calls = check_layers(texts)
    try:
        return _build(calls, num_classes, image_size, in_channels)
    except ConfigError as e:
        raise ConfigError(f"[model] {e}") from None


def _build(calls: list[LayerCall], num_classes: int, image_size: int, in_channels: int) -> nn.Module:
    calls = with_classifier(calls, num_classes)
    first = calls[0].args.get("shape", calls[0].args.get("input_shape"))
    if first is not None and tuple(first) != (image_size, image_size, in_channels):
        what = "shape" if calls[0].name == "Input" else "input_shape"
        raise calls[0].problem(f"{what} {tuple(first)} is not the data's ({image_size}, {image_size}, "
                               f"{in_channels}); remove it (the data sets it) or change [data] image_size")
    shapes, empty = _walk(calls, (in_channels, image_size, image_size))
    if empty is not None:
        side = next((s for s in range(image_size + 1, 1 << 14)
                     if _walk(calls, (in_channels, s, s))[1] is None), None)
        fix = f"use [data] image_size >= {side}" if side else "use fewer or smaller strides/pools"
        raise empty.problem(f"{image_size}x{image_size} images are too small: this layer's output would be empty; {fix}")
    for c, shape in zip(calls, shapes):
        n = _weights(c, shape)
        if n > MAX_LAYER_PARAMS:
            fix = (f"it gets {shape[0]:,} features: use fewer units, pool more before Flatten(), or "
                   f"GlobalAveragePooling2D() instead" if c.name == "Dense" else "use fewer filters or a smaller kernel")
            raise c.problem(f"this layer would have {n:,} parameters ({n * 4 / 1e9:.1f} GB of float32 weights), "
                            f"more than cnnlab builds ({MAX_LAYER_PARAMS:,}); {fix}")
    modules = []
    for c, shape in zip(calls, shapes):
        m = _module(c, shape)
        if m is not None:
            m.layer_text = c.text
            modules.append(m)
    return keras_init_(nn.Sequential(*modules))


def check_model_config(cfg, where: str) -> None:
    """[model] with a layer list (cfg: ModelConfig): the list parses, and no key says the model is another.
    The default name 'basenet' is left as it is (results call the model "layers"); a name chosen as another
    registered net (say, inherited from a `base` config) would label the run as that net."""
    from cnnlab.models import is_registered
    if cfg.args:
        raise ConfigError(f"{where}: 'args' is for a registered model's function; with 'layers' each layer takes "
                          f"its own arguments in its call (remove args)")
    if cfg.name != "basenet" and is_registered(cfg.name):
        raise ConfigError(f"{where}: 'layers' is the model, but name = {cfg.name!r} names the registered net; set "
                          f"name to a label of your own (e.g. name = \"{cfg.name}-layers\") or remove layers")
    check_layers(cfg.layers, where)
