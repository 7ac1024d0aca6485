"""`braintumor report`: docs/results.md written from a finished run's own outputs, never typed by hand.

It reads the evaluation metrics, the splits, each training's history and MLflow run, the registered versions and
the data hash, checks the targets in params, and copies the stack's plots next to the page.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from components.config import Params, ReportParams
from components.data_import import data_hash

BASE_ROWS = ("custom_cnn", "mobilenetv2", "densenet169", "resnet50")
TEST_SETS = {"test": "official test", "test_clean": "clean test"}
# components/models.py builds custom_cnn without a Keras application backbone: its `weights` is never loaded.
NO_BACKBONE = frozenset({"custom_cnn"})
UNKNOWN = "unknown"


@dataclass(frozen=True)
class StageTime:
    stage: str
    run_id: str
    seconds: float


@dataclass(frozen=True)
class TrainingSetup:
    """What one training ran on and started from, as its MLflow run recorded it."""

    model: str
    device: str  # "GPU" | "CPU" (tag `device` of tracking.system_info) | "unknown" (no run found)
    gpu_name: str  # tag `gpu_name`: "none" on a CPU
    mixed_precision: bool  # tag `mixed_precision` of devices.configure_tensorflow
    host: str
    weights: str  # "imagenet" | "none" | a weights file

    @property
    def pretrained(self) -> bool:
        return self.weights != "none" and self.model not in NO_BACKBONE


def training_setup(model: str, tags: dict[str, str] | None, run_params: dict[str, str] | None,
                   params_weights: str) -> TrainingSetup:
    """A training's setup from its run's tags and logged params (`models.<model>.weights`); `tags` None: no run was
    found, so the device is unknown and the weights are those of params.yaml."""
    tags, run_params = tags or {}, run_params or {}
    return TrainingSetup(model=model, device=tags.get("device", UNKNOWN), gpu_name=tags.get("gpu_name", "none"),
                         mixed_precision=tags.get("mixed_precision") == "True", host=tags.get("host", UNKNOWN),
                         weights=run_params.get(f"models.{model}.weights", params_weights))


def _device_text(setup: TrainingSetup) -> str:
    if setup.device == "GPU":
        name = f" ({setup.gpu_name})" if setup.gpu_name not in ("", "none") else ""
        return f"GPU{name}{', mixed precision' if setup.mixed_precision else ''}"
    if setup.device == "CPU":
        return "CPU (no GPU visible)"
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


def target_checks(evaluation: dict, targets: ReportParams) -> list[tuple[str, bool, str]]:
    """(what, met, detail) for the profile's targets on the clean test set."""
    clean = {name: sets["test_clean"]["accuracy"] for name, sets in evaluation.items()}
    base = {name: clean[name] for name in BASE_ROWS if name in clean}
    checks = [(f"{name} >= {_pct(targets.base_model_target)}", acc >= targets.base_model_target, _pct(acc))
              for name, acc in base.items()]
    if "stack" in clean:
        stack = clean["stack"]
        checks.append((f"stack >= {_pct(targets.stack_target)}", stack >= targets.stack_target, _pct(stack)))
        best_name = max(base, key=base.get)
        checks.append((f"stack above the best single model ({best_name})", stack > base[best_name],
                       f"{_pct(stack)} vs {_pct(base[best_name])}"))
        if "soft_vote" in clean:
            checks.append(("stack above soft voting", stack > clean["soft_vote"],
                           f"{_pct(stack)} vs {_pct(clean['soft_vote'])}"))
    return checks


def stage_times(params: Params) -> tuple[list[StageTime], list[StageTime], list[str]]:
    """Wall time of each stage's finished MLflow run, of the flow runs they ran under, and the trainings' commits."""
    import mlflow

    from components import tracking

    tracking.configure(params.tracking)
    client = mlflow.MlflowClient()

    def timed(stage: str, run) -> StageTime:
        return StageTime(stage, run.info.run_id, (run.info.end_time - run.info.start_time) / 1000)

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
    training_seconds = sum(t.seconds for t in times if t.stage.startswith("train@"))

    figures = Path(settings.figures)
    figures.mkdir(parents=True, exist_ok=True)
    plots = []
    for source in ("confusion_stack.png", "reliability.png"):
        if (params.paths.plots / "evaluation" / source).exists():
            shutil.copy2(params.paths.plots / "evaluation" / source, figures / source)
            plots.append(f"![{source}]({figures.relative_to(Path(settings.out).parent).as_posix()}/{source})")

    checks = target_checks(evaluation, settings)
    stage_lines = ["| stage | MLflow run | wall time |", "|---|---|---|"]
    stage_lines += [f"| {t.stage} | `{t.run_id}` | {t.seconds / 60:.1f} min |" for t in times]
    stage_lines.append(f"| **all trainings** | | **{training_seconds / 60:.1f} min** "
                       f"(budget {settings.training_budget_minutes} min) |")
    stage_lines += [f"| {flow.stage} | `{flow.run_id}` | {flow.seconds / 60:.1f} min |" for flow in flows]
    versions = registered.get("versions", {})
    version_lines = [f"- `{name}` version {v} (alias `{registered.get('alias', '')}`)" for name, v in versions.items()]

    text = f"""# Results: {headline(setups)}, on the full shared data set

_Written by `braintumor report` from the run's own outputs ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC).
Do not edit by hand: re-run the profile, then `braintumor report`._

- **Code:** trained at git commit {', '.join(f"`{c}`" for c in training_commits)} (the trainings' MLflow
  `git_commit` tags; `dvc.lock` holds the hash of every stage's code); page written at `{commit}`
- **Data:** DVC hash of `{params.paths.raw}` `{data_hash(params.paths.raw.with_name(params.paths.raw.name + '.dvc'))}`
{chr(10).join(hardware_lines(setups))}
- **Page written on:** {platform.machine()}, {_cpu_count()} cores
- **Test sets:** official test {len(test)} images; clean test {int(test.clean.sum())} images (no near-duplicate
  in the official Training folder, see `docs/near-duplicates.md`)

## Profile

{profile_table(params, setups)}

## Comparison on both test sets

Tumor sensitivity: share of glioma, meningioma and pituitary scans not called `notumor`.

{comparison_table(evaluation, params.data.classes)}

## Targets (clean test)

| target | met | value |
|---|---|---|
""" + "\n".join(f"| {what} | {'yes' if met else '**no**'} | {value} |" for what, met, value in checks) + f"""

## Wall time

{chr(10).join(stage_lines)}

## The stack: confusion matrix (official test) and reliability

{chr(10).join(plots)}

## MLflow

Registered by run `{registered.get('run_id', 'n/a')}`:

{chr(10).join(version_lines) or '- nothing registered'}

## Reproducing

`dvc repro` (or `braintumor flow train`) on this commit and data, then `braintumor report`. Training is seeded but
not bit-exact (`train.deterministic: false`; multi-threaded CPU kernels), and FLAML searches for a fixed time, so
a re-run is expected within {_pct(settings.tolerance)} accuracy of each row above, not identical.
"""
    out = Path(settings.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0
