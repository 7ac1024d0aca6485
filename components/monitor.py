"""Drift monitoring of a batch of incoming scans against the reference profile of the training data
(components.reference): `braintumor flow monitor DIR`, and the end of every `batch_predict`.

The batch (the scans that passed the GX checks of components.validate.screen_folder) is scored by the ensemble and embedded by
the profile's embedding model, decoded as training decodes (the profile records how). Then four checks, each against
a threshold of params monitor:

- embedding drift: Evidently's EmbeddingsDrift (the 0.7 API: Dataset, DataDefinition, Report) with its model method,
  whose score is the ROC AUC of a classifier telling the batch's embeddings from the training ones (0.5: alike);
- style drift: Evidently's column drift (DriftedColumnsCount, and ValueDrift per feature) on the acquisition-style
  features of components.style, batch against training images;
- class-mix shift: the stack's predicted class shares against those it predicted on val, as a total-variation
  distance, which only counts when a chi-square test of the two count tables says it is not sampling noise;
- out-of-distribution (OOD) share: the scans whose embedding lies farther from the training embeddings than the
  profile's threshold, each listed by file.

With fewer than monitor.min_scans usable scans only the OOD list is given, and no verdict. The report (Evidently's
HTML, a summary page, the per-scan table) goes to monitor.out_dir/<batch>-<stamp>/, and one MLflow run per batch
holds the metrics, the report and tags naming the model and the champion version.

The model: by default the workspace's trained models and its profile (paths.reference), as `dvc repro` left them;
with a model URI, that registered ensemble and the `reference` artifact it was registered with.
"""

from __future__ import annotations

import html
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import Params, ProjectError
from components.reference import (
    EMBEDDINGS,
    Reference,
    embed,
    embedding_columns,
    embedding_extractor,
    load_reference,
    neighbour_distance,
)
from components.drift import (
    CHECKS,
    class_mix_distance,
    embedding_score,
    ranked_style,
    statistics,
    style_distances,
    thresholds_at,
)
from components.stack import STACK
from components.style import STYLE_FEATURES, style_frame

log = logging.getLogger(__name__)

REFERENCE_ARTIFACT = "reference"  # the ensemble pyfunc's artifact holding the profile (components.register)
EMBEDDING_NAME = "pool"  # the embedding's name in Evidently's DataDefinition
SHOWN_FILES = 50  # OOD files listed in the summary page and the Prefect artifact (scans.csv lists every one)


class NoReference(ProjectError):
    """The model to monitor with carries no reference profile."""


def registry_reference(model_uri: str) -> Path:
    """The local folder of the `reference` artifact of the ensemble `model_uri` names."""
    import mlflow
    from mlflow.models import get_model_info

    artifacts = get_model_info(model_uri).flavors.get("python_function", {}).get("artifacts") or {}
    if REFERENCE_ARTIFACT not in artifacts:
        raise NoReference(f"{model_uri} carries no {REFERENCE_ARTIFACT!r} artifact (registered before monitoring "
                          "existed, or not an ensemble): register a new version (`dvc repro register`), monitor with "
                          "the workspace's models (no --model-uri), or set monitor.after_batch_predict: false")
    return Path(mlflow.artifacts.download_artifacts(f"{model_uri}/{artifacts[REFERENCE_ARTIFACT]['path']}"))


def registry_tags(params: Params, model_uri: str | None) -> dict[str, str]:
    """Tags linking a monitoring run to the registry: the registered ensemble, its champion version (by alias) and,
    for a models:/ URI, the version monitored."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from components.promote import CHAMPION
    from components.register import ENSEMBLE, registered_name

    client = MlflowClient()
    name = registered_name(params, ENSEMBLE)
    tags = {"registered_model": name, "model_uri": model_uri or "workspace"}
    try:
        tags["champion_version"] = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:  # no champion yet
        tags["champion_version"] = "none"
    if model_uri and model_uri.startswith("models:/"):
        target = model_uri.removeprefix("models:/").rstrip("/")
        model, at, alias = target.partition("@")
        try:
            version = (client.get_model_version_by_alias(model, alias).version if at
                       else target.split("/", 1)[1] if "/" in target else None)
        except MlflowException:
            version = None
        if version is not None:
            tags["model_version"] = f"{model if at else target.split('/', 1)[0]}/{version}"
    return tags


def load_model(params: Params, model_uri: str | None):
    """(scorer, what it is, reference profile): the workspace's ensemble and paths.reference, or the registered
    ensemble `model_uri` and its `reference` artifact."""
    from components.predict import load_scorer

    scorer, what = load_scorer(params, model_uri)
    reference = load_reference(params.paths.reference if model_uri is None else registry_reference(model_uri))
    name = reference.meta["embedding_model"]
    if name not in getattr(scorer, "models", {}):
        raise ProjectError(f"the reference profile {reference.folder} embeds with {name!r}, which {what} does not "
                           f"hold (it has {', '.join(getattr(scorer, 'models', {}))}): rebuild the profile "
                           "(`dvc repro reference`) with a monitor.embedding_model of stack.models")
    return scorer, what, reference


def class_mix_shift(reference_counts: dict[str, int], batch_counts: dict[str, int]) -> dict:
    """Total-variation distance between the two class mixes, and the p-value of a chi-square test that both count
    tables come from one mix (scipy's chi2_contingency): the reference mix is itself estimated from the val
    predictions, so the test weighs the sampling noise of both."""
    from scipy.stats import chi2_contingency

    classes = list(reference_counts)
    ref = np.array([reference_counts[c] for c in classes], dtype=float)
    got = np.array([batch_counts.get(c, 0) for c in classes], dtype=float)
    ref_share = ref / max(ref.sum(), 1.0)
    share = got / got.sum() if got.sum() else np.zeros_like(got)
    table = np.stack([ref, got])[:, (ref + got) > 0]  # a class neither side predicted says nothing
    p_value = float(chi2_contingency(table).pvalue) if got.sum() and ref.sum() and table.shape[1] > 1 else 1.0
    predicted = np.repeat(classes, got.astype(int))
    return {"distance": class_mix_distance(dict(zip(classes, ref_share)), predicted), "p_value": p_value,
            "reference_share": dict(zip(classes, ref_share.round(4).tolist())),
            "batch_share": dict(zip(classes, share.round(4).tolist()))}


def drift_report(reference: Reference, embeddings: np.ndarray, style: pd.DataFrame, limits: dict[str, float]):
    """Evidently's report of the batch against the training images, its tests set to the batch's calibrated
    thresholds: (snapshot, style columns left out because one side has no value)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift
    from evidently.metrics.embeddings import ModelDriftMethod

    columns = embedding_columns(embeddings.shape[1])
    reference_rows = pd.read_parquet(reference.folder / EMBEDDINGS).merge(reference.style, on="path")
    # Standardised by the training embeddings' mean and spread, as components.drift scores them.
    mean, spread = reference.embeddings.mean(axis=0), reference.embeddings.std(axis=0) + 1e-8
    reference_rows[columns] = (reference_rows[columns].to_numpy() - mean) / spread
    # Style columns as percentiles of the training images' values, as components.drift scores them.
    reference_rows[STYLE_FEATURES] = ranked_style(reference.style, reference_rows, STYLE_FEATURES)
    current_rows = pd.concat([pd.DataFrame((embeddings - mean) / spread, columns=columns),
                              ranked_style(reference.style, style, STYLE_FEATURES).reset_index(drop=True)], axis=1)
    compared = [c for c in STYLE_FEATURES if reference_rows[c].notna().any() and current_rows[c].notna().any()]
    left_out = [c for c in STYLE_FEATURES if c not in compared]
    definition = DataDefinition(numerical_columns=compared, embeddings={EMBEDDING_NAME: columns})
    report = Report([EmbeddingsDrift(embeddings_name=EMBEDDING_NAME,
                                     drift_method=ModelDriftMethod(threshold=limits["embedding drift"])),
                     *[ValueDrift(column=c, method="wasserstein", threshold=limits["style drift"]) for c in compared]],
                    include_tests=True)
    with warnings.catch_warnings():  # Evidently's statistics warn on constant columns (image sizes)
        warnings.simplefilter("ignore")
        snapshot = report.run(Dataset.from_pandas(current_rows[columns + compared], data_definition=definition),
                              Dataset.from_pandas(reference_rows[columns + compared], data_definition=definition))
    return snapshot, left_out


def _checks(values: dict[str, float], limits: dict[str, float], size: int) -> list[dict]:
    """Each check's statistic against its threshold calibrated for a batch of `size` scans (components.drift)."""
    return [{"check": check, "value": values[check], "threshold": limits[check],
             "rule": f"> {limits[check]:.3f} (calibrated for {size} scans)", "drift": values[check] > limits[check]}
            for check in CHECKS]


def monitor_paths(params: Params, source: Path, paths: list[str], quarantine: pd.DataFrame, out_dir: Path,
                  model_uri: str | None = None, tags: dict[str, str] | None = None, loaded=None) -> dict:
    """Monitor the scans `paths` of the batch folder `source` (those that passed the GX checks; `quarantine` lists
    the others) and write the report into `out_dir`; returns the summary (also out_dir/summary.json). `loaded`
    replaces what load_model(params, model_uri) returns; with no scan to score no model is loaded."""
    import mlflow

    from components import tracking
    from components.predict import score_files

    source, out_dir = Path(source), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking.configure(params.tracking)
    if paths:
        scorer, what, reference = loaded or load_model(params, model_uri)
        classes = list(scorer.classes)
        probabilities, scored, refused = score_files(scorer, paths)
    else:  # nothing passed the GX checks: nothing to compare, no model needed
        what, reference = model_uri or "workspace", None
        classes, probabilities, scored, refused = params.data.classes, {}, [], {}
    scored_paths = [paths[i] for i in scored]
    files = [_relative(p, source) for p in scored_paths]
    if scored_paths:
        extractor = embedding_extractor(scorer.models[reference.meta["embedding_model"]])
        embeddings = embed(extractor, scored_paths, reference.preprocess, params.train.eval_batch_size)
        distances = neighbour_distance(reference.embeddings, embeddings, int(reference.meta["neighbours"]))
    else:
        embeddings, distances = np.zeros((0, 0), dtype=np.float32), np.zeros(0)
    threshold = reference.threshold if reference is not None else float("nan")
    stack = probabilities.get(STACK, np.zeros((0, len(classes))))
    predicted = np.asarray(classes)[stack.argmax(axis=1)] if len(stack) else np.array([], dtype=str)
    scans = pd.DataFrame({"file": files, "predicted_class": predicted, "distance": distances,
                          "ood": distances > threshold})
    for k, name in enumerate(classes):
        scans[f"prob_{name}"] = stack[:, k] if len(stack) else []
    scans.sort_values("distance", ascending=False).to_csv(out_dir / "scans.csv", index=False)
    quarantine.to_csv(out_dir / "quarantine.csv", index=False)

    n = len(scans)
    metrics = {"scans": n, "quarantined": len(quarantine), "refused": len(refused),
               "ood_count": int(scans.ood.sum()), "ood_share": float(scans.ood.mean()) if n else 0.0}
    summary = {
        "batch": str(source), "model": what, "reference": str(reference.folder) if reference else None,
        "out_dir": str(out_dir), "report": str(out_dir / "index.html"), "classes": classes,
        "verdict": n >= params.monitor.min_scans, "ood_threshold": threshold if reference else None,
        "ood_percentile": reference.meta["ood_percentile"] if reference else params.monitor.ood_percentile,
        "ood_files": scans[scans.ood].sort_values("distance", ascending=False)[["file", "distance"]]
        .to_dict(orient="records"),
        "refused": [{"file": _relative(paths[i], source), "reason": why} for i, why in refused.items()],
        "quarantine": quarantine.to_dict(orient="records"),
    }
    if summary["verdict"]:
        if "calibration" not in reference.meta:
            raise NoReference(f"the reference profile {reference.folder} has no calibrated drift thresholds (made "
                              "before calibration existed): rebuild it (`dvc repro reference`), then register again")
        style = style_frame(scored_paths, params.manifest.workers)
        limits = thresholds_at(reference.meta["calibration"], n)
        mean, spread = reference.embeddings.mean(axis=0), reference.embeddings.std(axis=0) + 1e-8
        distances_by_column = style_distances(reference.style, style, STYLE_FEATURES)
        values = statistics(embedding_score((reference.embeddings - mean) / spread, (embeddings - mean) / spread),
                            distances_by_column, class_mix_distance(reference.meta["class_mix"], predicted),
                            metrics["ood_share"])
        snapshot, left_out = drift_report(reference, embeddings, style, limits)
        snapshot.save_html(str(out_dir / "drift.html"))
        mix = class_mix_shift(reference.meta["class_counts"], {c: int((predicted == c).sum()) for c in classes})
        drifted = sorted(c for c, d in distances_by_column.items() if d > limits["style drift"])
        metrics |= {"embedding_drift_score": values["embedding drift"], "style_max_distance": values["style drift"],
                    "style_drifted_columns": len(drifted), "class_mix_distance": values["class-mix shift"],
                    "class_mix_p_value": mix["p_value"]}
        checks = _checks(values, limits, n)
        summary |= {"checks": checks, "style_drifted": drifted, "style_distances": distances_by_column,
                    "style_left_out": left_out, "class_mix": mix, "drift_report": str(out_dir / "drift.html"),
                    "thresholds": limits}
    else:
        checks = []
        summary["checks"] = []
        summary["why_no_verdict"] = (f"{n} usable scans, fewer than monitor.min_scans = {params.monitor.min_scans}: "
                                     "too few for the drift tests; only the OOD scans are listed")
    summary["reasons"] = [c["check"] for c in checks if c["drift"]]
    summary["drift"] = bool(summary["reasons"])
    summary["metrics"] = metrics

    run_tags = {**registry_tags(params, model_uri), **(tags or {}), "batch": str(source),
                "drift": str(summary["drift"]).lower(), "drift_reasons": ", ".join(summary["reasons"]) or "none"}
    summary["tags"] = run_tags
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out_dir / "index.html").write_text(summary_html(summary))
    with tracking.stage_run(params, f"monitor-{source.name}", "monitor") as run:
        mlflow.set_tags(run_tags)
        mlflow.log_params({f"monitor.{k}": v for k, v in params.monitor.model_dump(mode="json").items()}
                          | {"model": what[:500], "ood_threshold": _value(summary["ood_threshold"])})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_artifacts(str(out_dir), "monitoring")
    summary["mlflow_run_id"] = run.info.run_id
    log.info("%s: %d scans, %d OOD, drift: %s", source, n, metrics["ood_count"],
             ", ".join(summary["reasons"]) or "none")
    return summary


def _relative(path: str, source: Path) -> str:
    try:
        return Path(path).resolve().relative_to(source.resolve()).as_posix()
    except ValueError:
        return str(path)


def _value(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(summary: dict) -> str:
    """The summary as markdown (the Prefect artifact)."""
    metrics = summary["metrics"]
    verdict = ("**drift: " + ", ".join(summary["reasons"]) + "**" if summary["drift"] else
               "no drift" if summary["verdict"] else f"no verdict: {summary['why_no_verdict']}")
    lines = [f"# Monitoring: `{summary['batch']}`", "",
             f"{verdict} · {metrics['scans']} scans scored, {metrics['quarantined']} quarantined, "
             f"{metrics['refused']} refused · model: {summary['model']} · report: `{summary['report']}`", ""]
    if summary["checks"]:
        lines += ["| check | value | drift when | drift |", "|---|---|---|---|"]
        lines += [f"| {c['check']} | {_value(c['value'])} | {c['rule']} | {'yes' if c['drift'] else 'no'} |"
                  for c in summary["checks"]]
        if summary["style_drifted"]:
            lines += ["", "Drifted style features: " + ", ".join(summary["style_drifted"])]
    ood = summary["ood_files"]
    lines += ["", f"## Out of distribution: {len(ood)} of {metrics['scans']} (distance > "
              f"{_value(summary['ood_threshold'])}, the {summary['ood_percentile']:g}th percentile of val images)", ""]
    lines += [f"- `{row['file']}` ({row['distance']:.3f})" for row in ood[:SHOWN_FILES]]
    if len(ood) > SHOWN_FILES:
        lines.append(f"- ... {len(ood) - SHOWN_FILES} more in scans.csv")
    return "\n".join(lines) + "\n"


def summary_html(summary: dict) -> str:
    """The report's first page: the verdict, the checks, the class mix and the OOD files, linking Evidently's
    report and the GX Data Docs."""
    e = html.escape
    metrics = summary["metrics"]
    rows = "".join(f"<tr><td>{e(c['check'])}</td><td>{e(_value(c['value']))}</td><td>{e(c['rule'])}</td>"
                   f"<td>{'<b>yes</b>' if c['drift'] else 'no'}</td></tr>" for c in summary["checks"])
    verdict = ("<b>Drift: " + e(", ".join(summary["reasons"])) + "</b>" if summary["drift"] else
               "No drift." if summary["verdict"] else "No verdict: " + e(summary["why_no_verdict"]))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Monitoring {e(Path(summary['batch']).name)}"
             "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px}</style></head><body>",
             f"<h1>Monitoring: {e(summary['batch'])}</h1><p>{verdict}</p>",
             f"<p>{metrics['scans']} scans scored, {metrics['quarantined']} quarantined by the GX checks "
             f"(<a href='validation/index.html'>Data Docs</a>), {metrics['refused']} refused by the model. "
             f"Model: {e(summary['model'])}. "
             f"Reference: {e(summary['reference'] or 'none loaded (no scan to compare)')}.</p>"]
    if rows:
        parts.append("<table><tr><th>check</th><th>value</th><th>drift when</th><th>drift</th></tr>"
                     f"{rows}</table>")
        parts.append("<p>Drifted style features: " + (e(", ".join(summary["style_drifted"])) or "none")
                     + (f"; not compared (no values): {e(', '.join(summary['style_left_out']))}"
                        if summary["style_left_out"] else "") + ".</p>")
        mix = summary["class_mix"]
        parts.append("<h2>Predicted class mix</h2><table><tr><th>class</th><th>reference (val)</th><th>batch</th>"
                     "</tr>" + "".join(f"<tr><td>{e(c)}</td><td>{mix['reference_share'][c]:.3f}</td>"
                                       f"<td>{mix['batch_share'][c]:.3f}</td></tr>" for c in summary["classes"])
                     + "</table>")
    ood = summary["ood_files"]
    parts.append(f"<h2>Out of distribution: {len(ood)} of {metrics['scans']}</h2><p>Embedding distance above "
                 f"{_value(summary['ood_threshold'])}, the {summary['ood_percentile']:g}th percentile of the val "
                 "images'. "
                 "Every scan, with its distance and prediction: <a href='scans.csv'>scans.csv</a>.</p><ul>"
                 + "".join(f"<li><code>{e(row['file'])}</code> ({row['distance']:.3f})</li>"
                           for row in ood[:SHOWN_FILES]) + "</ul>")
    if summary["verdict"]:
        parts.append("<h2>Evidently</h2><p><a href='drift.html'>Embedding and style drift report</a></p>"
                     "<iframe src='drift.html' style='width:100%;height:1400px;border:0'></iframe>")
    return "".join(parts) + "</body></html>\n"
