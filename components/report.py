"""`braintumor report`: docs/results.md written from a finished run's own outputs, never typed by hand.

It reads the evaluation metrics, the splits, the shortcut audit, the external evaluations, each training's history
and MLflow run, the registered versions and the data hash, checks the targets in params, and copies the stack's
plots next to the page. The headline is the full official test split (no twin of any of its images is left in
training); its clean subset stands beside it with its class counts, as a check for residual leakage.

Every figure is also shown by MRI weighting: the test split by the audit's estimated weighting, val by source and
weighting (the weighting a source states, else the estimate), every external report by its stated weighting.

Each run's figures are also kept as <report.runs_dir>/<data>-seed<seed>.json (<data>: the sources the training
pool came from), so the page shows the spread over every seed run on its data (a second seed: `braintumor flow
train -S seed=43`, then `braintumor report`) and, beside it, the runs of its seed on other data (e.g. the Kaggle set
alone), so the effect of new data is measured.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from components.config import EvaluateParams, Params, ReportParams, is_pretrained
from components.data_import import data_hash
from components.metrics import (
    NO_TUMOR,
    labelled_figures,
    plot_learning_curves,
    probability_columns,
    proportion,
    proportion_text,
    save_figure,
)

BASE_ROWS = ("custom_cnn", "mobilenetv2", "densenet169", "resnet50")
TEST_SETS = {"test": "official test", "test_clean": "clean test"}
UNKNOWN = "unknown"


@dataclass(frozen=True)
class StageTime:
    stage: str
    run_id: str
    seconds: float
    start: float = 0.0  # seconds since the epoch (the MLflow run's start)


def busy_seconds(times: list[StageTime]) -> float:
    """Wall time during which at least one of `times` ran: their sum when they ran one after the other, less when
    some ran at once (`devices.cpu_concurrency`, one per GPU)."""
    total, reach = 0.0, float("-inf")
    for run in sorted(times, key=lambda t: t.start):
        end = run.start + run.seconds
        total += max(0.0, end - max(run.start, reach))
        reach = max(reach, end)
    return total


@dataclass(frozen=True)
class TrainingSetup:
    """What one training ran on and started from, as its MLflow run recorded it."""

    model: str
    device: str  # "GPU" | "CPU" (tag `device` of tracking.system_info) | "unknown" (no run found)
    gpu_name: str  # tag `gpu_name`: "none" on a CPU
    mixed_precision: bool  # tag `mixed_precision` of devices.configure_tensorflow
    precision: str  # tag `precision` of devices.configure_tensorflow: the Keras dtype policy
    host: str
    weights: str  # "imagenet" | "none" | a weights file

    @property
    def pretrained(self) -> bool:
        return is_pretrained(self.model, self.weights)


def training_setup(model: str, tags: dict[str, str] | None, run_params: dict[str, str] | None,
                   params_weights: str) -> TrainingSetup:
    """A training's setup from its run's tags and logged params (`models.<model>.weights`); `tags` None: no run was
    found, so the device is unknown and the weights are those of params.yaml."""
    tags, run_params = tags or {}, run_params or {}
    return TrainingSetup(model=model, device=tags.get("device", UNKNOWN), gpu_name=tags.get("gpu_name", "none"),
                         mixed_precision=tags.get("mixed_precision") == "True",
                         precision=tags.get("precision", "float32"), host=tags.get("host", UNKNOWN),
                         weights=run_params.get(f"models.{model}.weights", params_weights))


def _device_text(setup: TrainingSetup) -> str:
    if setup.device == "GPU":
        name = f" ({setup.gpu_name})" if setup.gpu_name not in ("", "none") else ""
        return f"GPU{name}{', mixed precision' if setup.mixed_precision else ''}"
    if setup.device == "CPU":
        return f"CPU (no GPU visible){', bfloat16' if setup.precision == 'mixed_bfloat16' else ''}"
    return "unknown device (no MLflow training run found)"


def _weights_text(setup: TrainingSetup) -> str:
    return f"pretrained (`weights: {setup.weights}`)" if setup.pretrained else "from scratch"


def _grouped(setups: list[TrainingSetup], text, every: str) -> str:
    """'every <noun> <text>' when all setups agree, else '<text>: model, model; <text>: model'."""
    groups: dict[str, list[str]] = {}
    for setup in setups:
        groups.setdefault(text(setup), []).append(setup.model)
    if len(groups) == 1:
        return f"{every} {next(iter(groups))}"
    return "; ".join(f"{value}: {', '.join(models)}" for value, models in groups.items())


def headline(setups: list[TrainingSetup]) -> str:
    """Title words: the device(s) and whether the models started from pretrained weights."""
    devices = sorted({s.device for s in setups}) or [UNKNOWN]
    device = " and ".join(devices) if len(devices) < 3 else ", ".join(devices)
    pretrained = [s.pretrained for s in setups]
    start = "pretrained" if pretrained and all(pretrained) else "partly pretrained" if any(pretrained) else \
        "from scratch"
    return f"{device}, {start}"


def hardware_lines(setups: list[TrainingSetup]) -> list[str]:
    """The page's bullets on where each training ran and what it started from, from the trainings' own runs."""
    where = _grouped(setups, _device_text, "every training on")
    hosts = sorted({s.host for s in setups} - {UNKNOWN})
    if hosts:
        where += f", host {', '.join(f'`{h}`' for h in hosts)}"
    weights = _grouped(setups, _weights_text, "every model")
    return [f"- **Training hardware:** {where} (the trainings' MLflow tags `device`, `gpu_name`)",
            f"- **Weights:** {weights}"]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def comparison_table(evaluation: dict, classes: list[str]) -> str:
    header = ["model"]
    for label in TEST_SETS.values():
        header += [f"{label} accuracy", f"{label} macro-F1", f"{label} tumor sensitivity"]
    header += [f"clean {c} sensitivity" for c in classes] + ["clean ECE"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, sets in evaluation.items():
        cells = [name]
        for key in TEST_SETS:
            m = sets[key]
            cells += [_pct(m["accuracy"]), _pct(m["macro_f1"]), _pct(m["tumor_sensitivity"])]
        cells += [_pct(sets["test_clean"][f"sensitivity_{c}"]) for c in classes]
        cells.append(f"{sets['test_clean']['ece']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _points(value: float) -> str:
    return f"{100 * value:.1f} points"


def target_checks(evaluation: dict, targets: ReportParams, audit: dict | None = None,
                  external: dict[str, dict] | None = None, seeds: dict[int, dict] | None = None,
                  training_minutes: float | None = None) -> list[tuple[str, bool | None, str]]:
    """(what, met, detail) for every target of the profile, on the full official test split. `met` is None when
    the run has nothing to judge it by (no audit, no external report, a single seed)."""
    full = {name: sets["test"] for name, sets in evaluation.items()}
    base = {name: full[name]["accuracy"] for name in BASE_ROWS if name in full}
    goal = {name: targets.model_targets.get(name, targets.base_model_target) for name in base}
    checks: list[tuple[str, bool | None, str]] = [
        (f"{name} >= {_pct(goal[name])}", acc >= goal[name], _shortfall(acc, goal[name])) for name, acc in base.items()]
    if "stack" in full:
        stack = full["stack"]
        checks.append((f"stack >= {_pct(targets.stack_target)}", stack["accuracy"] >= targets.stack_target,
                       _shortfall(stack["accuracy"], targets.stack_target)))
        if base:
            best_name = max(base, key=base.get)
            checks.append((f"stack above the best single model ({best_name})", stack["accuracy"] > base[best_name],
                           f"{_pct(stack['accuracy'])} vs {_pct(base[best_name])}"))
        if "soft_vote" in full:
            checks.append(("stack above soft voting", stack["accuracy"] > full["soft_vote"]["accuracy"],
                           f"{_pct(stack['accuracy'])} vs {_pct(full['soft_vote']['accuracy'])}"))
        checks.append((f"stack tumor sensitivity >= {_pct(targets.tumor_sensitivity_target)} at specificity >= "
                       f"{_pct(targets.tumor_specificity_target)}",
                       stack["tumor_sensitivity"] >= targets.tumor_sensitivity_target
                       and stack["tumor_specificity"] >= targets.tumor_specificity_target,
                       f"{_pct(stack['tumor_sensitivity'])} at {_pct(stack['tumor_specificity'])}"))
        checks.append((f"stack ECE <= {targets.ece_target}", stack["ece"] <= targets.ece_target,
                       f"{stack['ece']:.3f}"))
        gap = evaluation["stack"]["test"]["accuracy"] - evaluation["stack"]["test_clean"]["accuracy"]
        checks.append((f"stack clean subset within {targets.clean_gap_points} points of the full split",
                       abs(100 * gap) <= targets.clean_gap_points,
                       f"{_pct(evaluation['stack']['test_clean']['accuracy'])} vs {_pct(stack['accuracy'])}"))
    gaps = (audit or {}).get("counter_shortcut_gaps", {})
    for name in [*BASE_ROWS, "soft_vote", "stack"]:
        if name in gaps:
            g = gaps[name]
            checks.append((f"{name}: T2-like tumors within {targets.counter_shortcut_gap_points} points of all "
                           "tumors", g["gap_points"] <= targets.counter_shortcut_gap_points,
                           f"{_pct(g['counter_shortcut'])} (n={g['n']}) vs {_pct(g['overall'])}"))
    if audit is not None and not gaps:
        checks.append(("T2-like tumors within the gap target", None, "no T2-like tumor found in the test split"))
    healthy_t1 = ((audit or {}).get("test_cells", {}).get("stack", {}).get(f"{NO_TUMOR} T1-like", {})
                  .get("tumor_specificity"))
    if audit is not None:
        what = f"stack: T1-like healthy scans called healthy >= {_pct(targets.t1_healthy_specificity_target)}"
        checks.append((what, None, "no T1-like healthy scan in the test split") if not healthy_t1 else
                      (what, healthy_t1["value"] >= targets.t1_healthy_specificity_target,
                       _shortfall(healthy_t1["value"], targets.t1_healthy_specificity_target, healthy_t1)))
    for label, report in (external or {}).items():
        checks += external_checks(label, report, targets)
    spreads = seed_spreads(seeds or {})
    for name, spread in spreads.items():
        limit = targets.stack_seed_spread_points if name == "stack" else targets.seed_spread_points
        if name in (*BASE_ROWS, "stack"):
            checks.append((f"{name}: seeds within {limit} points", None if spread is None else
                           100 * spread <= limit, "one seed so far" if spread is None else _points(spread)))
    if training_minutes is not None:
        checks.append((f"all trainings <= {targets.training_budget_minutes:g} min",
                       training_minutes <= targets.training_budget_minutes, f"{training_minutes:.1f} min"))
    return checks


def _shortfall(value: float, target: float, figure: dict | None = None) -> str:
    """The value (with its count when `figure` has one), and how many points below `target` when it is."""
    text = _pct(value) + (f" ({figure['k']}/{figure['n']})" if figure and "k" in figure else "")
    return text if value >= target else f"{text}, {100 * (target - value):.1f} points short"


EXTERNAL_TARGETS = (("tumor_sensitivity", "tumor sensitivity", "external_sensitivity_target"),
                    ("tumor_specificity", "specificity", "external_specificity_target"),
                    ("accuracy", "class accuracy", "external_accuracy_target"))


def external_checks(label: str, report: dict | None, targets: ReportParams) -> list[tuple[str, bool | None, str]]:
    """The stack's tumor sensitivity, specificity and class accuracy on one external report, for all its scans and
    for each stated weighting, each where the report has scans to judge it by."""
    if report is None:
        return [(f"external `{label}`: stack tumor sensitivity >= {_pct(targets.external_sensitivity_target)}",
                 None, "not run")]
    checks = []
    cells = {"all": report["metrics"], **report.get("by_weighting", {})}
    for cell, by_model in cells.items():
        stack = by_model.get("stack", {})
        for key, words, target_name in EXTERNAL_TARGETS:
            figure, target = stack.get(key), getattr(targets, target_name)
            if not figure or figure.get("value") is None:
                continue
            where = "" if cell == "all" else f" {cell}"
            checks.append((f"external `{label}`{where}: stack {words} >= {_pct(target)}", figure["value"] >= target,
                           _shortfall(figure["value"], target, figure)))
    return checks


def seed_spreads(seeds: dict[int, dict]) -> dict[str, float | None]:
    """Full-test accuracy max - min over the seeds, per model (None with one seed)."""
    names = sorted({name for evaluation in seeds.values() for name in evaluation})
    out = {}
    for name in names:
        values = [e[name]["test"]["accuracy"] for e in seeds.values() if name in e]
        out[name] = max(values) - min(values) if len(values) > 1 else None
    return out


def seeds_table(seeds: dict[int, dict]) -> str:
    order = sorted(seeds)
    names = [n for n in [*BASE_ROWS, "soft_vote", "stack"] if any(n in seeds[s] for s in order)]
    spreads = seed_spreads(seeds)
    lines = ["| model | " + " | ".join(f"seed {s}" for s in order) + " | spread (max − min) |",
             "|---|" + "---|" * (len(order) + 1)]
    for name in names:
        cells = [_pct(seeds[s][name]["test"]["accuracy"]) if name in seeds[s] else "–" for s in order]
        spread = spreads.get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'–' if spread is None else _points(spread)} |")
    return "\n".join(lines)


def data_label(params: Params) -> str:
    """The sources the training pool came from (splits/train.csv's `source`), e.g. `kaggle+external-feltrin-dev`."""
    train = pd.read_csv(params.paths.splits / "train.csv")
    sources = sorted(set(train.source.dropna())) if "source" in train else []
    return "+".join(sources) or params.manifest.base_source


def record_run(params: Params, record: dict) -> dict[str, dict]:
    """Keep this run's figures as runs_dir/<data>-seed<seed>.json (replacing that pair's older run) and return every
    run kept, this one included, by file stem."""
    folder = Path(params.report.runs_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{record['data']}-seed{record['seed']}.json").write_text(json.dumps(record, indent=2) + "\n")
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*-seed*.json"))}


def stack_cell(record: dict, cell: str, key: str) -> dict | None:
    return record.get("audit_cells", {}).get("stack", {}).get(cell, {}).get(key)


def data_comparison(runs: dict[str, dict], seed: int, classes: list[str]) -> str:
    """For every seed run on two or more data versions (this run's seed first): those runs side by side."""
    compared = sorted({run["seed"] for run in runs.values()
                       if sum(other["seed"] == run["seed"] for other in runs.values()) > 1},
                      key=lambda s: (s != seed, s))
    if not compared:
        return "No seed has been run on two data versions so far."
    return "\n\n".join(f"### seed {s}\n\n{data_table(runs, s, classes)}" for s in compared)


def data_table(runs: dict[str, dict], seed: int, classes: list[str]) -> str:
    """The runs of one seed on each data version side by side, with the commit each trained at and its training
    time: what new data changed."""
    rows = {name: run for name, run in runs.items() if run["seed"] == seed}
    names = list(rows)
    lines = ["| | " + " | ".join(f"`{rows[n]['data']}`" for n in names) + " |", "|---|" + "---|" * len(names),
             "| trained at commit | " + " | ".join(f"`{str(rows[n].get('commit', '?'))[:7]}`" for n in names) + " |",
             "| training minutes | " + " | ".join(
                 f"{rows[n]['training_minutes']:.1f}" if rows[n].get("training_minutes") is not None else "–"
                 for n in names) + " |"]
    for model in [*BASE_ROWS, "soft_vote", "stack"]:
        lines.append(f"| {model}, full test accuracy | " + " | ".join(
            _pct(rows[n]["evaluation"][model]["test"]["accuracy"]) if model in rows[n]["evaluation"] else "–"
            for n in names) + " |")
    for cell, key, words in ((f"tumor T2-like", "tumor_sensitivity", "stack, T2-like test tumors found"),
                             (f"{NO_TUMOR} T1-like", "tumor_specificity", "stack, T1-like healthy test scans called healthy")):
        lines.append(f"| {words} | " + " | ".join(
            proportion_text(stack_cell(rows[n], cell, key)) for n in names) + " |")
    external_names = sorted({e for n in names for e in rows[n].get("external", {})})
    for external in external_names:
        cells = sorted({c for n in names for c in rows[n]["external"].get(external, {})})
        for cell in cells:
            for key, words, _ in EXTERNAL_TARGETS:
                values = [rows[n]["external"].get(external, {}).get(cell, {}).get("stack", {}).get(key)
                          for n in names]
                if any(v and v.get("value") is not None for v in values):
                    lines.append(f"| `{external}` {cell}: stack {words} | "
                                 + " | ".join(proportion_text(v) if v and v.get("value") is not None else "–"
                                              for v in values) + " |")
    return "\n".join(lines)


def class_counts(test: pd.DataFrame, classes: list[str]) -> dict[str, dict[str, int]]:
    return {"test": {c: int((test.label == c).sum()) for c in classes},
            "test_clean": {c: int(((test.label == c) & test.clean).sum()) for c in classes}}


def _figure(value: float, n: int, settings: EvaluateParams) -> str:
    """value (a proportion of n scans) with its count, and a Wilson interval below settings.interval_below."""
    k = int(round(value * n))
    figure = proportion(value, k, n, settings.interval_below, settings.confidence)
    text = f"{_pct(value)} ({k}/{n}"
    if "ci_low" in figure:
        text += f"; {round(100 * settings.confidence)}% CI {_pct(figure['ci_low'])}–{_pct(figure['ci_high'])}"
    return text + ")"


def headline_table(evaluation: dict, counts: dict[str, dict[str, int]], classes: list[str],
                   settings: EvaluateParams) -> str:
    """Full test split: accuracy, tumor sensitivity and specificity, per-class sensitivity, ECE, each with its
    count."""
    full = counts["test"]
    tumors = sum(n for c, n in full.items() if c != "notumor")
    header = ["model", "accuracy", "tumor sensitivity", "tumor specificity",
              *[f"{c} sensitivity" for c in classes], "ECE"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    n_all = sum(full.values())
    for name, sets in evaluation.items():
        m = sets["test"]
        cells = [name, _figure(m["accuracy"], n_all, settings), _figure(m["tumor_sensitivity"], tumors, settings),
                 _figure(m["tumor_specificity"], full.get("notumor", 0), settings)]
        cells += [_figure(m[f"sensitivity_{c}"], full[c], settings) for c in classes]
        cells.append(f"{m['ece']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def clean_table(evaluation: dict, counts: dict[str, dict[str, int]], classes: list[str],
                settings: EvaluateParams) -> str:
    clean = counts["test_clean"]
    header = ["model", "clean accuracy", "full accuracy", "gap (points)", *[f"clean {c} sensitivity"
                                                                           for c in classes]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, sets in evaluation.items():
        c, f = sets["test_clean"], sets["test"]
        cells = [name, _figure(c["accuracy"], sum(clean.values()), settings), _pct(f["accuracy"]),
                 f"{100 * (c['accuracy'] - f['accuracy']):+.1f}"]
        cells += [_figure(c[f"sensitivity_{k}"], clean[k], settings) if clean[k] else "no scans" for k in classes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def external_section(external: dict[str, dict | None]) -> str:
    if not external:
        return "No external report configured (params report.external_reports)."
    lines = []
    for label, report in external.items():
        if report is None:
            lines += [f"- `{label}`: not run here (`braintumor evaluate-external --source DIR --name NAME`)."]
            continue
        counts = report["counts"]
        lines += [f"### `{report['name']}` ({report['layout']} layout, {report['source']})", "",
                  f"{counts['found']} files; not scored (trained on, or duplicates of the "
                  f"{report.get('base_source', 'Kaggle')} set): "
                  f"{counts.get('dropped', counts.get('dropped_exact', 0) + counts.get('dropped_near', 0))}; scored "
                  f"{counts['scored']} ({counts['scored_tumor']} tumor, {counts['scored_healthy']} healthy).", "",
                  "| model | tumor sensitivity | tumor specificity |", "|---|---|---|"]
        for name, figures in report["metrics"].items():
            cells = []
            for key in ("tumor_sensitivity", "tumor_specificity"):
                fig = figures[key]
                if fig.get("value") is None:
                    cells.append(fig.get("note", "n/a"))
                    continue
                text = f"{_pct(fig['value'])} ({fig['k']}/{fig['n']}"
                if "ci_low" in fig:
                    text += f"; {round(100 * fig['confidence'])}% CI {_pct(fig['ci_low'])}–{_pct(fig['ci_high'])}"
                cells.append(text + ")")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


FIGURE_WORDS = {"tumor_sensitivity": "tumor sensitivity", "tumor_specificity": "healthy called healthy",
                "accuracy": "class accuracy"}


def prediction_cells(params: Params) -> dict[str, dict[str, pd.DataFrame]]:
    """{set: {model: its predictions with a `cell` column}}: the official test split by the audit's estimated
    weighting (paths.style), and val by source and weighting (the weighting the source states, else the
    estimate)."""
    from components.stack import SOFT_VOTE, STACK

    if not Path(params.paths.style).exists():
        return {}
    estimated = pd.read_parquet(params.paths.style, columns=["path", "weighting"]).rename(
        columns={"weighting": "estimated"})
    val_meta = pd.read_csv(params.paths.splits / "val.csv").reindex(columns=["path", "source", "weighting"])
    sets = {"official test, by estimated weighting": {}, "val, by source and weighting": {}}
    for name in [*params.stack.models, SOFT_VOTE, STACK]:
        folder = params.paths.predictions / name
        if not (folder / "test.parquet").exists():
            continue
        test = pd.read_parquet(folder / "test.parquet").merge(estimated, on="path", how="left")
        sets["official test, by estimated weighting"][name] = test.assign(cell=test.estimated.fillna("unknown"))
        val = pd.read_parquet(folder / "val.parquet").merge(val_meta, on="path", how="left").merge(
            estimated, on="path", how="left")
        weighting = val.weighting.where(val.weighting.notna(), val.estimated).fillna("unknown")
        sets["val, by source and weighting"][name] = val.assign(
            cell=val.source.fillna(params.manifest.base_source) + " " + weighting)
    return {name: frames for name, frames in sets.items() if frames}


def cell_figures(frames: dict[str, pd.DataFrame], classes: list[str], settings: EvaluateParams
                 ) -> dict[str, dict[str, dict]]:
    """{cell: {model: labelled_figures}} (tumor sensitivity, specificity, class accuracy, each with its count)."""
    cells = sorted({cell for frame in frames.values() for cell in frame.cell})
    return {cell: {name: labelled_figures(frame[frame.cell == cell].label.to_numpy(),
                                          frame[frame.cell == cell][probability_columns(classes)].to_numpy(),
                                          classes, settings.tumor_threshold, settings.interval_below,
                                          settings.confidence)
                   for name, frame in frames.items()} for cell in cells}


def cells_table(cells: dict[str, dict[str, dict]]) -> str:
    """One row per cell and figure, one column per model."""
    models = list(next(iter(cells.values()), {}))
    lines = ["| scans | figure | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for cell, by_model in cells.items():
        for key, words in FIGURE_WORDS.items():
            if any(key in figures and figures[key].get("value") is not None for figures in by_model.values()):
                lines.append(f"| {cell} | {words} | " + " | ".join(
                    proportion_text(by_model[m].get(key)) if by_model[m].get(key, {}).get("value") is not None
                    else "–" for m in models) + " |")
    return "\n".join(lines)


def external_cells(report: dict) -> dict[str, dict[str, dict]]:
    """An external report's figures as cells: all its scored scans, then each stated weighting."""
    return {"all": report["metrics"], **report.get("by_weighting", {})}


def plot_by_weighting(series: dict[str, dict[str, dict[str, dict]]], out: Path) -> Path | None:
    """The stack's tumor sensitivity and its healthy-called-healthy share in every cell of every set."""
    import matplotlib.pyplot as plt

    bars = []
    for set_name, cells in series.items():
        for cell, by_model in cells.items():
            for key in ("tumor_sensitivity", "tumor_specificity"):
                figure = by_model.get("stack", {}).get(key)
                if figure and figure.get("value") is not None:
                    bars.append((f"{set_name.strip('`')}: {cell}", key, figure))
    if not bars:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.32 * max(len(bars), 8) + 1.2), sharey=False)
    for axis, key in zip(axes, ("tumor_sensitivity", "tumor_specificity")):
        rows = [(label, f) for label, k, f in bars if k == key]
        labels = [label for label, _ in rows]
        values = [100 * f["value"] for _, f in rows]
        low = [100 * (f["value"] - f.get("ci_low", f["value"])) for _, f in rows]
        high = [100 * (f.get("ci_high", f["value"]) - f["value"]) for _, f in rows]
        axis.barh(range(len(rows)), values, xerr=[low, high], color="#4c72b0" if key == "tumor_sensitivity"
                  else "#55a868", capsize=2)
        for y, (_, f) in enumerate(rows):
            axis.text(1, y, f"{100 * f['value']:.0f}% of {f['n']}", va="center", color="white", fontsize=7)
        axis.set_yticks(range(len(rows)), labels, fontsize=7)
        axis.invert_yaxis()
        axis.set_xlim(0, 100)
        axis.axvline(90, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"stack: {FIGURE_WORDS[key]} (%)", fontsize=9)
    return save_figure(figure, out)


def read_external(settings: ReportParams) -> dict[str, dict | None]:
    return {Path(path).stem: (json.loads(Path(path).read_text()) if Path(path).exists() else None)
            for path in settings.external_reports}


def audit_body(params: Params) -> str:
    """The audit report's sections, one heading level down (the page links the report itself)."""
    path = params.paths.audit_report
    if not path.exists():
        return f"`{path}` not found: run `dvc repro audit`."
    body = path.read_text().split("\n", 1)[1] if path.read_text().startswith("# ") else path.read_text()
    return "\n".join(("#" + line) if line.startswith("## ") else line for line in body.splitlines()).replace(
        "../docs/audit.md", "audit.md")


def stage_times(params: Params) -> tuple[list[StageTime], list[StageTime], list[str]]:
    """Wall time of each stage's finished MLflow run, of the flow runs they ran under, and the trainings' commits."""
    import mlflow

    from components import tracking

    tracking.configure(params.tracking)
    client = mlflow.MlflowClient()

    def timed(stage: str, run) -> StageTime:
        return StageTime(stage, run.info.run_id, (run.info.end_time - run.info.start_time) / 1000,
                         run.info.start_time / 1000)

    runs = {}
    for name in params.stack.models:
        record = params.paths.models / name / "mlflow.json"
        if record.exists():
            runs[f"train@{name}"] = client.get_run(json.loads(record.read_text())["run_id"])
    experiment = mlflow.get_experiment_by_name(params.tracking.experiment)
    parent_ids = {run.data.tags.get("mlflow.parentRunId") for run in runs.values()} - {None}
    # The stage runs of the same pipeline run (children of the trainings' parent), else the latest of each stage.
    scopes = [f" and tags.mlflow.parentRunId = '{parent_ids.copy().pop()}'"] if len(parent_ids) == 1 else []
    registered = json.loads(params.paths.registered.read_text()) if params.paths.registered.exists() else {}
    if registered.get("run_id"):  # the run that created the versions this page lists
        runs["register"] = client.get_run(registered["run_id"])
    for stage in ("stack", "evaluate", "register"):
        for scope in [*scopes, ""] if stage not in runs else []:
            found = client.search_runs([experiment.experiment_id],
                                       f"tags.stage = '{stage}' and attributes.status = 'FINISHED'{scope}",
                                       order_by=["attributes.start_time DESC"], max_results=1)
            if found:
                runs[stage] = found[0]
                break
    order = [f"train@{name}" for name in params.stack.models] + ["stack", "evaluate", "register"]
    runs = {stage: runs[stage] for stage in order if stage in runs}
    times = [timed(stage, run) for stage, run in runs.items()]
    flows = []
    for parent_id in dict.fromkeys(r.data.tags.get("mlflow.parentRunId") for r in runs.values()):
        parent = client.get_run(parent_id) if parent_id else None
        if parent and parent.info.end_time:
            ran = ", ".join(stage for stage, run in runs.items() if run.data.tags.get("mlflow.parentRunId") == parent_id)
            flows.append(timed(f"train_pipeline flow run, {parent.info.status.lower()} (ran {ran})", parent))
    commits = sorted({run.data.tags.get("git_commit", "unknown") for stage, run in runs.items()
                      if stage.startswith("train@")})
    return times, flows, commits


def training_setups(params: Params) -> list[TrainingSetup]:
    """The setup of each model in stack.models, read from the MLflow run its models/<name>/mlflow.json names."""
    import mlflow

    from components import tracking

    tracking.configure(params.tracking)
    client = mlflow.MlflowClient()
    setups = []
    for name in params.stack.models:
        record = params.paths.models / name / "mlflow.json"
        run = client.get_run(json.loads(record.read_text())["run_id"]) if record.exists() else None
        setups.append(training_setup(name, run.data.tags if run else None, run.data.params if run else None,
                                     params.model(name).weights))
    return setups


def learning_curves(params: Params) -> dict[str, pd.DataFrame]:
    """Per model: minutes since its training run started, and train.monitor, at the end of every epoch (the MLflow
    metric history of the run its models/<name>/mlflow.json names)."""
    import mlflow

    from components import tracking

    tracking.configure(params.tracking)
    client = mlflow.MlflowClient()
    curves = {}
    for name in params.stack.models:
        record = params.paths.models / name / "mlflow.json"
        if not record.exists():
            continue
        run = client.get_run(json.loads(record.read_text())["run_id"])
        history = client.get_metric_history(run.info.run_id, params.train.monitor)
        if history:
            curves[name] = pd.DataFrame({
                "epoch": [m.step + 1 for m in history],
                "minutes": [(m.timestamp - run.info.start_time) / 60_000 for m in history],
                params.train.monitor: [m.value for m in history]}).sort_values("epoch").reset_index(drop=True)
    return curves


def curves_section(curves: dict[str, pd.DataFrame], monitor: str, image: str | None) -> str:
    """Each curve's best epoch and whether it was still improving at the end, then the plot."""
    lines = []
    for name, curve in curves.items():
        best = curve.loc[curve[monitor].idxmin() if "loss" in monitor else curve[monitor].idxmax()]
        rising = best.epoch >= len(curve) - 1  # the best epoch is the last or the one before it
        lines.append(f"- {name}: best {monitor} {_pct(best[monitor])} at epoch {int(best.epoch)} of {len(curve)} "
                     f"({best.minutes:.1f} of {curve.minutes.iloc[-1]:.1f} min); "
                     + ("**still improving when its epochs ran out**" if rising else "flat or falling at the end"))
    if not lines:
        return "- no training run found in MLflow"
    return "\n".join(lines) + (f"\n\n![{monitor} against training minutes]({image})" if image else "")


def reproducibility_text(params: Params) -> str:
    """What a re-run of this page's run reproduces, by `train.deterministic`."""
    search = (f"FLAML searches the meta-learner for a fixed time (`stack.time_budget` {params.stack.time_budget:g} s), "
              "so the stack can differ where the search got further; the seed table above is the measured spread.")
    if params.train.deterministic:
        return ("Training is bit-exact on the same machine type (`train.deterministic: true`: op determinism and "
                "ordered `tf.data`); another CPU changes the last bits of its kernels, and so the models. " + search)
    return ("Training is seeded but not bit-exact (`train.deterministic: false`: multi-threaded CPU kernels and "
            "unordered `tf.data`). " + search)


def profile_table(params: Params, setups: list[TrainingSetup] | None = None) -> str:
    """One row per model; the weights column is what each training logged when `setups` has it."""
    logged = {s.model: s.weights for s in setups or []}
    lines = ["| model | image size | batch | epochs (max) | epochs run | best val accuracy | weights |",
             "|---|---|---|---|---|---|---|"]
    for name in params.stack.models:
        model = params.model(name)
        history_file = params.paths.plots / name / "history.csv"
        history = pd.read_csv(history_file) if history_file.exists() else pd.DataFrame()
        best = _pct(history[params.train.monitor].max()) if params.train.monitor in history else "n/a"
        lines.append(f"| {name} | {model.image_size} | {model.batch_size} | {model.epochs} | {len(history)} | "
                     f"{best} | {logged.get(name, model.weights)} |")
    return "\n".join(lines)


def write_report(params: Params, commit: str) -> Path:
    """Write params.report.out from the run's outputs; returns its path."""
    settings = params.report
    evaluation_file = params.paths.metrics / "evaluation.json"
    if not evaluation_file.exists():
        raise FileNotFoundError(f"{evaluation_file} not found: run `dvc repro` (or `braintumor flow train`) "
                                "before `braintumor report`")
    evaluation = json.loads(evaluation_file.read_text())
    test = pd.read_csv(params.paths.splits / "test.csv")
    registered_file = params.paths.registered
    registered = json.loads(registered_file.read_text()) if registered_file.exists() else {}
    times, flows, training_commits = stage_times(params)
    setups = training_setups(params)
    training_seconds = busy_seconds([t for t in times if t.stage.startswith("train@")])

    figures = Path(settings.figures)
    figures.mkdir(parents=True, exist_ok=True)
    plots = []
    for source in ("confusion_stack.png", "reliability.png"):
        if (params.paths.plots / "evaluation" / source).exists():
            shutil.copy2(params.paths.plots / "evaluation" / source, figures / source)
            plots.append(f"![{source}]({figures.relative_to(Path(settings.out).parent).as_posix()}/{source})")

    curves = learning_curves(params)
    curves_image = None
    if curves:
        plot_learning_curves(curves, params.train.monitor, figures / "learning_curves.png")
        curves_image = f"{figures.relative_to(Path(settings.out).parent).as_posix()}/learning_curves.png"
    audit_file = params.paths.metrics / "audit.json"
    audit = json.loads(audit_file.read_text()) if audit_file.exists() else None
    external = read_external(settings)
    predicted_cells = {name: cell_figures(frames, params.data.classes, params.evaluate)
                       for name, frames in prediction_cells(params).items()}
    weighting_series = {**predicted_cells, **{f"`{name}`": external_cells(report)
                                              for name, report in external.items() if report}}
    weighting_image = plot_by_weighting(weighting_series, figures / "by_weighting.png")
    data = data_label(params)
    runs = record_run(params, {
        "data": data, "seed": params.seed, "commit": commit, "training_commits": training_commits,
        "data_hash": data_hash(params.paths.raw.with_name(params.paths.raw.name + ".dvc")),
        "smoke": params.tracking.smoke, "evaluation": evaluation,
        "audit_cells": (audit or {}).get("test_cells", {}),
        "external": {name: external_cells(report) for name, report in external.items() if report},
        "training_minutes": round(training_seconds / 60, 1)})
    seeds = {run["seed"]: run["evaluation"] for run in runs.values() if run["data"] == data}
    counts = class_counts(test, params.data.classes)
    checks = target_checks(evaluation, settings, audit, external, seeds, training_seconds / 60)
    stage_lines = ["| stage | MLflow run | wall time |", "|---|---|---|"]
    stage_lines += [f"| {t.stage} | `{t.run_id}` | {t.seconds / 60:.1f} min |" for t in times]
    stage_lines.append(f"| **all trainings** (wall time, trainings at once counted once) | | "
                       f"**{training_seconds / 60:.1f} min** (budget {settings.training_budget_minutes:g} min) |")
    stage_lines += [f"| {flow.stage} | `{flow.run_id}` | {flow.seconds / 60:.1f} min |" for flow in flows]
    versions = registered.get("versions", {})
    version_lines = [f"- `{name}` version {v} (alias `{registered.get('alias', '')}`)" for name, v in versions.items()]
    verdict = {True: "yes", False: "**no**", None: "not measured"}
    clean_counts = ", ".join(f"{c} {n}" for c, n in counts["test_clean"].items())
    full_counts = ", ".join(f"{c} {n}" for c, n in counts["test"].items())

    smoke = ("**SMOKE RUN** (`tracking.smoke: true`, the quick profile): a small sample at a small size, to see every "
             "stage run once. These figures measure nothing.\n\n" if params.tracking.smoke else "")
    text = f"""# {"Smoke run, not a result: " if params.tracking.smoke else ""}Results: {headline(setups)}, trained on `{data}`

{smoke}_Written by `braintumor report` from the run's own outputs ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC).
Do not edit by hand: re-run the profile, then `braintumor report`._

- **Code:** trained at git commit {', '.join(f"`{c}`" for c in training_commits)} (the trainings' MLflow
  `git_commit` tags; `dvc.lock` holds the hash of every stage's code); page written at `{commit}`
- **Data:** DVC hash of `{params.paths.raw}` `{data_hash(params.paths.raw.with_name(params.paths.raw.name + '.dvc'))}`
{chr(10).join(hardware_lines(setups))}
- **Page written on:** {platform.machine()}, {_cpu_count()} cores; seed {params.seed}
- **Test sets:** the full official test split, {len(test)} scans ({full_counts}), is the headline: the split stage
  removed every exact and near twin of its images from training. Its clean subset, {int(test.clean.sum())} scans
  ({clean_counts}), has no near duplicate even in the official Training folder; it checks for residual leakage,
  and its healthy class is too small to carry a headline (`docs/near-duplicates.md`).
- **Counts:** every figure shows its count; those resting on fewer than {params.evaluate.interval_below} scans also
  show a {round(100 * params.evaluate.confidence)}% Wilson interval.

## Targets

| target | met | value |
|---|---|---|
""" + "\n".join(f"| {what} | {verdict[met]} | {value} |" for what, met, value in checks) + f"""

## Full test split ({len(test)} scans)

Tumor sensitivity: share of glioma, meningioma and pituitary scans called tumor (1 − P(notumor) ≥
{params.evaluate.tumor_threshold}, the one tumor call of every table here); specificity: share of `notumor` scans not
called tumor.

{headline_table(evaluation, counts, params.data.classes, params.evaluate)}

## Clean subset ({int(test.clean.sum())} scans: {clean_counts})

{clean_table(evaluation, counts, params.data.classes, params.evaluate)}

## Shortcut audit

From [`{params.paths.audit_report}`](../{params.paths.audit_report.as_posix()}); method and its check in
[audit.md](audit.md).

{audit_body(params)}

## External scans (another collection)

{external_section(external)}

## By MRI weighting

Every figure in one tumor call, per MRI weighting: the official test split by the audit's estimated weighting
(T1-like, T2-like), val by source and weighting (the weighting a source states, else the estimate), and every
external report by the weighting it states. Under {params.evaluate.interval_below} scans a figure shows its
{round(100 * params.evaluate.confidence)}% Wilson interval.

{weighting_figure_line(weighting_image, figures, settings)}

{chr(10).join(f"### {name}{chr(10)}{chr(10)}{cells_table(cells)}{chr(10)}" for name, cells in weighting_series.items())}

## Seeds

Full-test accuracy of every run on this page's data (`{data}`) kept in `{settings.runs_dir}` (this run: seed
{params.seed}).

{seeds_table(seeds)}

## New data: the same seed on each data version

The runs kept in `{settings.runs_dir}` of one seed on each data version: what the data changed, where the code (the
commit each trained at) is the same. Training minutes depend on the machine (the CPU model is in each run's
console, not in these files).

{data_comparison(runs, params.seed, params.data.classes)}

## Profile

{profile_table(params, setups)}

### {params.train.monitor} against training minutes

Where a target is out of reach, this is how far the budget went: every model's {params.train.monitor} at the end
of each epoch against the minutes since its training started (MLflow metric history; the first epoch includes
decoding and caching the images).

{curves_section(curves, params.train.monitor, curves_image)}

## Wall time

{chr(10).join(stage_lines)}

## The stack: confusion matrix (official test) and reliability

{chr(10).join(plots)}

## MLflow

Registered by run `{registered.get('run_id', 'n/a')}`:

{chr(10).join(version_lines) or '- nothing registered'}

## Reproducing

`dvc repro` (or `braintumor flow train`) on this commit and data, then `braintumor report`; a second seed with
`braintumor flow train -S seed=43`. {reproducibility_text(params)}
"""
    out = Path(settings.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def weighting_figure_line(image: Path | None, figures: Path, settings: ReportParams) -> str:
    if image is None:
        return ""
    return (f"![stack: tumor sensitivity and healthy scans called healthy, by weighting and set]"
            f"({figures.relative_to(Path(settings.out).parent).as_posix()}/{image.name})")


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0
