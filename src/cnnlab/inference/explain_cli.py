"""`cnnlab explain RUN IMAGE...`: the command line of inference/explain.py.

Its own module so that building the parser imports no torch (`cnnlab --version` stays instant).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnnlab.errors import CnnlabError


def add_parsers(sub) -> None:
    from cnnlab.cli_options import trust_flag
    p = sub.add_parser("explain", help="what the network looks at: top classes and a Grad-CAM heatmap per image")
    p.add_argument("run_dir")
    p.add_argument("paths", nargs="+", metavar="IMAGE", help="image files or folders (searched recursively)")
    p.add_argument("--layer", help="module to map, a dotted name from the network's named_modules() "
                                   "(default: its last spatial feature map, e.g. layer4 of a ResNet)")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--out", help="folder for the figures, explain.csv and explain.json (default: RUN/explain)")
    p.add_argument("--weights", default="auto", choices=["auto", "best", "last"])
    p.add_argument("--device", default="auto")
    trust_flag(p)
    p.set_defaults(func=cmd_explain)


def cmd_explain(a: argparse.Namespace) -> int:
    from cnnlab.api import load
    from cnnlab.cli_options import run_folder
    from cnnlab.inference.explain import explain_files
    if a.topk < 1:
        raise CnnlabError("--topk must be >= 1")
    run = run_folder(a.run_dir).path
    model = load(run, a.weights, a.device, trust_code=a.trust_code)
    out = Path(a.out) if a.out else run / "explain"
    rows, failures, layer = explain_files(model, a.paths, out, a.layer, a.topk)
    for r in rows:
        print(f"{r['path']}: " + ", ".join(f"{label} {p:.3f}" for label, p in r["top"]) + f" -> {r['figure']}")
    for path, reason in failures:
        print(f"cnnlab: cannot explain {path}: {reason}", file=sys.stderr)
    print(f"Grad-CAM at layer {layer} -> {out} (explain.csv, explain.json)")
    return 1 if failures else 0
