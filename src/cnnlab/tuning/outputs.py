"""What a study folder shows: trials.csv, history.png and importance.png (Optuna's matplotlib
visualizations), best.toml (a config `cnnlab run` takes) and the summary in study.json; and the one test
score of the chosen configuration.

The test split is scored once per study, for the best trial: its run folder already holds the weights of
exactly the chosen configuration (same seed, same splits), so they are scored on test there
(STUDY/trials/NNNN/eval-test/, as `cnnlab evaluate` writes it) instead of training it again. study.json keeps
that score with the trial's number; writing the outputs again does not score again unless the best changed.
"""
from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

from cnnlab.records.io import atomic_write, write_json
from cnnlab.tuning.study import CONFIG_FILE, STUDY_FILE, counts, read_spec


def write_outputs(study, study_dir: Path, score_test: bool) -> dict:
    """Write every output of the study folder; `score_test`: the study is complete, score its best on test.
    Returns the summary written into study.json."""
    study_dir = Path(study_dir)
    spec = read_spec(study_dir)
    trials = study.get_trials(deepcopy=False)
    write_trials_csv(trials, study_dir / "trials.csv")
    figures = write_figures(study, study_dir, spec["seed"])
    summary = {**spec, "counts": counts(study), "figures": figures}
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if complete:
        best = study.best_trial
        summary["best"] = {"trial": best.number, "value": best.value, "params": best.params,
                           "run": best.user_attrs.get("run")}
        write_best_toml(study_dir, best, spec)
        if score_test:
            # Several processes or nodes can finish one study at once: the one holding the lock scores the test
            # split and writes study.json; the others find that score there (read again under the lock).
            from filelock import FileLock
            with FileLock(str(study_dir / "study.lock")):
                summary["test"] = score_best_on_test(study_dir, best, read_spec(study_dir).get("test"))
                summary["complete"] = True
                write_json(study_dir / STUDY_FILE, summary)
            return summary
    summary["complete"] = bool(score_test)
    write_json(study_dir / STUDY_FILE, summary)
    return summary


def write_trials_csv(trials, path: Path) -> None:
    """One row per trial: number, state, value, each parameter, the epochs it trained, its run folder."""
    keys = sorted({k for t in trials for k in t.params})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "state", "value", *keys, "last_epoch", "seconds", "run", "note"])
    for t in trials:
        secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else ""
        note = "surplus (the study had its trials)" if t.user_attrs.get("surplus") else t.user_attrs.get("reason", "")
        w.writerow([t.number, t.state.name, "" if t.value is None else t.value, *(t.params.get(k, "") for k in keys),
                    "" if t.last_step is None else t.last_step, f"{secs:.1f}" if secs != "" else "",
                    t.user_attrs.get("run", ""), note])
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def write_figures(study, study_dir: Path, seed: int) -> dict:
    """history.png and importance.png; importance needs two finished trials with different values (fANOVA,
    seeded). Returns {figure: file or why it is missing}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as vis
    out = {}
    plots = {"history.png": lambda: vis.plot_optimization_history(study),
             "importance.png": lambda: vis.plot_param_importances(
                 study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")          # the matplotlib backend is marked experimental
                ax = plot()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.tight_layout()
            with atomic_write(study_dir / name, "wb") as f:
                fig.savefig(f, format="png", dpi=100)
            plt.close(fig)
            out[name] = name
        except (ValueError, RuntimeError, ZeroDivisionError) as e:    # too few finished trials so far
            plt.close("all")
            out[name] = f"not drawn: {str(e).splitlines()[0][:200]}"
    return out


def write_best_toml(study_dir: Path, best, spec: dict) -> None:
    """The base config with the best trial's values, without [tune]: `cnnlab run STUDY/best.toml` trains it."""
    import tomli_w

    from cnnlab.config import load_config, to_dict
    from cnnlab.tuning.trial import trial_config
    base = load_config(study_dir / CONFIG_FILE)
    doc = to_dict(trial_config(base, list(best.params.items()), best.number))
    head = (f"# chosen by cnnlab tune (study {spec['study_name']}): trial {best.number}, {spec['metric']} "
            f"{best.value:.4f} on the validation split\n"
            + "".join(f"# {k} = {v!r}\n" for k, v in best.params.items()))
    with atomic_write(study_dir / "best.toml", "wb") as f:
        f.write(head.encode())
        tomli_w.dump(doc, f)


def score_best_on_test(study_dir: Path, best, earlier: dict | None) -> dict:
    """The best trial's weights scored on the test split, once (`earlier`: the score study.json has)."""
    if earlier and earlier.get("trial") == best.number:
        return earlier
    from cnnlab.inference.evaluate import evaluate_runs
    from cnnlab.inference.model import Model
    run = study_dir / best.user_attrs["run"]
    ev, folder, _ = evaluate_runs([Model(run, trust_code=True)], None, None, "test", quiet=True)
    return {"trial": best.number, "accuracy": ev.top1, "loss": ev.loss, "top5": ev.top5, "macro_f1": ev.macro_f1,
            "n": ev.n, "evaluation": str(folder.relative_to(study_dir))}
