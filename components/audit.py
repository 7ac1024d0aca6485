"""Shortcut audit (`braintumor audit`): what in this data set besides the tumor predicts the label, and how every
model does on the scans that contradict it.

1. Every readable scan's acquisition style and MRI weighting, T1-like or T2-like, as the `style` stage wrote
   them (components.style: paths.style, and the weighting method with its agreement with the hand labels).
2. The label x style tables, and how well style alone predicts the label: a gradient-boosted classifier on the
   style features, cross-validated on the training pool, against chance (the majority class).
3. Every base model, soft voting and the stack on the official test split, per style cell: accuracy and tumor
   sensitivity (tumor vs none, metrics.tumor_call at evaluate.tumor_threshold). The counter-shortcut
   cells are tumors that look T2-like and healthy scans that look T1-like.

Writes paths.audit_report (markdown, git) and paths.metrics/audit.json (DVC metrics).
Method and its check: docs/audit.md.
"""

from __future__ import annotations

import json
import logging
import numpy as np
import pandas as pd

from components.config import EvaluateParams, Params, ProjectError
from components.metrics import NO_TUMOR, labelled_figures, probability_columns, proportion, proportion_text
from components.style import STYLE_FEATURES, T1, T2, read_styles

log = logging.getLogger(__name__)

COUNTER_SHORTCUT = {"tumor": T2, NO_TUMOR: T1}  # the style that contradicts each side of the shortcut


def style_only(features: pd.DataFrame, classes: list[str], seed: int, folds: int) -> dict:
    """How well style alone predicts the label on the training pool (cross-validated) and on test (fitted on the
    pool), against chance: the majority class's share. Also tumor vs none ROC-AUC from style alone."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    pool = features[features.split != "test"]
    test = features[features.split == "test"]
    labels = pool.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
    folds = min(folds, int(np.bincount(labels, minlength=len(classes))[np.unique(labels)].min()))
    if folds < 2 or len(np.unique(labels)) < 2:
        return {"note": "too few scans per class to cross-validate"}
    model = HistGradientBoostingClassifier(random_state=seed)
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    probabilities = cross_val_predict(model, pool[STYLE_FEATURES], labels, cv=cv, method="predict_proba")
    present = np.unique(labels)
    full = np.zeros((len(pool), len(classes)))
    full[:, present] = probabilities
    healthy = classes.index(NO_TUMOR)
    tumor = labels != healthy
    out = {
        "pool_images": len(pool), "folds": folds,
        "cv_accuracy": float(accuracy_score(labels, full.argmax(axis=1))),
        "chance_accuracy": float(np.bincount(labels).max() / len(labels)),
        "cv_tumor_roc_auc": float(roc_auc_score(tumor, 1 - full[:, healthy])) if 0 < tumor.sum() < len(tumor)
        else None,
    }
    if len(test):
        model.fit(pool[STYLE_FEATURES], labels)
        test_labels = test.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
        out["test_accuracy"] = float(accuracy_score(test_labels, model.predict(test[STYLE_FEATURES])))
        out["test_chance_accuracy"] = float(np.bincount(test_labels).max() / len(test_labels))
    return out


def cell_metrics(frame: pd.DataFrame, classes: list[str], settings: EvaluateParams) -> dict:
    """Accuracy, tumor sensitivity and specificity of one model's predictions in one cell (metrics.labelled_figures:
    counts, and a Wilson interval below evaluate.interval_below scans)."""
    return labelled_figures(frame.label.to_numpy(), frame[probability_columns(classes)].to_numpy(), classes,
                            settings.tumor_threshold, settings.interval_below, settings.confidence)


def per_cell(predictions: dict[str, pd.DataFrame], styles: pd.DataFrame, classes: list[str],
             settings: EvaluateParams) -> dict[str, dict[str, dict]]:
    """{model: {cell: metrics}} on test. Cells: all, tumor/notumor x T1-like/T2-like, and the counter-shortcut
    cells by name."""
    out = {}
    for name, frame in predictions.items():
        frame = frame.merge(styles[["path", "weighting"]], on="path", how="left")
        side = np.where(frame.label == NO_TUMOR, NO_TUMOR, "tumor")
        cells = {"all": frame}
        for kind in ("tumor", NO_TUMOR):
            cells[kind] = frame[side == kind]
            for weighting in (T1, T2):
                cells[f"{kind} {weighting}"] = frame[(side == kind) & (frame.weighting == weighting)]
        out[name] = {cell: cell_metrics(rows, classes, settings) for cell, rows in cells.items() if len(rows)}
    return out


def shortcut_gaps(cells: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per model: tumor sensitivity overall and in the T2-like tumor cell, and their gap in points."""
    out = {}
    for name, by_cell in cells.items():
        overall = by_cell.get("tumor", {}).get("tumor_sensitivity")
        counter = by_cell.get(f"tumor {T2}", {}).get("tumor_sensitivity")
        if overall and counter:
            out[name] = {"overall": overall["value"], "counter_shortcut": counter["value"],
                         "gap_points": round(100 * (overall["value"] - counter["value"]), 2), "n": counter["n"]}
    return out


def load_test_predictions(params: Params) -> dict[str, pd.DataFrame]:
    from components.stack import SOFT_VOTE, STACK

    out = {}
    for name in [*params.stack.models, SOFT_VOTE, STACK]:
        path = params.paths.predictions / name / "test.parquet"
        if not path.exists():
            raise ProjectError(f"{path} not found: the audit scores every model's test predictions; run "
                               f"`dvc repro stack` first")
        out[name] = pd.read_parquet(path)
    return out


def run_audit(params: Params) -> dict:
    import mlflow

    from components import tracking

    audit, settings, classes = params.audit, params.evaluate, params.data.classes
    styles = read_styles(params)
    method = json.loads((params.paths.metrics / "style.json").read_text())["weighting_method"]
    if method.get("agreement"):
        agreement = method["agreement"]
        method["agreement"] = proportion(agreement["value"], agreement["k"], agreement["n"],
                                         settings.interval_below, settings.confidence)

    used = styles[styles.split != "excluded"]
    tables = {
        "weighting_by_label": pd.crosstab(used.label, used.weighting).to_dict(orient="index"),
        "weighting_by_label_test": pd.crosstab(used[used.split == "test"].label,
                                               used[used.split == "test"].weighting).to_dict(orient="index"),
        "stored_mode_by_label": pd.crosstab(used.label, used["mode"]).to_dict(orient="index"),
    }
    predictor = style_only(used, classes, params.seed, audit.folds)
    cells = per_cell(load_test_predictions(params), styles, classes, settings)
    gaps = shortcut_gaps(cells)
    summary = {"weighting_method": method, "tables": tables, "style_only": predictor, "test_cells": cells,
               "counter_shortcut_gaps": gaps, "tumor_threshold": settings.tumor_threshold,
               "scans": len(styles), "scans_used": len(used),
               "gap_target_points": params.report.counter_shortcut_gap_points}
    params.paths.metrics.mkdir(parents=True, exist_ok=True)
    (params.paths.metrics / "audit.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    params.paths.audit_report.parent.mkdir(parents=True, exist_ok=True)
    params.paths.audit_report.write_text(markdown(summary, classes))

    with tracking.stage_run(params, "audit", "audit"):
        metrics = {f"style_only.{k}": v for k, v in predictor.items() if isinstance(v, float)}
        metrics |= {f"{name}.counter_shortcut_gap_points": g["gap_points"] for name, g in gaps.items()}
        metrics |= {f"{name}.{cell}.{metric}".replace(" ", "_"): figure["value"]
                    for name, by_cell in cells.items() for cell, figures in by_cell.items()
                    for metric, figure in figures.items()}
        if method.get("agreement"):
            metrics["weighting.agreement_with_hand_labels"] = method["agreement"]["value"]
        mlflow.log_metrics(metrics)
        mlflow.log_param("weighting_method", method["method"][:500])
        mlflow.log_artifact(str(params.paths.audit_report))
        mlflow.log_artifact(str(params.paths.metrics / "audit.json"))
    return {"report": str(params.paths.audit_report), "style_only": predictor, "counter_shortcut_gaps": gaps}


def _crosstab(table: dict, columns: list[str]) -> list[str]:
    lines = ["| label | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, row in table.items():
        lines.append(f"| {label} | " + " | ".join(str(row.get(c, 0)) for c in columns) + " |")
    return lines


def markdown(summary: dict, classes: list[str]) -> str:
    method, predictor, tables = summary["weighting_method"], summary["style_only"], summary["tables"]
    lines = ["# Shortcut audit", "",
             f"{summary['scans']} readable scans; {summary['scans_used']} in train, val, stack, gate or test "
             "(the rest were quarantined or dropped as twins of test images). Method and its check: "
             "[docs/audit.md](../docs/audit.md).", "",
             "## MRI weighting", "", f"Estimated without labels by a {method['method']}."]
    if method.get("why"):
        lines.append(f"Fallback: {method['why']}.")
    if method.get("agreement"):
        lines.append(f"Agreement with the hand labels: {proportion_text(method['agreement'])}"
                     + (f" ({method['agreement_note']})." if method.get("agreement_note") else "."))
    lines += ["", "All scans in use:", ""] + _crosstab(tables["weighting_by_label"], [T1, T2])
    lines += ["", "Official test split:", ""] + _crosstab(tables["weighting_by_label_test"], [T1, T2])
    modes = sorted({m for row in tables["stored_mode_by_label"].values() for m in row})
    lines += ["", "## Stored colour mode", "", "A grayscale scan stored as RGB or as L is the same picture; which "
              "one a file is tells its source.", ""] + _crosstab(tables["stored_mode_by_label"], modes)
    lines += ["", "## Style alone predicts the label", ""]
    if "cv_accuracy" in predictor:
        lines += [f"A gradient-boosted classifier on the {len(STYLE_FEATURES)} style features (no pixels of the "
                  "tumor, no label), on the training pool:", "",
                  "| measure | style only | chance (majority class) |", "|---|---|---|",
                  f"| {predictor['folds']}-fold CV accuracy, {predictor['pool_images']} scans | "
                  f"{100 * predictor['cv_accuracy']:.1f}% | {100 * predictor['chance_accuracy']:.1f}% |"]
        if "test_accuracy" in predictor:
            lines.append(f"| test accuracy (fitted on the pool) | {100 * predictor['test_accuracy']:.1f}% | "
                         f"{100 * predictor['test_chance_accuracy']:.1f}% |")
        if predictor.get("cv_tumor_roc_auc") is not None:
            lines.append(f"| tumor vs none ROC-AUC (CV) | {predictor['cv_tumor_roc_auc']:.3f} | 0.500 |")
    else:
        lines.append(predictor.get("note", ""))
    cell_names = ["all", "tumor", f"tumor {T1}", f"tumor {T2}", NO_TUMOR, f"{NO_TUMOR} {T1}", f"{NO_TUMOR} {T2}"]
    lines += ["", "## Models per style cell (official test)", "",
              f"Tumor sensitivity: share of tumor scans called tumor (1 − P({NO_TUMOR}) ≥ "
              f"{summary['tumor_threshold']}); specificity: share of healthy scans called healthy. The "
              f"counter-shortcut cells are **tumor {T2}** and **{NO_TUMOR} {T1}**.", "",
              "| model | " + " | ".join(cell_names) + " |", "|---|" + "---|" * len(cell_names)]
    for name, by_cell in summary["test_cells"].items():
        row = []
        for cell in cell_names:
            figures = by_cell.get(cell, {})
            key = "accuracy" if cell == "all" else (
                "tumor_specificity" if cell.startswith(NO_TUMOR) else "tumor_sensitivity")
            row.append(proportion_text(figures.get(key)))
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", "Column `all` is accuracy (4 classes); tumor columns are tumor sensitivity, notumor columns "
              "specificity.", "", "## Counter-shortcut gap", "",
              f"Target: tumor sensitivity on T2-like tumors within {summary['gap_target_points']} points of all "
              "tumors (report.counter_shortcut_gap_points).", "",
              "| model | all tumors | T2-like tumors | gap (points) | T2-like tumors (n) |", "|---|---|---|---|---|"]
    for name, gap in summary["counter_shortcut_gaps"].items():
        lines.append(f"| {name} | {100 * gap['overall']:.1f}% | {100 * gap['counter_shortcut']:.1f}% | "
                     f"{gap['gap_points']:.1f} | {gap['n']} |")
    if not summary["counter_shortcut_gaps"]:
        lines.append("| – | no T2-like tumor in the test split | | | 0 |")
    return "\n".join(lines) + "\n"
