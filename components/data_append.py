"""Append labelled scans to data/raw as a new DVC version of it: `braintumor data import --source NEW --append`.

NEW is a folder of labelled scans, NEW/<class>/... or NEW/Training/<class>/... (classes from params data.classes), or
any folder with a labels file (`--labels labels.csv`: columns `file` (path under NEW) and `label`, optionally
`weighting` (the MRI weighting the source states, one of params validate.weightings) and `group` (the source's id of
near-identical scans, e.g. adjacent slices of one case)). `--classes` takes only the rows of those labels; any other
label (e.g. `other_tumor`, a tumor of none of the classes) is refused, never trained on.
Every appended scan's provenance (source, weighting, `<source>:<group>`, its original file) goes into
data/raw/provenance.csv, versioned with the data: the manifest reads it, and the split stage keeps each group whole.
Every file is checked the way the pipeline checks data/raw: it must decode (the manifest's scan, params manifest),
and pass the validate stage's expectations (a known class, size and colour mode from params validate). A scan that is
an exact or near duplicate of a test image (the split stage's dhash and split.near_duplicate_distance) is refused
with its twin named, so new data never leaks into the evaluation. If any file is refused, nothing is appended.

Accepted scans join the training pool under data/raw/Training/<class>/ as `Ad-<cl>_<sha256[:16]><ext>`: the name
comes from the content, so it cannot collide with a Kaggle file and appending the same scan again adds nothing.
The official Testing split is never appended to. Then `dvc add data/raw` records a new data version.

This lives apart from data_import.py on purpose: data_import.py is a code dependency of the training stages
(through components.tracking), so growing it would mark every trained model stale by itself; only new data should.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import ManifestParams, Params
from components.data_import import ImportFailed, data_hash, dvc_add
from components.manifest import (
    OFFICIAL_SPLITS,
    PROVENANCE,
    PROVENANCE_COLUMNS,
    list_files,
    read_provenance,
    scan_files,
    scan_folder,
)
from components.split import hamming, hash_bits
from components.validate import manifest_expectations, quarantine_table, run_checkpoint

log = logging.getLogger(__name__)

APPEND_PREFIX = "Ad-"  # Kaggle files are Tr-*/Te-*; appended ones can never take their names
TRAINING, TESTING = "Training", "Testing"
HAMMING_CHUNK = 512  # new scans per distance matrix against the test set

# What a user does about each kind of refusal; formatted with the params in force.
FIXES = {
    "testing": "leave NEW/Testing/ out: the official test split is never appended to (training scans go in "
               "NEW/<class>/ or NEW/Training/<class>/)",
    "layout": "put every scan in a class folder, NEW/<class>/ or NEW/Training/<class>/, <class> among {classes}",
    "label": "move scans of an unknown class into a folder named after a class of params data.classes "
             "({classes}), or leave them out",
    "unreadable": "replace unreadable files with a readable copy (a complete image of at most "
                  "manifest.max_image_pixels = {max_pixels} pixels), or leave them out",
    "size": "leave out (or resize) images whose width or height is outside validate.min_side..validate.max_side "
            "({min_side}..{max_side} px)",
    "mode": "convert images to a colour mode of validate.allowed_modes ({modes}), or leave them out",
    "symlink": "copy the file itself into NEW instead of a symlink that points outside it",
    "test_twin": "leave out copies and near duplicates of test images: training on them would leak the evaluation "
                 "(a dhash Hamming distance <= split.near_duplicate_distance = {distance} makes two scans twins)",
    "conflict": "keep each scan under one class only (the class it already has in data/raw, if it is there)",
    "collision": "remove the file already at that name in data/raw (it does not hold the content its name says)",
    "not_a_class": "take only rows of training classes with --classes (e.g. --classes {class_flag}); a label outside "
                   "params data.classes (such as other_tumor) is never trained on: score those scans with "
                   "`braintumor evaluate-external` instead",
    "missing": "fix the `file` column of the labels file (paths relative to NEW), or add the missing files",
    "weighting": "state a weighting of validate.weightings ({weightings}), or leave the `weighting` cell empty",
}
COLUMN_KINDS = {"label": "label", "readable": "unreadable", "width": "size", "height": "size", "mode": "mode",
                "link_escapes": "symlink"}


@dataclass(frozen=True)
class Labels:
    """A labels file and the rows to take from it."""
    file: Path
    classes: tuple[str, ...] | None  # None: every row must be of a training class
    sample: int | None = None  # only the first rows of each label (a smoke run)


def read_labels(source: Path, labels: Labels, params: Params) -> tuple[pd.DataFrame, list[Refusal], dict[str, int]]:
    """(rows to take: file, label, weighting, group; refusals; rows left out per label). A row of a label outside
    data.classes is refused, unless --classes leaves it out; an unknown --classes label is an error."""
    if labels.classes is not None and not set(labels.classes) <= set(params.data.classes):
        outside = sorted(set(labels.classes) - set(params.data.classes))
        raise ImportFailed(f"--classes {','.join(labels.classes)}: {', '.join(outside)} is not a class of params "
                           f"data.classes ({', '.join(params.data.classes)}); such scans are never trained on")
    path = labels.file if labels.file.is_absolute() or labels.file.exists() else source / labels.file
    if not path.is_file():
        raise ImportFailed(f"labels file {labels.file} not found (given as a path, or under {source})")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing_columns = {"file", "label"} - set(table.columns)
    if missing_columns:
        raise ImportFailed(f"{path} lacks the column(s) {', '.join(sorted(missing_columns))}: a labels file holds "
                           "`file` and `label`, optionally `weighting` and `group`")
    table = table.reindex(columns=["file", "label", "weighting", "group"], fill_value="").replace("", None)
    left_out = {}
    if labels.classes is not None:
        taken = table.label.isin(labels.classes)
        left_out = table[~taken].label.value_counts().sort_index().to_dict()
        table = table[taken]
    if labels.sample is not None:
        table = table.groupby("label", sort=False).head(labels.sample)
    refusals = [Refusal(str(source / row.file), f"labelled {row.label!r}, not a class of params data.classes",
                        ("not_a_class",)) for row in table[~table.label.isin(params.data.classes)].itertuples()]
    table = table[table.label.isin(params.data.classes)]
    exists = np.array([(source / f).is_file() for f in table.file], dtype=bool)
    refusals += [Refusal(str(source / f), f"listed in {path.name} but not found", ("missing",))
                 for f in table.file[~exists]]
    table = table[exists]
    bad = table.weighting.notna() & ~table.weighting.isin(params.validate_params.weightings)
    refusals += [Refusal(str(source / row.file), f"weighting {row.weighting!r} is none of validate.weightings",
                         ("weighting",)) for row in table[bad].itertuples()]
    return table[~bad].reset_index(drop=True), refusals, {k: int(v) for k, v in left_out.items()}


@dataclass(frozen=True)
class Refusal:
    file: str  # the file as found under NEW
    reason: str
    kinds: tuple[str, ...]  # keys of FIXES


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def scan_source(source: Path, params: Params) -> tuple[pd.DataFrame, list[Refusal]]:
    """The manifest's scan of every file under `source` (hidden ones skipped), with `label` (the class folder) and
    `file` (the file's path under `source`); files outside a class folder or under Testing/ are refused here."""
    frame = scan_folder(source, params.manifest)
    refusals, labels, keep = [], [], []
    for relative in frame.path:
        parts = Path(relative).parts
        inner = parts[1:] if parts[0] == TRAINING else parts
        label = inner[0] if len(inner) > 1 else ""
        labels.append(label)
        keep.append(parts[0] != TESTING and bool(label))
        if parts[0] == TESTING:
            refusals.append(Refusal(str(source / relative), "under Testing/: appended scans only join the "
                                    "training pool", ("testing",)))
        elif not label:
            refusals.append(Refusal(str(source / relative), "not inside a class folder", ("layout",)))
    frame = frame.assign(label=labels, file=[str(source / p) for p in frame.path])
    return frame[np.array(keep, dtype=bool)].reset_index(drop=True), refusals


def scan_labelled(source: Path, labels: Labels, params: Params) -> tuple[pd.DataFrame, list[Refusal], dict]:
    """scan_source for a labels file: the manifest's scan of each taken row, with its label, weighting and group."""
    table, refusals, left_out = read_labels(source, labels, params)
    frame = scan_files(source, table.file.tolist(), table.label.tolist(), params.manifest, f"reading {source}")
    frame = frame.assign(file=[str(source / f) for f in table.file], weighting=table.weighting.to_numpy(),
                         group=table.group.to_numpy())
    return frame, refusals, left_out


def validate_scans(scans: pd.DataFrame, params: Params, docs_dir: Path) -> list[Refusal]:
    """The validate stage's own expectations (known label, no escaping symlink, readable, size, mode) over the new
    scans, run through the same GX checkpoint. Every offending row is refused, whatever the stage's `mostly`
    tolerance: that tolerance is for a data set of thousands, a new file either passes or is not appended."""
    if scans.empty:
        return []
    hard, row_level = manifest_expectations(params.validate_params, params.data.classes)
    check = run_checkpoint("append", scans.drop(columns=["file", "group"], errors="ignore"), hard + row_level, "path",
                           docs_dir)
    kinds: dict[str, set[str]] = {}
    for expectation, paths in check.unexpected.items():
        column = re.search(r"column='(\w+)'", expectation)
        for path in paths:
            kinds.setdefault(path, set()).add(COLUMN_KINDS.get(column.group(1) if column else "", "unreadable"))
    files = scans.set_index("path").file
    refusals = []
    for row in quarantine_table(scans, check).itertuples():
        reason = row.reason if "label" not in kinds[row.path] else f"unknown class {row.label!r}: {row.reason}"
        refusals.append(Refusal(files[row.path], reason, tuple(sorted(kinds[row.path]))))
    return refusals


def testing_hashes(raw_dir: Path, manifest_path: Path, params: ManifestParams) -> tuple[pd.DataFrame, str]:
    """(path under raw_dir, content_hash, dhash) of every Testing image of raw_dir, and where they were read from.

    The workspace manifest already holds every test image's sha256 and dhash, computed by the same code; reusing it
    saves decoding the whole test set (~1,300 images, several seconds on two cores). But the test set decides what
    may be appended, so a stale manifest (another data version checked out, Testing files edited, a different
    manifest.hash_size) must never be the judge. It is used only when it is current for Testing: it lists exactly
    the Testing files on disk, each with the sha256 the file has now, with hashes of this hash_size. Currency is
    judged on content, not with `dvc status manifest`: that re-hashes all of data/raw, and calls the manifest stale
    after any append or any code edit although its Testing rows are still right (an append never touches Testing).
    Otherwise the hashes come from the raw Testing files, with the manifest's own scan."""
    raw_dir = Path(raw_dir)
    on_disk = {f.relative_to(raw_dir).as_posix(): f for f in list_files(raw_dir)
               if f.relative_to(raw_dir).parts[0] == TESTING}
    columns = ["path", "content_hash", "dhash"]
    why = f"{manifest_path} not found"
    if Path(manifest_path).exists():
        manifest = pd.read_parquet(manifest_path, columns=["path", "official_split", "content_hash", "dhash"])
        rows = manifest[manifest.official_split == OFFICIAL_SPLITS[TESTING]]
        width = math.ceil(params.hash_size ** 2 / 4)  # hex digits of a hash_size x hash_size bit dhash
        if set(rows.path) != set(on_disk):
            why = f"{manifest_path} lists other Testing files than {raw_dir / TESTING}"
        elif any(h is not None and len(h) != width for h in rows.dhash):
            why = f"{manifest_path} holds dhashes of another manifest.hash_size"
        elif any(_sha256(on_disk[p]) != h for p, h in zip(rows.path, rows.content_hash)):
            why = f"Testing files changed since {manifest_path} was written"
        else:
            return rows[columns].reset_index(drop=True), f"manifest ({manifest_path}, current for Testing)"
    scanned = scan_folder(raw_dir / TESTING, params)
    scanned["path"] = [f"{TESTING}/{p}" for p in scanned.path]
    return scanned[columns], f"raw Testing files ({why})"


def twin_refusals(scans: pd.DataFrame, test: pd.DataFrame, raw_dir: Path, distance: int) -> list[Refusal]:
    """Scans that are byte copies of a test image (sha256), or near duplicates of one (dhash within `distance`, as
    the split stage judges twins), each with its nearest test image."""
    refusals = []
    by_hash = test[test.content_hash != ""].drop_duplicates("content_hash").set_index("content_hash").path
    exact = scans.content_hash.isin(by_hash.index)
    for row in scans[exact].itertuples():
        refusals.append(Refusal(row.file, f"exact copy of test image {Path(raw_dir) / by_hash[row.content_hash]}",
                                ("test_twin",)))
    hashed = test[test.dhash.notna()].reset_index(drop=True)
    candidates = scans[~exact & scans.dhash.notna()].reset_index(drop=True)
    if hashed.empty or candidates.empty:
        return refusals
    test_bits, new_bits = hash_bits(hashed.dhash), hash_bits(candidates.dhash)
    for start in range(0, len(candidates), HAMMING_CHUNK):
        distances = hamming(new_bits[start:start + HAMMING_CHUNK], test_bits)
        nearest = distances.argmin(axis=1)
        for offset, (twin, best) in enumerate(zip(nearest, distances.min(axis=1))):
            if best <= distance:
                refusals.append(Refusal(
                    candidates.file[start + offset],
                    f"near duplicate of test image {Path(raw_dir) / hashed.path[twin]} (dhash Hamming distance "
                    f"{best} <= split.near_duplicate_distance {distance})", ("test_twin",)))
    return refusals


def plan_copies(scans: pd.DataFrame, raw_dir: Path, classes: list[str]
                ) -> tuple[list[tuple[Path, Path, str]], dict[str, int], list[Refusal]]:
    """([(source file, target in data/raw, label)], skipped per class, refusals).

    A scan whose bytes are already in data/raw/Training under the same class (appended before, or a Kaggle file) is
    skipped, and so is a second copy within NEW; the same bytes under two classes are refused."""
    raw_dir = Path(raw_dir)
    present = {}  # sha256 -> (path under raw_dir, class) of every Training file
    for path in list_files(raw_dir):
        relative = path.relative_to(raw_dir)
        if relative.parts[0] == TRAINING and len(relative.parts) > 2:
            present.setdefault(_sha256(path), (relative.as_posix(), relative.parts[1]))
    plan, refusals = [], []
    skipped = dict.fromkeys(classes, 0)
    for content_hash, group in scans.sort_values("file").groupby("content_hash", sort=True):
        labels = sorted(set(group.label))
        if len(labels) > 1 or (content_hash in present and present[content_hash][1] not in labels):
            where = ([f"{raw_dir / present[content_hash][0]} ({present[content_hash][1]})"]
                     if content_hash in present else [])
            for row in group.itertuples():
                others = where + [f"{f} ({label})" for f, label in zip(group.file, group.label) if f != row.file]
                refusals.append(Refusal(row.file, f"labelled {row.label}, but the same bytes are also at "
                                        f"{', '.join(others)}", ("conflict",)))
            continue
        label = labels[0]
        if content_hash in present:
            skipped[label] += len(group)
            continue
        first = group.iloc[0]
        name = f"{APPEND_PREFIX}{label[:2]}_{content_hash[:16]}{Path(first.file).suffix.lower()}"
        target = raw_dir / TRAINING / label / name
        if target.exists() or target.is_symlink():
            refusals.append(Refusal(first.file, f"{target} already exists with other content", ("collision",)))
            continue
        plan.append((Path(first.file), target, label))
        skipped[label] += len(group) - 1
    return plan, skipped, refusals


def refusal_message(source: Path, refusals: list[Refusal], total: int, raw_dir: Path, old_hash: str,
                    params: Params) -> str:
    values = dict(classes=", ".join(params.data.classes), class_flag=",".join(params.data.classes),
                  max_pixels=params.manifest.max_image_pixels,
                  weightings=", ".join(params.validate_params.weightings),
                  min_side=params.validate_params.min_side, max_side=params.validate_params.max_side,
                  modes=", ".join(params.validate_params.allowed_modes),
                  distance=params.split.near_duplicate_distance)
    refusals = sorted(refusals, key=lambda r: r.file)
    kinds = sorted({kind for r in refusals for kind in r.kinds}, key=list(FIXES).index)
    return "\n".join([
        f"{len({r.file for r in refusals})} of {total} file(s) in {source} refused; nothing was appended "
        f"({raw_dir} and its DVC version {old_hash or '(untracked)'} are unchanged):",
        *(f"  {r.file}: {r.reason}" for r in refusals),
        "fix:",
        *(f"  - {FIXES[kind].format(**values)}" for kind in kinds),
        f"then run the same `braintumor data import --source {source} --append ...` again",
    ])


def provenance_rows(plan: list[tuple[Path, Path, str]], scans: pd.DataFrame, source: Path, source_name: str,
                    raw_dir: Path) -> pd.DataFrame:
    """One provenance row per scan the plan copies: its path under raw_dir, the source, its stated weighting and
    `<source>:<group>` (when the labels file gives them), and its original file under `source`."""
    by_file = scans.set_index("file")
    rows = []
    for origin, target, _ in plan:
        row = by_file.loc[str(origin)]
        weighting = row.get("weighting")
        group = row.get("group")
        rows.append({"path": target.relative_to(raw_dir).as_posix(), "source": source_name,
                     "weighting": weighting if isinstance(weighting, str) else None,
                     "source_group": f"{source_name}:{group}" if isinstance(group, str) else None,
                     "original": Path(origin).relative_to(source).as_posix()})
    return pd.DataFrame(rows, columns=PROVENANCE_COLUMNS)


def append_dataset(source: str | Path, params: Params, labels: Labels | None = None,
                   source_name: str | None = None) -> dict:
    """Check every file of `source` (all-or-nothing), copy the accepted ones into params.paths.raw/Training/<class>/,
    record their provenance and `dvc add` it. With `labels` the scans and their labels come from a labels file.
    Returns counts per class (added, skipped as already present, left out by --classes), where the test hashes
    came from, and the DVC hash before and after. Raises ImportFailed naming each refused file, its reason and the
    fix."""
    source, raw_dir = Path(source), Path(params.paths.raw)
    source_name = source_name or source.resolve().name
    dvc_file = raw_dir.with_name(raw_dir.name + ".dvc")
    if not source.is_dir():
        raise ImportFailed(f"{source} is not a folder: --append takes a folder of labelled scans, NEW/<class>/ or "
                           "NEW/Training/<class>/")
    if not all((raw_dir / part).is_dir() for part in OFFICIAL_SPLITS):
        raise ImportFailed(f"{raw_dir} holds no Training/ and Testing/ to append to: run `braintumor data import "
                           "--source SRC` first")
    if source.resolve().is_relative_to(raw_dir.resolve()) or raw_dir.resolve().is_relative_to(source.resolve()):
        raise ImportFailed(f"{source} overlaps {raw_dir}: append from a folder outside the data set")
    old_hash = data_hash(dvc_file)

    left_out: dict[str, int] = {}
    if labels is not None:
        scans, refusals, left_out = scan_labelled(source, labels, params)
    else:
        scans, refusals = scan_source(source, params)
    total = len(scans) + len(refusals)
    if not total:
        raise ImportFailed(f"{source} holds no files (hidden files and folders are skipped)")
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw_dir.parent, prefix=".append-") as scratch:
        scratch = Path(scratch)
        refusals += validate_scans(scans, params, scratch / "validation")
        scans = scans[~scans.file.isin({r.file for r in refusals})]
        test, test_from = testing_hashes(raw_dir, params.paths.manifest, params.manifest)
        refusals += twin_refusals(scans, test, raw_dir, params.split.near_duplicate_distance)
        scans = scans[~scans.file.isin({r.file for r in refusals})]
        plan, skipped, conflicts = plan_copies(scans, raw_dir, params.data.classes)
        refusals += conflicts
        if refusals:
            raise ImportFailed(refusal_message(source, refusals, total, raw_dir, old_hash, params))

        # Copy into the scratch folder first (a full disk fails here, before data/raw is touched), then rename:
        # same file system, so each move is atomic, and a failure rolls back the moves done (and the provenance).
        staged = []
        for origin, target, _ in plan:
            copy = scratch / "staged" / target.parent.name / target.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(origin, copy)
            staged.append((copy, target))
        provenance_file, kept_provenance = raw_dir / PROVENANCE, scratch / "provenance.before"
        if plan:
            new_rows = provenance_rows(plan, scans, source, source_name, raw_dir)
            pd.concat([read_provenance(raw_dir), new_rows]).to_csv(scratch / PROVENANCE, index=False)
            if provenance_file.exists():
                shutil.copyfile(provenance_file, kept_provenance)
        moved: list[Path] = []
        try:
            for copy, target in staged:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(copy, target)
                moved.append(target)
            if plan:
                os.replace(scratch / PROVENANCE, provenance_file)
            new_hash = dvc_add(raw_dir) if plan else old_hash
        except BaseException:
            for target in moved:
                target.unlink(missing_ok=True)
            if plan:
                if kept_provenance.exists():
                    os.replace(kept_provenance, provenance_file)
                else:
                    provenance_file.unlink(missing_ok=True)
            raise

    added = dict.fromkeys(params.data.classes, 0)
    for _, _, label in plan:
        added[label] += 1
    present = sum(skipped.values())
    message = (f"appended {len(plan)} scan(s) to {raw_dir / TRAINING}; new data version {new_hash}: run the pipeline "
               f"(`braintumor flow train` or `dvc repro`) to retrain on it, and commit {dvc_file}"
               if plan else f"nothing appended: all {present} scan(s) are already in {raw_dir}; the data version is "
               "unchanged")
    log.info(message)
    return {"source": str(source), "source_name": source_name, "raw_dir": str(raw_dir), "appended": len(plan),
            "added": added, "skipped_already_present": skipped, "left_out_by_classes": left_out,
            "test_hashes_from": test_from, "old_dvc_hash": old_hash,
            "dvc_hash": new_hash, "new_version": new_hash != old_hash, "message": message}
