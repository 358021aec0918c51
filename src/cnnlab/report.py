"""Markdown report of a suite, rebuilt from run folders alone (no training, no model code).

One table row per experiment (runs of the same row with several seeds are grouped: mean ± std), the
practice's own reported accuracy beside ours, then each row's curves.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from cnnlab.runs import RunFolder, atomic_write, read_json


def find_runs(folder: Path) -> list[RunFolder]:
    """Run folders under `folder` (itself included), in name order (suites prefix rows with their index)."""
    folder = Path(folder)
    found = [p.parent for p in sorted(folder.rglob("results.json"))]
    return [RunFolder(p) for p in found]


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _mean_std(values: list[float], digits: int = 4) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def group_rows(runs: list[RunFolder]) -> list[tuple[str, list[tuple[RunFolder, dict]]]]:
    """Group run folders by experiment name, keeping first-seen order."""
    groups: dict[str, list] = {}
    for run in runs:
        res = run.read_results()
        if res is not None:
            groups.setdefault(res["name"], []).append((run, res))
    return list(groups.items())


def build_report(folder: Path, title: str = "") -> str:
    folder = Path(folder)
    groups = group_rows(find_runs(folder))
    lines = [f"# {title or 'cnnlab report: ' + folder.name}", ""]
    if not groups:
        return "\n".join(lines + ["No finished runs found.", ""])
    meta = _first_meta(groups)
    if meta:
        lines += [f"Data: {meta.get('data', '?')}. Device: {meta.get('device', '?')} ({meta.get('device_name', '')}), "
                  f"torch {meta.get('torch', '?')}, cnnlab {meta.get('cnnlab', '?')}.", ""]
    lines += ["| experiment | model | optimizer | epochs run | batch | test accuracy | test loss | seconds | "
              "practice's accuracy | status |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, items in groups:
        res0 = items[0][1]
        ok = [r for _, r in items if r.get("status") == "ok"]
        status = ", ".join(sorted({r.get("status", "?") for _, r in items}))
        seeds = f" (n={len(items)})" if len(items) > 1 else ""
        epochs = "/".join(sorted({str(r.get("epochs_run", "?")) for _, r in items}))
        if res0.get("epochs_max") and any(r.get("stopped_early") for _, r in items):
            epochs += f" (max {res0['epochs_max']})"
        lines.append(
            f"| {res0.get('label', name)}{seeds} | {res0.get('model', '?')} | {res0.get('optimizer', '?')} | {epochs} | "
            f"{res0.get('batch_size', '?')} | {_mean_std([r['test_accuracy'] for r in ok])} | "
            f"{_mean_std([r['test_loss'] for r in ok])} | {_mean_std([r['seconds'] for r in ok], 1)} | "
            f"{_fmt(res0.get('reference_accuracy'))} | {status} |")
    failed = [(name, r) for name, items in groups for _, r in items if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Rows that did not finish", ""]
        lines += [f"- **{name}**: {r.get('status')}: {r.get('reason', 'no reason recorded')}" for name, r in failed]
    total = sum(r.get("seconds", 0) or 0 for _, items in groups for _, r in items)
    lines += ["", f"Total training time: {total:.1f} s.", "", "## Curves", ""]
    for name, items in groups:
        run, res = items[0]
        rel = run.path.relative_to(folder) if run.path != folder else Path(".")
        lines += [f"### {res.get('label', name)}", ""]
        if (run.path / "accuracy.png").is_file():
            lines += [f"![accuracy]({(rel / 'accuracy.png').as_posix()}) ![loss]({(rel / 'loss.png').as_posix()})", ""]
        else:
            lines += ["(no curves)", ""]
    return "\n".join(lines) + "\n"


def _first_meta(groups) -> dict | None:
    for _, items in groups:
        for run, _ in items:
            p = run.path / "meta.json"
            if p.is_file():
                return read_json(p)
    return None


def write_report(folder: Path, title: str = "", out: Path | None = None) -> Path:
    out = Path(out) if out else Path(folder) / "report.md"
    text = build_report(folder, title)
    with atomic_write(out) as f:
        f.write(text)
    return out
