"""Bring a data set in the Kaggle layout into data/raw and version it with `dvc add`.

SRC is a local folder, a .zip, or `kaggle:<owner>/<dataset>`. Hidden files and folders (such as a stray
`.ipynb_checkpoints`) are not part of the data set and are not copied. The source is never written to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

from components.config import ProjectError

KAGGLE_PREFIX = "kaggle:"
LAYOUT = ("Training", "Testing")


class ImportFailed(ProjectError):
    pass


def _find_layout_root(folder: Path) -> Path:
    """The folder holding Training/ and Testing/ (a zip often nests it one level down)."""
    for candidate in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        if all((candidate / part).is_dir() for part in LAYOUT):
            return candidate
    raise ImportFailed(f"{folder} has no Training/<class>/ and Testing/<class>/ folders (Kaggle layout)")


def _download_kaggle(dataset: str, into: Path) -> Path:
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi  # optional extra: pip install 'braintumor[kaggle]'
    except ImportError:
        raise ImportFailed("the Kaggle client is not installed: pip install 'braintumor[kaggle]'") from None
    has_token = (Path.home() / ".kaggle" / "kaggle.json").exists() or (
        os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"))
    if not has_token:
        raise ImportFailed("no Kaggle credentials: put kaggle.json in ~/.kaggle/ or set KAGGLE_USERNAME and "
                           "KAGGLE_KEY (kaggle.com > Settings > API > Create New Token)")
    api = KaggleApi()
    try:
        api.authenticate()
        api.dataset_download_files(dataset, path=str(into), unzip=True, quiet=False)
    except Exception as exc:  # the client raises bare HTTP/connection errors
        raise ImportFailed(f"could not download kaggle:{dataset} (network or credentials?): {exc}") from None
    return into


def _hidden(folder: str, names: list[str]) -> set[str]:
    """shutil.copytree ignore: dot files and dot folders (such as `.ipynb_checkpoints`) are not data."""
    return {name for name in names if name.startswith(".")}


def keep_first(folder: Path, count: int) -> None:
    """Delete all but the first `count` files (by name) of every class folder under `folder`."""
    for class_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        for extra in sorted(p for p in class_folder.rglob("*") if p.is_file())[count:]:
            extra.unlink()


def import_dataset(source: str, raw_dir: Path, run_dvc_add: bool = True, sample: int | None = None) -> dict:
    """Replace raw_dir with the source's Training/ and Testing/ folders, then `dvc add` it. With `sample`, only the
    first `sample` files of each Training class folder and a quarter as many of each Testing one (by name, at least
    one): a small, fixed data set for a smoke run.

    The copy lands in a sibling temp folder first, so a failed import leaves the previous data/raw intact.
    """
    raw_dir = Path(raw_dir)
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw_dir.parent, prefix=".import-") as scratch:
        scratch = Path(scratch)
        if source.startswith(KAGGLE_PREFIX):
            origin = _find_layout_root(_download_kaggle(source[len(KAGGLE_PREFIX):], scratch / "download"))
        elif source.endswith(".zip"):
            if not Path(source).is_file():
                raise ImportFailed(f"{source} does not exist")
            with zipfile.ZipFile(source) as archive:
                archive.extractall(scratch / "unzipped")
            origin = _find_layout_root(scratch / "unzipped")
        else:
            if not Path(source).is_dir():
                raise ImportFailed(f"{source} is not a folder, a .zip or kaggle:<owner>/<dataset>")
            origin = _find_layout_root(Path(source))
        staged = scratch / "raw"
        for part in LAYOUT:
            shutil.copytree(origin / part, staged / part, ignore=_hidden, symlinks=True)
            if sample is not None:
                keep_first(staged / part, sample if part == "Training" else max(1, sample // 4))
        files = sum(1 for part in LAYOUT for path in (staged / part).rglob("*") if not path.is_dir())
        if raw_dir.exists():
            shutil.rmtree(raw_dir)
        staged.rename(raw_dir)
    result = {"source": source, "files": files, "raw_dir": str(raw_dir), **({"sample": sample} if sample else {})}
    if run_dvc_add:
        result["dvc_hash"] = dvc_add(raw_dir)
    return result


def dvc_add(path: Path) -> str:
    """`dvc add` the folder and return the md5 recorded in its .dvc file."""
    done = subprocess.run(["dvc", "add", "--quiet", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ImportFailed(f"`dvc add {path}` failed (is this a DVC repo? run `dvc init`): {(done.stderr or done.stdout).strip()}")
    return data_hash(path.with_name(path.name + ".dvc"))


def data_hash(dvc_file: Path) -> str:
    """The md5 of a DVC-tracked folder, as written in its .dvc file ('' when it is not tracked)."""
    import yaml

    if not Path(dvc_file).exists():
        return ""
    outs = yaml.safe_load(Path(dvc_file).read_text()).get("outs", [])
    return outs[0].get("md5", "") if outs else ""
