"""Markdown report of a suite, rebuilt from run folders alone (no training, no model code).

One table row per experiment (runs of the same row with several seeds are grouped: mean ± std), the
practice's own reported accuracy beside ours, then each row's curves.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from cnnlab.records.runs import RunFolder
from cnnlab.records.io import atomic_write, read_json


def find_runs(folder: Path) -> list[RunFolder]:
    """Run folders under `folder` (itself included), in name order (suites prefix rows with their index)."""
    folder = Path(folder)
    found = [p.parent for p in sorted(folder.rglob("results.json"))]
    return [RunFolder(p) for p in found]


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def mean_std(values: list[float], digits: int = 4) -> str:
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
    """The whole report as Markdown; writes the comparison figures (compare/*.png) it links to."""
    folder = Path(folder)
    suite = folder / "suite.json"
    if not title and suite.is_file():
        title = f"cnnlab suite {read_json(suite)['suite']}"
    groups = group_rows(find_runs(folder))
    lines = [f"# {title or 'cnnlab report: ' + folder.name}", ""]
    if not groups:
        return "\n".join(lines + ["No finished runs found.", ""])
    meta = _first_meta(groups)
    if meta:
        lines += [f"Data: {meta.get('data', '?')}. Device: {meta.get('device', '?')} ({meta.get('device_name', '')}), "
                  f"torch {meta.get('torch', '?')}, cnnlab {meta.get('cnnlab', '?')}.", ""]
    lines += results_table(groups)
    failed = [(name, r) for name, items in groups for _, r in items if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Rows that did not finish", ""]
        lines += [f"- **{name}**: {r.get('status')}: {r.get('reason', 'no reason recorded')}" for name, r in failed]
    warned = [(name, w) for name, items in groups for w in dict.fromkeys(x for _, r in items for x in r.get("warnings") or [])]
    if warned:
        lines += ["", "## Warnings (rows marked ⚠)", ""] + [f"- **{name}**: {w}" for name, w in warned]
    compare = read_json(suite).get("compare", []) if suite.is_file() else []
    if compare:
        lines += ["", "## Is the difference larger than seed-to-seed noise?", ""]
        lines += [f"- {line}" for line in compare_lines(dict(groups), compare)]
        lines += compare_figures(folder, dict(groups), compare)
    total = sum(r.get("seconds", 0) or 0 for _, items in groups for _, r in items)
    lines += ["", f"Total training time: {total:.1f} s.", "", "## What each row shows", ""]
    for name, items in groups:
        lines += row_section(folder, name, items)
    return "\n".join(lines) + "\n"


def results_table(groups) -> list[str]:
    lines = ["| experiment | model | optimizer | epochs run | batch | test accuracy | top-5 | macro F1 | test loss | "
             "seconds | practice's accuracy | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, items in groups:
        res0 = items[0][1]
        ok = [r for _, r in items if r.get("status") == "ok"]
        status = ", ".join(sorted({r.get("status", "?") for _, r in items}))
        if any(r.get("warnings") for _, r in items):
            status += " ⚠"
        seeds = f" (n={len(items)})" if len(items) > 1 else ""
        epochs = "/".join(sorted({str(r.get("epochs_run", "?")) for _, r in items}))
        if res0.get("epochs_max") and any(r.get("stopped_early") for _, r in items):
            epochs += f" (max {res0['epochs_max']})"
        col = lambda key, digits=4: mean_std([r.get(key) for r in ok], digits)  # noqa: E731
        lines.append(f"| {res0.get('label', name)}{seeds} | {res0.get('model', '?')} | {res0.get('optimizer', '?')} | "
                     f"{epochs} | {res0.get('batch_size', '?')} | {col('test_accuracy')} | {col('test_top5')} | "
                     f"{col('test_macro_f1')} | {col('test_loss')} | {col('seconds', 1)} | "
                     f"{_fmt(res0.get('reference_accuracy'))} | {status} |")
    return lines


def compare_figures(folder: Path, groups: dict, compare: list[dict]) -> list[str]:
    """One figure per [[compare]] pair: both rows' validation accuracy and loss overlaid (band = seeds' min-max)."""
    from cnnlab.records.analysis import plot_compare
    lines = []
    for i, c in enumerate(compare, 1):
        hist = {key: [run.read_history() for run, r in groups.get(c[key], []) if r.get("status") == "ok"]
                for key in ("a", "b")}
        if not all(any(h for h in hist[key]) for key in ("a", "b")):
            continue
        rel = Path("compare") / f"{i:02d}-{c['a']}-vs-{c['b']}.png"
        label = c.get("label", f"{c['a']} vs {c['b']}")
        plot_compare(hist["a"], hist["b"], c["a"], c["b"], folder / rel, title=label)
        lines += ["", f"**{label}**", "", f"![{label}]({rel.as_posix()})"]
    return lines


def row_section(folder: Path, name: str, items) -> list[str]:
    """A row's curves read for the student (best epoch, gap, overfitting onset), its most confused classes,
    and its figures (curves, confusion matrix, most confident errors) of the first seed."""
    from cnnlab.records.analysis import curve_summary, describe
    run, res = items[0]
    rel = run.path.relative_to(folder) if run.path != folder else Path(".")
    seed = f" (seed {res.get('seed')})" if len(items) > 1 else ""
    lines = [f"### {res.get('label', name)}", ""]
    history = run.read_history()
    if history:
        lines += [f"Curves{seed}: {describe(curve_summary(history))}.", ""]
    pairs = _confused_pairs(run.path, 3)
    if pairs:
        lines += [f"Most confused{seed}: " + "; ".join(f"{p['true']} → {p['pred']} ({float(p['rate']):.0%})"
                                                       for p in pairs) + ".", ""]
    figures = [(n, f) for n, f in (("accuracy", "accuracy.png"), ("loss", "loss.png"), ("confusion", "confusion.png"),
                                   ("errors", "errors.png")) if (run.path / f).is_file()]
    lines += [" ".join(f"![{n}]({(rel / f).as_posix()})" for n, f in figures) if figures else "(no figures)", ""]
    return lines


def _confused_pairs(path: Path, n: int) -> list[dict]:
    import csv
    p = path / "confused_pairs.csv"
    if not p.is_file():
        return []
    with open(p, encoding="utf-8", newline="") as f:
        return [r for r in csv.DictReader(f) if int(r.get("count") or 0) > 0][:n]


def compare_test(a: dict[int, float], b: dict[int, float]) -> tuple[str, float] | None:
    """Test accuracies by seed for two rows -> (test name, p-value); None when either has < 2 seeds.

    Paired t-test when both rows ran the same seeds (a seed fixes the split and the initial weights of
    both, so the pairing removes that shared noise); Welch's t-test otherwise.
    """
    from scipy import stats
    if len(a) < 2 or len(b) < 2:
        return None
    if set(a) == set(b):
        seeds = sorted(a)
        diffs = [b[s] - a[s] for s in seeds]
        if all(d == diffs[0] for d in diffs):      # identical differences: no variance to test against
            return f"paired t-test, {len(seeds)} seeds", 0.0 if diffs[0] else 1.0
        return f"paired t-test, {len(seeds)} seeds", float(stats.ttest_rel([b[s] for s in seeds], [a[s] for s in seeds]).pvalue)
    return (f"Welch t-test, {len(a)} vs {len(b)} seeds",
            float(stats.ttest_ind(list(b.values()), list(a.values()), equal_var=False).pvalue))


def compare_lines(groups: dict, compare: list[dict], alpha: float = 0.05) -> list[str]:
    out = []
    for c in compare:
        acc = {}
        for key in ("a", "b"):
            acc[key] = {r["seed"]: r["test_accuracy"] for _, r in groups.get(c[key], [])
                        if r.get("status") == "ok" and r.get("test_accuracy") is not None}
        label = c.get("label", f"{c['a']} vs {c['b']}")
        if not acc["a"] or not acc["b"]:
            out.append(f"**{label}**: not measured (a row is missing or failed).")
            continue
        ma, mb = statistics.mean(acc["a"].values()), statistics.mean(acc["b"].values())
        head = f"**{label}**: {c['b']} − {c['a']} = {mb - ma:+.4f} test accuracy ({mb:.4f} vs {ma:.4f})"
        test = compare_test(acc["a"], acc["b"])
        if test is None:
            out.append(f"{head}; one seed only, so this cannot be told apart from the random weights: "
                       f"run with --seeds 3 or more.")
            continue
        name, p = test
        verdict = ("larger than the seed-to-seed noise" if p < alpha
                   else "not distinguishable from seed-to-seed noise")
        out.append(f"{head}; {name}: p = {p:.3g}, {verdict} (at {alpha}).")
    return out


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
