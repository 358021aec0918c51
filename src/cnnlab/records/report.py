"""Markdown report of a suite, rebuilt from run folders alone (no training, no model code).

One table row per experiment: runs whose resolved configs (config.toml) are the same but for the seed are the
seeds of one experiment (mean ± std); any other difference (epochs, data, lr) is another experiment. One table
per data set, headed by what the data was; the practice's own reported accuracy beside ours, marked where the
row no longer is the packaged recipe it was reported for; then each row's curves.
"""
from __future__ import annotations

import json
import math
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cnnlab.records.runs import RunFolder
from cnnlab.records.io import atomic_write, read_json
from cnnlab.wording import plural

# Keys that say where or how fast a run ran, not what it was: runs differing only there are seeds of one
# experiment. [report] is the row's label and reference numbers, not its training.
# a fold of a cross-validation is, like a seed, one more measurement of the same experiment
NOT_THE_EXPERIMENT = ("seed", "seeds", "fold", "device", "report", "tracking", "data.data_dir", "data.download",
                      "data.memory_budget_mb", "train.threads", "train.deterministic", "train.eval_batch_size",
                      "train.checkpoint_every")


@dataclass
class Group:
    """The runs of one experiment (its seeds), what they ran on, and how the report names them."""
    name: str
    items: list                          # [(RunFolder, results dict)], first-seen order
    key: dict                            # "table.key" -> value (JSON) of the config that defines the experiment
    data: str = ""
    title: str = ""
    notes: list[str] = field(default_factory=list)   # why the label or the reference no longer applies


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


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"epochs": 3}} -> {"train.epochs": "3"} (values as JSON: comparable, NaN included)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def experiment_key(run: RunFolder, res: dict) -> dict[str, str]:
    """What defines the run's experiment: its config.toml less NOT_THE_EXPERIMENT and the [train] values its
    [search] chose (each seed may choose its own). A folder without config.toml (a row that failed before it
    started): its name and what results.json says about it."""
    path = run.path / "config.toml"
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {k: json.dumps(res.get(k)) for k in ("name", "model", "optimizer", "batch_size", "epochs_max")}
    chosen = read_json(run.path / "search.json").get("chosen", {}) if (run.path / "search.json").is_file() else {}
    drop = set(NOT_THE_EXPERIMENT) | {f"train.{k}" for k in chosen}
    return {k: v for k, v in _flat(cfg).items() if not any(k == d or k.startswith(d + ".") for d in drop)}


def group_rows(runs: list[RunFolder]) -> list[Group]:
    """The finished runs as experiments (runs whose configs differ only in their seed), first-seen order."""
    groups: dict[str, Group] = {}
    for run in runs:
        res = run.read_results()
        if res is None:
            continue
        key = experiment_key(run, res)
        group = groups.setdefault(json.dumps(key, sort_keys=True), Group(res["name"], [], key))
        group.items.append((run, res))
    out = list(groups.values())
    for g in out:
        g.data = data_of(g.items[0][0])
        g.notes = recipe_notes(g.items[0][0], g.key)
    _titles(out)
    return out


def data_of(run: RunFolder) -> str:
    """What a run trained and was tested on: the data set, its classes and image size, the sizes of the splits."""
    meta = read_json(run.path / "meta.json") if (run.path / "meta.json").is_file() else {}
    data, splits = meta.get("data", ""), meta.get("splits")
    if not data:
        return "not recorded (the run stopped before loading its data)"
    if splits:
        data += f"; split {splits['train']:,} train / {splits['val']:,} validation / {splits['test']:,} test"
    return data


def recipe_notes(run: RunFolder, key: dict[str, str]) -> list[str]:
    """Where a run made from a packaged recipe (meta.json's source) is no longer that recipe: its label ("BaseNet,
    Adam, 20 epochs") and the practice's reference numbers were written for the recipe, not for this run."""
    from cnnlab.config import load_config, to_dict
    from cnnlab.errors import CnnlabError
    meta = read_json(run.path / "meta.json") if (run.path / "meta.json").is_file() else {}
    source = packaged_recipe(Path(meta.get("source") or ""))
    if source is None:
        return []
    try:
        recipe_cfg = load_config(source)
    except CnnlabError:                   # a recipe this version no longer reads: nothing to compare with
        return []
    if not _inherits_report(run, recipe_cfg):
        return []                         # the run's own label and reference: its author's to keep true
    recipe = to_dict(recipe_cfg)
    recipe["train"]["lr"] = recipe_cfg.train.effective_lr       # as config.toml records an omitted lr
    recipe = {k: v for k, v in _flat(recipe).items() if k in key}   # keys an older run lacks: not a difference
    changed = [k for k in recipe if recipe[k] != key[k] and k != "name"]     # a recipe renamed is still it
    if not changed:
        return []
    notes = []
    if "train.epochs" in changed:
        ran, was = json.loads(key["train.epochs"]), json.loads(recipe["train.epochs"])
        notes.append(f"{'shortened' if ran < was else 'lengthened'}: {ran} of {plural(was, 'epoch')}")
    data = [k for k in changed if k.startswith("data.")]
    if data:
        notes.append("other data (" + ", ".join(f"{k[5:]} {json.loads(key[k])} instead of {json.loads(recipe[k])}"
                                                for k in data[:3]) + ")")
    rest = [k for k in changed if k != "train.epochs" and not k.startswith("data.")]
    if rest:
        notes.append("changed: " + ", ".join(f"{k} = {json.loads(key[k])} (recipe {json.loads(recipe[k])})"
                                            for k in rest[:3]) + (", ..." if len(rest) > 3 else ""))
    return notes


def packaged_recipe(source: Path, depth: int = 8) -> Path | None:
    """The packaged recipe a run's config file is, or starts from through its `base` chain (a user's file with
    `base = "practice/03_adam20"` inherits that recipe's label and reference numbers); None when neither."""
    from cnnlab.config import _resolve_base, read_toml
    from cnnlab.configs import ROOT
    from cnnlab.errors import CnnlabError
    for _ in range(depth):
        try:
            if not source.is_file():
                return None
            if source.resolve().is_relative_to(ROOT.resolve()):
                return source
            base = read_toml(source).get("base")
            if not isinstance(base, str):
                return None
            source = _resolve_base(base, source)
        except (OSError, CnnlabError):
            return None
    return None


def _inherits_report(run: RunFolder, recipe) -> bool:
    """Whether the run's [report] label and reference are the recipe's (not set by the user's own file)."""
    try:
        report = tomllib.loads((run.path / "config.toml").read_text(encoding="utf-8")).get("report", {})
    except (OSError, tomllib.TOMLDecodeError):
        return True
    ours, theirs = report.get("reference_accuracy", math.nan), recipe.report.reference_accuracy
    return report.get("label", "") == recipe.report.label and (ours == theirs or math.isnan(ours) and math.isnan(theirs))


def _titles(groups: list[Group]) -> None:
    """Each group's row title: its label, told apart from the groups with the same label in its table (same data)
    by the config values they differ in, and marked where it no longer applies."""
    label = {id(g): g.items[0][1].get("label") or g.name for g in groups}
    for g in groups:
        title = label[id(g)]
        same = [o for o in groups if o is not g and label[id(o)] == title and o.data == g.data]
        if same:
            differ = [k for k in g.key if any(o.key.get(k) != g.key[k] for o in same)][:3]
            title += " [" + ", ".join(f"{k} = {json.loads(g.key[k])}" for k in differ) + "]"
        if g.notes:
            title += f" ({'; '.join(g.notes)})"
        g.title = title


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
        lines += [f"Device: {meta.get('device', '?')} ({meta.get('device_name', '')}), "
                  f"torch {meta.get('torch', '?')}, cnnlab {meta.get('cnnlab', '?')}.", ""]
    for data in dict.fromkeys(g.data for g in groups):       # one table per data set: rows compare within it
        lines += [f"Data: {data}.", ""] + results_table([g for g in groups if g.data == data]) + [""]
    marked = [g for g in groups if g.notes]
    if marked:
        lines += ["## Rows that are no longer their packaged recipe", ""]
        lines += [f"- **{g.name}**: {'; '.join(g.notes)}: its label and the practice's reference numbers were "
                  f"reported for the recipe, so they do not describe this row" for g in marked] + [""]
    lines.pop()
    failed = [(g.name, r) for g in groups for _, r in g.items if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Rows that did not finish", ""]
        lines += [f"- **{name}**: {r.get('status')}: {r.get('reason', 'no reason recorded')}" for name, r in failed]
    warned = [(g.name, w) for g in groups for w in dict.fromkeys(x for _, r in g.items for x in r.get("warnings") or [])]
    if warned:
        lines += ["", "## Warnings (rows marked ⚠)", ""] + [f"- **{name}**: {w}" for name, w in warned]
    compare = read_json(suite).get("compare", []) if suite.is_file() else []
    if compare:
        by_name: dict = {}
        for g in groups:
            by_name.setdefault(g.name, g.items)
        lines += ["", "## Is the difference larger than seed-to-seed noise?", ""]
        lines += [f"- {line}" for line in compare_lines(by_name, compare)]
        lines += compare_figures(folder, by_name, compare)
    total = sum(r.get("seconds", 0) or 0 for g in groups for _, r in g.items)
    lines += ["", f"Total training time: {total:.1f} s.", "", "## What each row shows", ""]
    for g in groups:
        lines += row_section(folder, g)
    return "\n".join(lines) + "\n"


def results_table(groups: list[Group]) -> list[str]:
    lines = ["| experiment | model | optimizer | epochs run | batch | test accuracy | top-5 | macro F1 | test loss | "
             "val accuracy | seconds | practice's accuracy | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        items = g.items
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
        reference = _fmt(res0.get("reference_accuracy"))
        if g.notes and reference != "–":
            reference += " (not comparable)"
        lines.append(f"| {g.title}{seeds} | {res0.get('model', '?')} | {res0.get('optimizer', '?')} | "
                     f"{epochs} | {res0.get('batch_size', '?')} | {col('test_accuracy')} | {col('test_top5')} | "
                     f"{col('test_macro_f1')} | {col('test_loss')} | {col('val_accuracy')} | {col('seconds', 1)} | "
                     f"{reference} | {status} |")
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


def row_section(folder: Path, group: Group) -> list[str]:
    """A row's curves read for the student (best epoch, gap, overfitting onset), its most confused classes,
    and its figures (curves, confusion matrix, most confident errors) of the first seed."""
    from cnnlab.records.analysis import curve_summary, describe
    items = group.items
    run, res = items[0]
    rel = run.path.relative_to(folder) if run.path != folder else Path(".")
    seed = f" (seed {res.get('seed')})" if len(items) > 1 else ""
    lines = [f"### {group.title}", "", f"Data: {group.data}.", ""]
    history = run.read_history()
    if history:
        lines += [f"Curves{seed}: {describe(curve_summary(history))}.", ""]
    pairs = _confused_pairs(run.path, 3)
    if pairs:
        lines += [f"Most confused{seed}: " + "; ".join(f"{p['true']} → {p['pred']} ({float(p['rate']):.0%})"
                                                       for p in pairs) + ".", ""]
    lines += per_class_table(run.path, res, seed)
    figures = [(n, f) for n, f in (("accuracy", "accuracy.png"), ("loss", "loss.png"), ("confusion", "confusion.png"),
                                   ("errors", "errors.png")) if (run.path / f).is_file()]
    lines += [" ".join(f"![{n}]({(rel / f).as_posix()})" for n, f in figures) if figures else "(no figures)", ""]
    return lines


def per_class_table(path: Path, res: dict, seed: str = "", most: int = 30, worst: int = 10) -> list[str]:
    """The test split's per-class scores (per_class.csv) with each class's support: its test images, and its
    training images when results.json records them (train_support). Up to `most` classes all of them, else
    the `worst` by F1: where an imbalanced training split shows first."""
    import csv
    p = path / "per_class.csv"
    if not p.is_file():
        return []
    with open(p, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    train = res.get("train_support") or {}
    shown = rows if len(rows) <= most else sorted(rows, key=lambda r: float(r["f1"]))[:worst]
    what = "Per class" if shown is rows else f"The {worst} classes of {len(rows)} with the lowest F1"
    # rows without the outer pipes (valid GitHub Markdown): "| " starts a line of the results table only
    lines = [f"{what}{seed}, test split (support: images of the class):", "",
             "class | train images | test support | precision | recall | F1", "---|---|---|---|---|---"]
    lines += [f"{r['class']} | {train.get(r['class'], '–')} | {r['support']} | {float(r['precision']):.3f} | "
              f"{float(r['recall']):.3f} | {float(r['f1']):.3f}" for r in shown]
    return lines + [""]


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


def _first_meta(groups: list[Group]) -> dict | None:
    for g in groups:
        for run, _ in g.items:
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
