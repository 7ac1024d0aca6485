"""Scan data/raw into a table: one row per file, readable or not. Nothing under raw is modified.

Provenance: data/raw/provenance.csv (written by `data import --append`, versioned with the data) names the source of
each appended scan, the MRI weighting its source states, and its source's group (adjacent slices of one case); every
file it does not list comes from the imported data set, params manifest.base_source, with no stated weighting."""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import imagehash
import pandas as pd

from components.config import ManifestParams
from components.images import ImageError, open_image
from components.progress import track

log = logging.getLogger(__name__)

OFFICIAL_SPLITS = {"Training": "train", "Testing": "test"}
PROVENANCE = "provenance.csv"  # inside the raw folder, so DVC versions it with the scans it describes
PROVENANCE_COLUMNS = ["path", "source", "weighting", "source_group", "original"]


@dataclass
class ManifestRow:
    path: str  # relative to the raw root, POSIX style
    label: str
    official_split: str
    width: float | None
    height: float | None
    mode: str | None
    bytes: int
    content_hash: str
    dhash: str | None
    readable: bool
    error: str | None
    link_escapes: bool  # a symlink pointing outside the raw tree
    source: str | None = None  # the collection the scan came from (provenance.csv, else manifest.base_source)
    weighting: str | None = None  # MRI weighting as the source states it (T1, T1C+, T2), None when it states none
    source_group: str | None = None  # `<source>:<group>`: the source's group of near-identical scans, kept whole


def list_files(raw_dir: Path) -> list[Path]:
    """Files in Training/<class>/ and Testing/<class>/, skipping hidden files and folders (.ipynb_checkpoints)."""
    files = []
    for split_dir in OFFICIAL_SPLITS:
        root = raw_dir / split_dir
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is missing: {raw_dir} must hold Training/<class>/ and Testing/<class>/")
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return files


def _scan(args: tuple[Path, Path, ManifestParams]) -> ManifestRow:
    path, raw_dir, params = args
    relative = path.relative_to(raw_dir)
    label = relative.parts[1] if len(relative.parts) > 2 else ""
    return _scan_one(path, raw_dir, label, OFFICIAL_SPLITS[relative.parts[0]], params)


def _scan_one(path: Path, raw_dir: Path, label: str, official_split: str, params: ManifestParams) -> ManifestRow:
    relative = path.relative_to(raw_dir)
    link_escapes = path.is_symlink() and not path.resolve().is_relative_to(raw_dir.resolve())
    base = dict(path=relative.as_posix(), label=label, official_split=official_split, link_escapes=link_escapes)
    if link_escapes:
        return ManifestRow(**base, width=None, height=None, mode=None, bytes=0, content_hash="", dhash=None,
                           readable=False, error=f"symlink leaves the data tree (-> {path.resolve()})")
    data = path.read_bytes()
    row = dict(base, bytes=len(data), content_hash=hashlib.sha256(data).hexdigest())
    try:
        image = open_image(data, params.max_image_pixels)
    except ImageError as exc:
        return ManifestRow(**row, width=None, height=None, mode=None, dhash=None, readable=False, error=str(exc))
    return ManifestRow(**row, width=image.width, height=image.height, mode=image.mode,
                       dhash=str(imagehash.dhash(image, hash_size=params.hash_size)), readable=True, error=None)


def scan_folder(folder: Path, params: ManifestParams) -> pd.DataFrame:
    """Manifest rows for a flat folder of new scans (no labels): the same checks as training data."""
    folder = Path(folder)
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    rows = [_scan_one(f, folder, "", "inference", params) for f in files]
    return pd.DataFrame([asdict(r) for r in rows], columns=list(ManifestRow.__dataclass_fields__))


def _scan_labelled(args: tuple[Path, Path, str, ManifestParams]) -> ManifestRow:
    path, root, label, params = args
    return _scan_one(path, root, label, "external", params)


def scan_files(root: Path, files: list[str], labels: list[str], params: ManifestParams, what: str) -> pd.DataFrame:
    """Manifest rows of the given files (paths relative to `root`, with their labels), read in params.workers
    processes, with a progress line."""
    jobs = [(Path(root) / f, Path(root), label, params) for f, label in zip(files, labels)]
    with ProcessPoolExecutor(params.workers) as pool:
        rows = list(track(pool.map(_scan_labelled, jobs, chunksize=32), len(jobs), what, log))
    return pd.DataFrame([asdict(r) for r in rows], columns=list(ManifestRow.__dataclass_fields__))


def read_provenance(raw_dir: Path) -> pd.DataFrame:
    """raw_dir/provenance.csv (empty when there is none): one row per appended scan."""
    path = Path(raw_dir) / PROVENANCE
    if not path.exists():
        return pd.DataFrame(columns=PROVENANCE_COLUMNS)
    return pd.read_csv(path, dtype=str, keep_default_na=False).replace("", None)


def build_manifest(raw_dir: Path, params: ManifestParams) -> pd.DataFrame:
    raw_dir = Path(raw_dir)
    files = list_files(raw_dir)
    jobs = [(f, raw_dir, params) for f in files]
    with ProcessPoolExecutor(params.workers) as pool:
        rows = list(track(pool.map(_scan, jobs, chunksize=64), len(jobs), f"reading {raw_dir}", log))
    frame = pd.DataFrame([asdict(r) for r in rows], columns=list(ManifestRow.__dataclass_fields__))
    provenance = read_provenance(raw_dir).set_index("path")
    for column in ("source", "weighting", "source_group"):
        frame[column] = frame.path.map(provenance[column]) if len(provenance) else None
    frame["source"] = frame.source.fillna(params.base_source)
    return frame


def write_manifest(raw_dir: Path, out: Path, params: ManifestParams) -> pd.DataFrame:
    frame = build_manifest(raw_dir, params)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False)
    return frame
