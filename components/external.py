"""Score a labelled folder from another collection with the ensemble and every base model
(`braintumor evaluate-external`), to measure how far the models generalise beyond the Kaggle set.

Layouts: the Kaggle one (DIR/<class>/, optionally under DIR/Training/ and DIR/Testing/), or binary: DIR/yes +
DIR/no, or DIR/tumor + DIR/notumor (either folder may be absent). Before scoring, every image that is an exact
(sha256) or near (dhash Hamming distance <= split.near_duplicate_distance, the split stage's hash and threshold)
duplicate of any image of the workspace manifest (train, val, gate and test alike) is dropped and listed, and so is
every file that cannot be read. Each figure comes with its count, and with a Wilson interval when it rests on few
scans (params `external`). Writes <external.out_dir>/<name>.md and .json and one MLflow run."""

from __future__ import annotations

import base64
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, recall_score, roc_auc_score

from components import metrics
from components.config import ExternalParams, Params, ProjectError
from components.manifest import scan_folder
from components.metrics import NO_TUMOR, basic_metrics
from components.predict import IMAGE_COLUMN, BadInput
from components.split import hamming, hash_bits

log = logging.getLogger(__name__)

KAGGLE = "kaggle"
KAGGLE_SPLITS = ("Training", "Testing")
BINARY = {"yes/no": {"yes": True, "no": False}, "tumor/notumor": {"tumor": True, "notumor": False}}
HAMMING_CHUNK = 512  # source rows per distance matrix against the whole manifest (512 x 7000 int32: 14 MB)


@dataclass(frozen=True)
class Layout:
    kind: str  # "kaggle", "yes/no" or "tumor/notumor"
    folders: tuple[tuple[Path, str | None, bool], ...]  # (class folder, Kaggle class or None, holds tumor scans)

    @property
    def four_class(self) -> bool:
        return self.kind == KAGGLE


def accepted_layouts(classes: list[str]) -> str:
    return (f"DIR/<class>/ with <class> among {', '.join(classes)} (optionally under DIR/Training/ and "
            "DIR/Testing/); DIR/yes/ and/or DIR/no/; DIR/tumor/ and/or DIR/notumor/")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_layout(source: Path, classes: list[str]) -> Layout:
    """The layout of `source`; an unknown one is a ProjectError naming the folder, what it holds and the accepted
    layouts. Hidden folders and files beside the class folders (a README) are ignored."""
    source = Path(source)
    if not source.is_dir():
        raise ProjectError(f"{source} is not a folder")
    found = _subfolders(source)
    names = {p.name for p in found}
    tumor_classes = set(classes) - {NO_TUMOR}
    if names and names <= set(KAGGLE_SPLITS):
        inner = {split: _subfolders(split) for split in found}
        if all(folders and {p.name for p in folders} <= set(classes) for folders in inner.values()):
            return Layout(KAGGLE, tuple((p, p.name, p.name != NO_TUMOR) for folders in inner.values()
                                        for p in folders))
        what = "; ".join(f"{split.name}/ holds [{', '.join(p.name for p in folders)}]"
                         for split, folders in inner.items())
        raise ProjectError(f"{source}: unknown layout: {what}. Accepted layouts: {accepted_layouts(classes)}")
    if names and names <= set(classes) and names & tumor_classes:
        return Layout(KAGGLE, tuple((p, p.name, p.name != NO_TUMOR) for p in found))
    for kind, truth in BINARY.items():
        if names and names <= set(truth):
            return Layout(kind, tuple((p, None, truth[p.name]) for p in found))
    files = sum(1 for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    what = (f"found sub-folders [{', '.join(sorted(names))}]" if names else "found no sub-folders") + (
        f" and {files} file(s) at the top" if files else "")
    raise ProjectError(f"{source}: unknown layout: {what}. Accepted layouts: {accepted_layouts(classes)}")


def scan_source(source: Path, layout: Layout, params: Params) -> pd.DataFrame:
    """One row per file in the class folders: file (relative to `source`), path, label, tumor, content_hash, dhash
    (the manifest's hash, params manifest), readable, error."""
    frames = []
    for folder, label, tumor in layout.folders:
        frame = scan_folder(folder, params.manifest)
        frame["file"] = [(folder.relative_to(source) / p).as_posix() for p in frame.path]
        frame["path"] = [str(folder / p) for p in frame.path]
        frames.append(frame.assign(label=label, tumor=tumor))
    columns = ["file", "path", "label", "tumor", "content_hash", "dhash", "readable", "error"]
    frames = [frame for frame in frames if not frame.empty]  # an empty folder's frame would make the flags objects
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns].astype({"readable": bool, "tumor": bool})


def load_manifest(params: Params) -> pd.DataFrame:
    path = params.paths.manifest
    if not path.exists():
        raise ProjectError(f"{path} not found: duplicates of the Kaggle set cannot be excluded without it; run "
                           "`dvc pull` or `braintumor manifest` first")
    return pd.read_parquet(path, columns=["path", "content_hash", "dhash"])


def find_duplicates(scans: pd.DataFrame, manifest: pd.DataFrame, raw_dir: Path, distance: int) -> pd.DataFrame:
    """For each scan: `duplicate` (None, "exact" or "near"), the Hamming `distance` to its nearest manifest image and
    that image (`kaggle_image`, under `raw_dir`). Exact: same sha256 (readable or not); near: dhash within
    `distance`, as the split stage judges twins."""
    out = pd.DataFrame({"duplicate": None, "distance": np.nan, "kaggle_image": None}, index=scans.index)
    by_hash = manifest[manifest.content_hash != ""].drop_duplicates("content_hash").set_index("content_hash").path
    exact = scans.content_hash.isin(by_hash.index) & (scans.content_hash != "")
    out.loc[exact, "duplicate"] = "exact"
    out.loc[exact, "distance"] = 0
    out.loc[exact, "kaggle_image"] = [(Path(raw_dir) / p).as_posix() for p in by_hash[scans.content_hash[exact]]]
    hashed = manifest[manifest.dhash.notna()].reset_index(drop=True)
    candidates = scans.index[scans.readable & scans.dhash.notna() & ~exact]
    if len(hashed) == 0 or len(candidates) == 0:
        return out
    kaggle_bits = hash_bits(hashed.dhash)
    source_bits = hash_bits(scans.dhash[candidates])
    if source_bits.shape[1] != kaggle_bits.shape[1]:
        raise ProjectError(f"the manifest holds {kaggle_bits.shape[1]}-bit dhashes but params manifest.hash_size "
                           f"gives {source_bits.shape[1]}-bit ones: run `braintumor manifest` again")
    for start in range(0, len(candidates), HAMMING_CHUNK):
        rows = candidates[start:start + HAMMING_CHUNK]
        distances = hamming(source_bits[start:start + HAMMING_CHUNK], kaggle_bits)
        nearest = distances.argmin(axis=1)
        best = distances[np.arange(len(rows)), nearest]
        out.loc[rows, "distance"] = best
        out.loc[rows, "kaggle_image"] = [(Path(raw_dir) / p).as_posix() for p in hashed.path.to_numpy()[nearest]]
        out.loc[rows[best <= distance], "duplicate"] = "near"
    return out


def load_scorer(params: Params, model_uri: str | None):
    """(scorer, what it is): the EnsembleModel of the workspace's trained models (models/<name>/model.keras and
    models/stacker/stacker.pkl, as `dvc repro` left them; no registry needed), or any pyfunc URI's python model."""
    if model_uri is None:
        from components.predict import EnsembleModel
        from components.register import ensemble_artifacts

        with tempfile.TemporaryDirectory(prefix="ensemble-") as meta_dir:
            artifacts = ensemble_artifacts(params, Path(meta_dir))
            missing = [path for name, path in artifacts.items() if name != "meta" and not Path(path).exists()]
            if missing:
                raise ProjectError(f"{', '.join(missing)} not found: the workspace has no trained ensemble; run "
                                   "`dvc repro` (or `dvc pull`), or pass --model-uri")
            model = EnsembleModel()
            model.load_context(SimpleNamespace(artifacts=artifacts))
        folders = ",".join(params.stack.models)
        return model, f"workspace models ({params.paths.models}/{{{folders}}}/model.keras + " \
                      f"{params.paths.models}/stacker/stacker.pkl)"
    from components import tracking
    from components.predict import load_pyfunc

    tracking.configure(params.tracking)  # models:/ URIs resolve in the project's registry
    model = load_pyfunc(model_uri).unwrap_python_model()
    if not callable(getattr(model, "component_probabilities", None)):
        raise ProjectError(f"{model_uri} is not the ensemble pyfunc ({type(model).__name__} has no "
                           "component_probabilities); pass an ensemble version, e.g. "
                           "models:/brain-tumor-ensemble@champion")
    return model, model_uri


def score_files(scorer, paths: list[str]) -> tuple[dict[str, np.ndarray], list[int], dict[int, str]]:
    """({model: probabilities of the scored files}, indices of the scored files, {index: why refused}).

    Bytes are sent base64-encoded, at most the scorer's `max_rows` per call, as to the served model; a file the
    model refuses is listed, and the rest of its chunk is scored."""
    limits = getattr(scorer, "limits", None)
    step = max(1, min(limits.max_rows, len(paths))) if limits else max(1, len(paths))
    parts: dict[str, list[np.ndarray]] = {}
    scored: list[int] = []
    refused: dict[int, str] = {}
    for start in range(0, len(paths), step):
        indices, values = [], []
        for index in range(start, min(start + step, len(paths))):
            try:
                values.append(base64.b64encode(Path(paths[index]).read_bytes()).decode())
                indices.append(index)
            except OSError as exc:
                refused[index] = f"cannot be read ({exc.strerror})"
        while indices:
            try:
                out = scorer.component_probabilities(pd.DataFrame({IMAGE_COLUMN: values}))
                break
            except BadInput as exc:
                if not exc.rows:
                    raise
                refused |= {indices[row]: why for row, why in exc.rows.items()}
                indices = [i for row, i in enumerate(indices) if row not in exc.rows]
                values = [v for row, v in enumerate(values) if row not in exc.rows]
        if not indices:
            continue
        scored += indices
        for name, probabilities in out.items():
            parts.setdefault(name, []).append(np.asarray(probabilities, dtype=float))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}, scored, refused


def not_available(why: str) -> dict:
    return {"value": None, "note": f"n/a ({why})"}


def proportion(value: float, k: int, n: int, external: ExternalParams) -> dict:
    """metrics.proportion with the interval rule of params external."""
    return metrics.proportion(value, k, n, external.interval_below, external.confidence)


def tumor_metrics(tumor: np.ndarray, tumor_score: np.ndarray, external: ExternalParams) -> dict[str, dict]:
    """Tumor vs no tumor, a scan being called tumor when its tumor score (1 - P(notumor)) is at least
    external.tumor_threshold: sensitivity, specificity and ROC-AUC, each only when the classes it needs are there."""
    tumor = np.asarray(tumor, dtype=bool)
    called = np.asarray(tumor_score) >= external.tumor_threshold
    (tn, fp), (fn, tp) = confusion_matrix(tumor, called, labels=[False, True])
    n_tumor, n_healthy = int(tumor.sum()), int((~tumor).sum())
    out = {
        "tumor_sensitivity": proportion(recall_score(tumor, called, labels=[False, True], pos_label=True,
                                                     zero_division=0), tp, n_tumor, external)
        if n_tumor else not_available("no tumor scans"),
        "tumor_specificity": proportion(recall_score(tumor, called, labels=[False, True], pos_label=False,
                                                     zero_division=0), tn, n_healthy, external)
        if n_healthy else not_available("no healthy scans"),
    }
    if n_tumor and n_healthy:  # not a proportion: no Wilson interval, the counts of both classes instead
        out["tumor_roc_auc"] = {"value": float(roc_auc_score(tumor, tumor_score)), "n": n_tumor + n_healthy,
                                "n_tumor": n_tumor, "n_healthy": n_healthy}
    else:
        out["tumor_roc_auc"] = not_available("no healthy scans" if n_tumor else "no tumor scans")
    return out


def four_class_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str],
                       external: ExternalParams) -> dict[str, dict]:
    """4-class accuracy and per-class recall (argmax), values from metrics.basic_metrics, counts from the
    confusion matrix; the recall of a class with no scan is n/a."""
    values = basic_metrics(labels, probabilities, classes)
    matrix = confusion_matrix(labels, np.asarray(probabilities).argmax(axis=1), labels=range(len(classes)))
    out = {"accuracy": proportion(values["accuracy"], np.trace(matrix), matrix.sum(), external)}
    for i, name in enumerate(classes):
        out[f"recall_{name}"] = (proportion(values[f"recall_{name}"], matrix[i, i], matrix[i].sum(), external)
                                 if matrix[i].sum() else not_available(f"no {name} scans"))
    return out


def evaluate_scores(probabilities: dict[str, np.ndarray], scans: pd.DataFrame, classes: list[str],
                    four_class: bool, external: ExternalParams) -> dict[str, dict[str, dict]]:
    """{model: {metric: figure}} for every base model, soft voting and the stack; `scans` holds the scored rows
    (columns tumor, and label for the Kaggle layout) in the order of the probabilities."""
    healthy = classes.index(NO_TUMOR)
    out = {}
    for name, probs in probabilities.items():
        out[name] = tumor_metrics(scans.tumor.to_numpy(dtype=bool), 1.0 - probs[:, healthy], external)
        if four_class:
            labels = scans.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
            out[name] |= four_class_metrics(labels, probs, classes, external)
    return out


def _name(source: Path, name: str | None) -> str:
    name = name or Path(source).resolve().name
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ProjectError(f"--name {name!r}: use letters, digits, '_', '-' and '.', not starting with '.'")
    return name


def run_external(params: Params, source: str | Path, model_uri: str | None = None, name: str | None = None, *,
                 scorer=None) -> dict:
    """Score `source` (see the module docstring) and write the report; `scorer` (an object with `classes`,
    `component_probabilities` and optionally `limits`) replaces the model `model_uri` names (None: the workspace's
    trained models). Returns the paths written, the MLflow run id, the counts and each model's tumor sensitivity."""
    import mlflow

    from components import tracking

    source = Path(source)
    name = _name(source, name)
    external = params.external
    layout = detect_layout(source, params.data.classes)
    scans = scan_source(source, layout, params)
    if scans.empty:
        raise ProjectError(f"{source}: the class folders ({layout.kind} layout) hold no files")
    scans = scans.join(find_duplicates(scans, load_manifest(params), params.paths.raw,
                                       params.split.near_duplicate_distance))
    dropped = scans[scans.duplicate.notna()]
    unreadable = scans[scans.duplicate.isna() & ~scans.readable]
    candidates = scans[scans.duplicate.isna() & scans.readable].reset_index(drop=True)
    log.info("%s: %d files, %d dropped as duplicates of the Kaggle set, %d unreadable, %d to score", source,
             len(scans), len(dropped), len(unreadable), len(candidates))
    if candidates.empty:
        raise ProjectError(f"{source}: nothing left to score: of {len(scans)} files, {len(dropped)} are duplicates "
                           f"of Kaggle images and {len(unreadable)} cannot be read")

    scorer, model = (scorer, type(scorer).__name__) if scorer is not None else load_scorer(params, model_uri)
    classes = list(scorer.classes)
    if NO_TUMOR not in classes or (layout.four_class and not set(candidates.label) <= set(classes)):
        raise ProjectError(f"the model's classes {classes} do not cover {NO_TUMOR!r} and the folder's classes")
    probabilities, scored, refused = score_files(scorer, candidates.path.tolist())
    refused_rows = candidates.loc[sorted(refused)].assign(error=[refused[i] for i in sorted(refused)])
    unreadable = pd.concat([unreadable, refused_rows])
    candidates = candidates.loc[scored].reset_index(drop=True)
    if candidates.empty:
        raise ProjectError(f"{source}: the model refused every remaining file: "
                           + "; ".join(f"{r.file}: {r.error}" for r in refused_rows.itertuples()))
    metrics = evaluate_scores(probabilities, candidates, classes, layout.four_class, external)

    healthy = classes.index(NO_TUMOR)
    counts = {"found": len(scans), "dropped_exact": int((dropped.duplicate == "exact").sum()),
              "dropped_near": int((dropped.duplicate == "near").sum()), "unreadable": len(unreadable),
              "scored": len(candidates), "scored_tumor": int(candidates.tumor.sum()),
              "scored_healthy": int((~candidates.tumor.astype(bool)).sum())}
    if layout.four_class:
        counts |= {f"scored_{c}": int((candidates.label == c).sum()) for c in classes}
    report = {
        "name": name, "source": str(source.resolve()), "layout": layout.kind, "model": model, "classes": classes,
        "tumor_threshold": external.tumor_threshold, "near_duplicate_distance": params.split.near_duplicate_distance,
        "hash_size": params.manifest.hash_size, "interval_below": external.interval_below,
        "confidence": external.confidence, "counts": counts,
        "dropped": [{"file": r.file, "reason": f"{r.duplicate} duplicate", "distance": int(r.distance),
                     "kaggle_image": r.kaggle_image} for r in dropped.itertuples()],
        "unreadable": [{"file": r.file, "error": r.error} for r in unreadable.itertuples()],
        "metrics": metrics,
        "scans": [{"file": row.file, "tumor": bool(row.tumor), "label": row.label,
                   "nearest_kaggle_distance": None if pd.isna(row.distance) else int(row.distance),
                   "tumor_score": {m: round(float(1.0 - p[i, healthy]), 6) for m, p in probabilities.items()}}
                  for i, row in enumerate(candidates.itertuples())],
    }
    out_dir = external.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))

    with tracking.stage_run(params, f"external-{name}", "evaluate-external") as run:
        mlflow.log_params({"source": report["source"], "name": name, "layout": layout.kind, "model": model[:500],
                           "tumor_threshold": external.tumor_threshold,
                           "near_duplicate_distance": params.split.near_duplicate_distance})
        mlflow.log_metrics({**{f"count.{key}": value for key, value in counts.items()},
                            **{f"{model_name}.{metric}": figure["value"]
                               for model_name, figures in metrics.items() for metric, figure in figures.items()
                               if figure["value"] is not None}})
        mlflow.log_artifact(str(md_path), "external")
        mlflow.log_artifact(str(json_path), "external")
    return {"report": str(md_path), "json": str(json_path), "run_id": run.info.run_id, "counts": counts,
            "tumor_sensitivity": {m: f["tumor_sensitivity"]["value"] for m, f in metrics.items()}}


def _cell(figure: dict, percent: bool = True) -> str:
    if figure["value"] is None:
        return figure["note"]
    if not percent:  # ROC-AUC
        return f"{figure['value']:.3f} ({figure['n_tumor']} tumor / {figure['n_healthy']} healthy)"
    text = f"{100 * figure['value']:.1f}% ({figure['k']}/{figure['n']}"
    if "ci_low" in figure:
        text += (f"; {round(100 * figure['confidence'])}% CI {100 * figure['ci_low']:.1f}–"
                 f"{100 * figure['ci_high']:.1f}%")
    return text + ")"


def markdown(report: dict) -> str:
    counts, classes = report["counts"], report["classes"]
    lines = [
        f"# External evaluation: {report['name']}", "",
        f"**Source:** `{report['source']}` ({report['layout']} layout) · **model:** {report['model']}", "",
        f"A scan is called tumor when its tumor score 1 − P({NO_TUMOR}) is at least {report['tumor_threshold']}. "
        f"Proportions show their count; those resting on fewer than {report['interval_below']} scans also show a "
        f"{round(100 * report['confidence'])}% Wilson interval. ROC-AUC is not a proportion and gets no interval.",
        "", "| files | count |", "|---|---|",
        f"| found in the class folders | {counts['found']} |",
        f"| dropped: exact copy (sha256) of a Kaggle image | {counts['dropped_exact']} |",
        f"| dropped: near duplicate (dhash distance ≤ {report['near_duplicate_distance']}) of a Kaggle image | "
        f"{counts['dropped_near']} |",
        f"| unreadable | {counts['unreadable']} |",
        f"| scored | {counts['scored']} ({counts['scored_tumor']} tumor, {counts['scored_healthy']} healthy) |",
        "", "## Tumor vs no tumor", "", "| model | sensitivity | specificity | ROC-AUC |", "|---|---|---|---|",
    ]
    for model, figures in report["metrics"].items():
        lines.append(f"| {model} | {_cell(figures['tumor_sensitivity'])} | {_cell(figures['tumor_specificity'])} | "
                     f"{_cell(figures['tumor_roc_auc'], percent=False)} |")
    if report["layout"] == KAGGLE:
        lines += ["", "## Four classes", "", "Predicted class: the highest probability. Scored: "
                  + ", ".join(f"{c} {counts[f'scored_{c}']}" for c in classes) + ".", "",
                  "| model | accuracy | " + " | ".join(f"recall {c}" for c in classes) + " |",
                  "|---|---|" + "---|" * len(classes)]
        for model, figures in report["metrics"].items():
            lines.append(f"| {model} | {_cell(figures['accuracy'])} | "
                         + " | ".join(_cell(figures[f"recall_{c}"]) for c in classes) + " |")
    lines += ["", f"## Dropped as duplicates of the Kaggle set ({len(report['dropped'])})", ""]
    if report["dropped"]:
        lines += ["| file | reason | distance | Kaggle image |", "|---|---|---|---|"]
        lines += [f"| `{d['file']}` | {d['reason']} | {d['distance']} | `{d['kaggle_image']}` |"
                  for d in report["dropped"]]
    else:
        lines.append("None.")
    lines += ["", f"## Unreadable ({len(report['unreadable'])})", ""]
    if report["unreadable"]:
        lines += ["| file | why |", "|---|---|"]
        lines += [f"| `{u['file']}` | {str(u['error']).replace('|', '/')} |" for u in report["unreadable"]]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"
