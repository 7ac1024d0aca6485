"""Score a labelled folder from another collection with the ensemble and every base model
(`braintumor evaluate-external`), to measure how far the models generalise beyond the data they trained on.

Layouts:
- a labels file, DIR/labels.csv: columns `file` (path under DIR) and `label` (a class, or `other_tumor`: a tumor of
  none of the classes, which counts as a tumor for tumor-vs-none and is left out of class accuracy), optionally
  `weighting` (the MRI weighting the source states) and `group` (the source's id of near-identical scans);
- the Kaggle one (DIR/<class>/, optionally under DIR/Training/ and DIR/Testing/);
- binary: DIR/yes + DIR/no, or DIR/tumor + DIR/notumor (either folder may be absent).

What is scored: only scans no model trained on. A scan that is an exact (sha256) or near (dhash Hamming distance <=
split.near_duplicate_distance, the split stage's hash and threshold) duplicate of a workspace image is dropped and
listed when that image is of the imported data set (params manifest.base_source, any split: the report measures
another collection) or trained a model (splits train and stack); so is every scan of a labelled group one of whose
scans trained. A duplicate of an appended scan that the split stage held out (val, gate) is scored, marked with its
split. Unreadable files are listed too.

Figures (metrics.labelled_figures, the one tumor call at evaluate.tumor_threshold): tumor sensitivity and
specificity, ROC-AUC, and with class labels accuracy and per-class recall, for all scans and for each stated
weighting, every base model, soft voting and the stack; each with its count, and a Wilson interval below
evaluate.interval_below scans. Writes <external.out_dir>/<name>.md and .json and one MLflow run."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, roc_auc_score

from components.config import EvaluateParams, Params, ProjectError
from components.manifest import scan_files, scan_folder
from components.metrics import NO_TUMOR, OTHER_TUMOR, labelled_figures, proportion, tumor_score
from components.predict import load_scorer, score_files
from components.split import hamming, hash_bits

log = logging.getLogger(__name__)

KAGGLE, LABELS = "kaggle", "labels"
LABELS_FILE = "labels.csv"
KAGGLE_SPLITS = ("Training", "Testing")
BINARY = {"yes/no": {"yes": True, "no": False}, "tumor/notumor": {"tumor": True, "notumor": False}}
TUMOR = "tumor"  # the label of a binary layout's tumor scans: a tumor of unknown class
FITTED_SPLITS = ("train", "stack")  # a model was fitted on these rows (the base models, the meta-learner)
ALL = "all"
HAMMING_CHUNK = 512  # source rows per distance matrix against the whole manifest (512 x 7000 int32: 14 MB)
SCAN_COLUMNS = ["file", "path", "label", "tumor", "weighting", "group", "content_hash", "dhash", "readable", "error"]


@dataclass(frozen=True)
class Layout:
    kind: str  # "labels", "kaggle", "yes/no" or "tumor/notumor"
    folders: tuple[tuple[Path, str | None, bool], ...] = ()  # (class folder, Kaggle class or None, holds tumors)
    labels_file: Path | None = None

    @property
    def class_labels(self) -> bool:
        """Whether the scans carry class labels (then class accuracy and recall are figures)."""
        return self.kind in (KAGGLE, LABELS)


def accepted_layouts(classes: list[str]) -> str:
    return (f"DIR/{LABELS_FILE} (columns file, label, optionally weighting and group); DIR/<class>/ with <class> "
            f"among {', '.join(classes)} (optionally under DIR/Training/ and DIR/Testing/); DIR/yes/ and/or "
            "DIR/no/; DIR/tumor/ and/or DIR/notumor/")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_layout(source: Path, classes: list[str]) -> Layout:
    """The layout of `source`; an unknown one is a ProjectError naming the folder, what it holds and the accepted
    layouts. Hidden folders and files beside the class folders (a README) are ignored."""
    source = Path(source)
    if not source.is_dir():
        raise ProjectError(f"{source} is not a folder")
    if (source / LABELS_FILE).is_file():
        return Layout(LABELS, labels_file=source / LABELS_FILE)
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


def read_labels_file(path: Path, classes: list[str]) -> pd.DataFrame:
    """file, label, weighting, group of a labels file; a missing column or an unknown label is a ProjectError."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"file", "label"} - set(table.columns)
    if missing:
        raise ProjectError(f"{path} lacks the column(s) {', '.join(sorted(missing))}: a labels file holds file and "
                           "label, optionally weighting and group")
    table = table.reindex(columns=["file", "label", "weighting", "group"], fill_value="").replace("", None)
    unknown = sorted(set(table.label) - set(classes) - {OTHER_TUMOR})
    if unknown:
        raise ProjectError(f"{path}: unknown label(s) {', '.join(map(str, unknown))}; a label is one of "
                           f"{', '.join(classes)} or {OTHER_TUMOR} (a tumor of none of those classes)")
    return table


def scan_source(source: Path, layout: Layout, params: Params) -> pd.DataFrame:
    """One row per scan: file (relative to `source`), path, label (a class, other_tumor, or `tumor` for a binary
    layout's tumor scans), tumor, weighting, group, content_hash, dhash (the manifest's hash), readable, error."""
    if layout.kind == LABELS:
        table = read_labels_file(layout.labels_file, params.data.classes)
        frame = scan_files(source, table.file.tolist(), table.label.tolist(), params.manifest,
                           f"reading {source}")
        frame = frame.assign(file=table.file.to_numpy(), path=[str(source / f) for f in table.file],
                             label=table.label.to_numpy(), tumor=(table.label != NO_TUMOR).to_numpy(),
                             weighting=table.weighting.to_numpy(), group=table.group.to_numpy())
        return frame[SCAN_COLUMNS].astype({"readable": bool, "tumor": bool})
    frames = []
    for folder, label, tumor in layout.folders:
        frame = scan_folder(folder, params.manifest)
        frame["file"] = [(folder.relative_to(source) / p).as_posix() for p in frame.path]
        frame["path"] = [str(folder / p) for p in frame.path]
        frames.append(frame.assign(label=label or (TUMOR if tumor else NO_TUMOR), tumor=tumor, weighting=None,
                                   group=None))
    frames = [frame for frame in frames if not frame.empty]  # an empty folder's frame would make the flags objects
    if not frames:
        return pd.DataFrame(columns=SCAN_COLUMNS)
    return pd.concat(frames, ignore_index=True)[SCAN_COLUMNS].astype({"readable": bool, "tumor": bool})


def load_workspace(params: Params) -> pd.DataFrame:
    """Every workspace image (the manifest) with its source and the split it is in (data/splits; `excluded` when
    it is in none: quarantined, or dropped as a twin of a test image)."""
    path = params.paths.manifest
    if not path.exists():
        raise ProjectError(f"{path} not found: scans the models trained on cannot be excluded without it; run "
                           "`dvc pull` or `braintumor manifest` first")
    manifest = pd.read_parquet(path)
    manifest["source"] = manifest.source if "source" in manifest else params.manifest.base_source
    split_of = {}
    for split_file in sorted(Path(params.paths.splits).glob("*.csv")):
        for raw_path in pd.read_csv(split_file, usecols=["path"]).path:
            split_of[Path(raw_path).as_posix()] = split_file.stem
    full = [(Path(params.paths.raw) / p).as_posix() for p in manifest.path]
    manifest["split"] = [split_of.get(p, "excluded") for p in full]
    return manifest[["path", "content_hash", "dhash", "source", "split"]]


def find_duplicates(scans: pd.DataFrame, workspace: pd.DataFrame, raw_dir: Path, distance: int) -> pd.DataFrame:
    """For each scan: `duplicate` (None, "exact" or "near"), the Hamming `distance` to its nearest workspace image,
    that image (`workspace_image`, under `raw_dir`) and its `source` and `split`. Exact: same sha256 (readable or
    not); near: dhash within `distance`, as the split stage judges twins."""
    out = pd.DataFrame({"duplicate": None, "distance": np.nan, "workspace_image": None, "image_source": None,
                        "image_split": None}, index=scans.index)

    def describe(rows, images: pd.DataFrame) -> None:
        out.loc[rows, "workspace_image"] = [(Path(raw_dir) / p).as_posix() for p in images.path]
        out.loc[rows, "image_source"] = images.source.to_numpy()
        out.loc[rows, "image_split"] = images.split.to_numpy()

    by_hash = workspace[workspace.content_hash != ""].drop_duplicates("content_hash").set_index("content_hash")
    exact = scans.content_hash.isin(by_hash.index) & (scans.content_hash != "")
    out.loc[exact, "duplicate"] = "exact"
    out.loc[exact, "distance"] = 0
    describe(scans.index[exact], by_hash.loc[scans.content_hash[exact]].reset_index())
    hashed = workspace[workspace.dhash.notna()].reset_index(drop=True)
    candidates = scans.index[scans.readable & scans.dhash.notna() & ~exact]
    if len(hashed) == 0 or len(candidates) == 0:
        return out
    workspace_bits = hash_bits(hashed.dhash)
    source_bits = hash_bits(scans.dhash[candidates])
    if source_bits.shape[1] != workspace_bits.shape[1]:
        raise ProjectError(f"the manifest holds {workspace_bits.shape[1]}-bit dhashes but params manifest.hash_size "
                           f"gives {source_bits.shape[1]}-bit ones: run `braintumor manifest` again")
    for start in range(0, len(candidates), HAMMING_CHUNK):
        rows = candidates[start:start + HAMMING_CHUNK]
        distances = hamming(source_bits[start:start + HAMMING_CHUNK], workspace_bits)
        nearest = distances.argmin(axis=1)
        best = distances[np.arange(len(rows)), nearest]
        out.loc[rows, "distance"] = best
        describe(rows, hashed.iloc[nearest])
        out.loc[rows[best <= distance], "duplicate"] = "near"
    return out


def why_dropped(scans: pd.DataFrame, base_source: str) -> pd.Series:
    """Per scan, why it is not scored (None: it is): a duplicate of an image of the imported data set, or of an
    image a model was fitted on, or a member of a labelled group one of whose scans trained."""
    reason = pd.Series(None, index=scans.index, dtype=object)
    duplicate = scans.duplicate.notna()
    of_base = duplicate & (scans.image_source == base_source)
    trained = duplicate & ~of_base & scans.image_split.isin(FITTED_SPLITS)
    reason[of_base] = scans.duplicate[of_base] + " duplicate of a " + base_source + " image"
    reason[trained] = scans.duplicate[trained] + " duplicate of a trained-on image (" + scans.image_split[trained] + \
        " split)"
    trained_groups = set(scans.group[trained & scans.group.notna()])
    same_group = reason.isna() & scans.group.isin(trained_groups)
    reason[same_group] = "its group " + scans.group[same_group].astype(str) + " trained"
    return reason


def not_available(why: str) -> dict:
    return {"value": None, "note": f"n/a ({why})"}


def group_figures(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], class_labels: bool,
                  settings: EvaluateParams) -> dict[str, dict]:
    """One model's figures on one group of scans: labelled_figures, with n/a for what the group cannot measure,
    tumor ROC-AUC, and with class labels per-class recall."""
    found = labelled_figures(labels, probabilities, classes, settings.tumor_threshold, settings.interval_below,
                             settings.confidence)
    tumor = np.asarray(labels, dtype=object) != NO_TUMOR
    out = {"tumor_sensitivity": found.get("tumor_sensitivity", not_available("no tumor scans")),
           "tumor_specificity": found.get("tumor_specificity", not_available("no healthy scans"))}
    if tumor.any() and (~tumor).any():  # not a proportion: no Wilson interval, the counts of both classes instead
        out["tumor_roc_auc"] = {"value": float(roc_auc_score(tumor, tumor_score(probabilities, classes))),
                                "n": len(tumor), "n_tumor": int(tumor.sum()), "n_healthy": int((~tumor).sum())}
    else:
        out["tumor_roc_auc"] = not_available("no healthy scans" if tumor.any() else "no tumor scans")
    if class_labels:
        out["accuracy"] = found.get("accuracy", not_available("no scans of the classes"))
        in_classes = np.isin(labels, classes)
        indices = pd.Series(labels[in_classes]).map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=int)
        matrix = confusion_matrix(indices, np.asarray(probabilities)[in_classes].argmax(axis=1),
                                  labels=range(len(classes)))
        for i, name in enumerate(classes):
            n, k = int(matrix[i].sum()), int(matrix[i, i])
            out[f"recall_{name}"] = (proportion(k / n, k, n, settings.interval_below, settings.confidence)
                                     if n else not_available(f"no {name} scans"))
    return out


def evaluate_scores(probabilities: dict[str, np.ndarray], scans: pd.DataFrame, classes: list[str],
                    class_labels: bool, settings: EvaluateParams) -> dict[str, dict[str, dict[str, dict]]]:
    """{cell: {model: figures}}: `all` scans, and each stated weighting; `scans` holds the scored rows in the order
    of the probabilities."""
    labels = scans.label.to_numpy(dtype=object)
    cells = {ALL: np.ones(len(scans), dtype=bool)}
    for weighting in sorted(scans.weighting.dropna().unique()):
        cells[weighting] = (scans.weighting == weighting).to_numpy()
    return {cell: {name: group_figures(labels[rows], probs[rows], classes, class_labels, settings)
                   for name, probs in probabilities.items()} for cell, rows in cells.items()}


def metric_name(cell: str) -> str:
    """A weighting as MLflow takes it in a metric's name (no `+`: T1C+ -> T1Cplus)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", cell.replace("+", "plus"))


def _name(source: Path, name: str | None) -> str:
    name = name or Path(source).resolve().name
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ProjectError(f"--name {name!r}: use letters, digits, '_', '-' and '.', not starting with '.'")
    return name


@dataclass
class Counts:
    found: int
    dropped: int
    unreadable: int
    scored: pd.DataFrame = field(repr=False)

    def as_dict(self, classes: list[str], class_labels: bool) -> dict:
        scored = self.scored
        out = {"found": self.found, "dropped": self.dropped, "unreadable": self.unreadable, "scored": len(scored),
               "scored_tumor": int(scored.tumor.sum()), "scored_healthy": int((~scored.tumor).sum())}
        if class_labels:
            out |= {f"scored_{c}": int((scored.label == c).sum()) for c in [*classes, OTHER_TUMOR]}
        out["scored_by_weighting"] = {w: int(n) for w, n in scored.weighting.value_counts().sort_index().items()}
        held_out = scored.image_split[scored.duplicate.notna()]
        out["scored_held_out"] = {s: int(n) for s, n in held_out.value_counts().sort_index().items()}
        return out


def run_external(params: Params, source: str | Path, model_uri: str | None = None, name: str | None = None, *,
                 scorer=None) -> dict:
    """Score `source` (see the module docstring) and write the report; `scorer` (an object with `classes`,
    `component_probabilities` and optionally `limits`) replaces the model `model_uri` names (None: the workspace's
    trained models). Returns the paths written, the MLflow run id, the counts and each model's tumor sensitivity."""
    import mlflow

    from components import tracking

    source = Path(source)
    name = _name(source, name)
    settings = params.evaluate
    layout = detect_layout(source, params.data.classes)
    scans = scan_source(source, layout, params)
    if scans.empty:
        raise ProjectError(f"{source}: the {layout.kind} layout holds no files")
    scans = scans.join(find_duplicates(scans, load_workspace(params), params.paths.raw,
                                       params.split.near_duplicate_distance))
    scans["dropped"] = why_dropped(scans, params.manifest.base_source)
    dropped = scans[scans.dropped.notna()]
    unreadable = scans[scans.dropped.isna() & ~scans.readable]
    candidates = scans[scans.dropped.isna() & scans.readable].reset_index(drop=True)
    log.info("%s: %d files, %d dropped (trained on, or duplicates of the %s set), %d unreadable, %d to score",
             source, len(scans), len(dropped), params.manifest.base_source, len(unreadable), len(candidates))
    if candidates.empty:
        raise ProjectError(f"{source}: nothing left to score: of {len(scans)} files, {len(dropped)} were trained on "
                           f"or duplicate {params.manifest.base_source} images and {len(unreadable)} cannot be read")

    scorer, model = (scorer, type(scorer).__name__) if scorer is not None else load_scorer(params, model_uri)
    classes = list(scorer.classes)
    if NO_TUMOR not in classes or (layout.class_labels and not set(candidates.label) <= {*classes, OTHER_TUMOR}):
        raise ProjectError(f"the model's classes {classes} do not cover {NO_TUMOR!r} and the folder's classes")
    probabilities, scored, refused = score_files(scorer, candidates.path.tolist())
    refused_rows = candidates.loc[sorted(refused)].assign(error=[refused[i] for i in sorted(refused)])
    unreadable = pd.concat([unreadable, refused_rows])
    candidates = candidates.loc[scored].reset_index(drop=True)
    if candidates.empty:
        raise ProjectError(f"{source}: the model refused every remaining file: "
                           + "; ".join(f"{r.file}: {r.error}" for r in refused_rows.itertuples()))
    cells = evaluate_scores(probabilities, candidates, classes, layout.class_labels, settings)
    counts = Counts(len(scans), len(dropped), len(unreadable), candidates).as_dict(classes, layout.class_labels)
    report = {
        "name": name, "source": str(source.resolve()), "layout": layout.kind, "model": model, "classes": classes,
        "tumor_threshold": settings.tumor_threshold, "near_duplicate_distance": params.split.near_duplicate_distance,
        "hash_size": params.manifest.hash_size, "interval_below": settings.interval_below,
        "confidence": settings.confidence, "base_source": params.manifest.base_source, "counts": counts,
        "dropped": [{"file": r.file, "reason": r.dropped, "distance": None if pd.isna(r.distance) else int(r.distance),
                     "workspace_image": r.workspace_image} for r in dropped.itertuples()],
        "unreadable": [{"file": r.file, "error": r.error} for r in unreadable.itertuples()],
        "metrics": cells[ALL],
        "by_weighting": {cell: figures for cell, figures in cells.items() if cell != ALL},
        "scans": [{"file": row.file, "tumor": bool(row.tumor), "label": row.label,
                   "weighting": row.weighting, "group": row.group,
                   "held_out_as": row.image_split if isinstance(row.image_split, str) and row.duplicate else None,
                   "nearest_workspace_distance": None if pd.isna(row.distance) else int(row.distance),
                   "tumor_score": {m: round(float(s[i]), 6) for m, s in
                                   ((m, tumor_score(p, classes)) for m, p in probabilities.items())}}
                  for i, row in enumerate(candidates.itertuples())],
    }
    out_dir = params.external.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))

    with tracking.stage_run(params, f"external-{name}", "evaluate-external") as run:
        mlflow.log_params({"source": report["source"], "name": name, "layout": layout.kind, "model": model[:500],
                           "tumor_threshold": settings.tumor_threshold,
                           "near_duplicate_distance": params.split.near_duplicate_distance})
        mlflow.log_metrics({**{f"count.{key}": value for key, value in counts.items() if isinstance(value, int)},
                            **{(f"{model_name}.{metric}" if cell == ALL else f"{metric_name(cell)}.{model_name}.{metric}"):
                               figure["value"] for cell, by_model in cells.items()
                               for model_name, figures in by_model.items() for metric, figure in figures.items()
                               if figure["value"] is not None}})
        mlflow.log_artifact(str(md_path), "external")
        mlflow.log_artifact(str(json_path), "external")
    log.info("%s: stack tumor sensitivity %s", name, _cell(cells[ALL]["stack"]["tumor_sensitivity"])
             if "stack" in cells[ALL] else "n/a")
    return {"report": str(md_path), "json": str(json_path), "run_id": run.info.run_id, "counts": counts,
            "tumor_sensitivity": {m: f["tumor_sensitivity"]["value"] for m, f in cells[ALL].items()}}


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


def _figures_table(by_model: dict[str, dict], class_labels: bool) -> list[str]:
    header = "| model | tumor sensitivity | tumor specificity | ROC-AUC |" + (" accuracy |" if class_labels else "")
    lines = [header, "|---|---|---|---|" + ("---|" if class_labels else "")]
    for model, figures in by_model.items():
        lines.append(f"| {model} | {_cell(figures['tumor_sensitivity'])} | {_cell(figures['tumor_specificity'])} | "
                     f"{_cell(figures['tumor_roc_auc'], percent=False)} |"
                     + (f" {_cell(figures['accuracy'])} |" if class_labels else ""))
    return lines


def markdown(report: dict) -> str:
    counts, classes = report["counts"], report["classes"]
    class_labels = report["layout"] in (KAGGLE, LABELS)
    lines = [
        f"# External evaluation: {report['name']}", "",
        f"**Source:** `{report['source']}` ({report['layout']} layout) · **model:** {report['model']}", "",
        f"A scan is called tumor when its tumor score 1 − P({NO_TUMOR}) is at least {report['tumor_threshold']}; "
        f"`{OTHER_TUMOR}` scans count as tumors and are left out of class accuracy. Proportions show their count; "
        f"those resting on fewer than {report['interval_below']} scans also show a "
        f"{round(100 * report['confidence'])}% Wilson interval. ROC-AUC is not a proportion and gets no interval.",
        "", "| files | count |", "|---|---|",
        f"| found | {counts['found']} |",
        f"| dropped: trained on, or a duplicate (dhash distance ≤ {report['near_duplicate_distance']}) of a "
        f"{report['base_source']} image | {counts['dropped']} |",
        f"| unreadable | {counts['unreadable']} |",
        f"| scored | {counts['scored']} ({counts['scored_tumor']} tumor, {counts['scored_healthy']} healthy) |",
    ]
    if counts.get("scored_held_out"):
        lines.append("| scored, appended to the workspace but held out by the split stage | "
                     + ", ".join(f"{s} {n}" for s, n in counts["scored_held_out"].items()) + " |")
    lines += ["", "## Tumor vs no tumor, all scored scans", "", *_figures_table(report["metrics"], class_labels)]
    for weighting, by_model in report.get("by_weighting", {}).items():
        n = counts["scored_by_weighting"].get(weighting, 0)
        lines += ["", f"## {weighting} scans ({n})", "", *_figures_table(by_model, class_labels)]
    if class_labels:
        lines += ["", "## Four classes", "", "Predicted class: the highest probability. Scored: "
                  + ", ".join(f"{c} {counts[f'scored_{c}']}" for c in [*classes, OTHER_TUMOR]) + ".", "",
                  "| model | accuracy | " + " | ".join(f"recall {c}" for c in classes) + " |",
                  "|---|---|" + "---|" * len(classes)]
        for model, figures in report["metrics"].items():
            lines.append(f"| {model} | {_cell(figures['accuracy'])} | "
                         + " | ".join(_cell(figures[f"recall_{c}"]) for c in classes) + " |")
    lines += ["", f"## Not scored: trained on, or duplicates of the {report['base_source']} set "
              f"({len(report['dropped'])})", ""]
    if report["dropped"]:
        lines += ["| file | reason | distance | workspace image |", "|---|---|---|---|"]
        lines += [f"| `{d['file']}` | {d['reason']} | {d['distance'] if d['distance'] is not None else ''} | "
                  f"`{d['workspace_image'] or ''}` |" for d in report["dropped"]]
    else:
        lines.append("None.")
    lines += ["", f"## Unreadable ({len(report['unreadable'])})", ""]
    if report["unreadable"]:
        lines += ["| file | why |", "|---|---|"]
        lines += [f"| `{u['file']}` | {str(u['error']).replace('|', '/')} |" for u in report["unreadable"]]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"
