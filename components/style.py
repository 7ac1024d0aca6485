"""Acquisition style of a scan, read from its pixels and its file alone, never from its label
(`braintumor style`: paths.style, read by style-balanced training, the shortcut audit and the drift reference).

Two kinds of feature:
- MRI weighting: intensity statistics of the head, inside versus its rim. In a T2-weighted (or FLAIR) scan the
  cerebrospinal fluid and parenchyma are bright relative to the scalp; in a contrast-enhanced T1 scan the scalp fat
  is the brightest tissue and the ventricles are dark. No single statistic separates the two well (measured on a
  hand-labelled sample: docs/audit.md), so the audit combines them in a small classifier fitted on hand labels.
- Source cues: colour mode as stored, residual colour, JPEG quality, image size and aspect, framing (how much of
  the image the head fills, how wide the black border is) and file size.

The head is found as in components.images (Otsu threshold, largest component, holes filled), so the audit's idea
of the head is the one the models' crop uses.

The stage gives every readable scan of the manifest its features, its split, and its MRI weighting, T1-like or
T2-like: a logistic regression on the weighting features, fitted on the hand-labelled scans of style.hand_labels
(weighting labels, never tumor labels), its agreement with them measured out of fold. With fewer than
style.min_hand_labels of them in the data (a toy data set), the documented one-feature rule
inner_to_rim > style.t2_ratio takes its place, and paths.metrics/style.json says so.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage, stats

from components.config import Params, ProjectError, StyleParams
from components.images import ImageError, head_mask, open_image
from components.progress import track

log = logging.getLogger(__name__)

T1, T2 = "T1-like", "T2-like"
SPLIT_ORDER = ("train", "val", "stack", "gate", "test")

# Inside the head: pixels deeper than this share of the head's largest inscribed radius; rim: within this share.
INNER_DEPTH, RIM_DEPTH = 0.30, 0.15

WEIGHTING_FEATURES = ["inner_skew", "inner_dark_share", "inner_bright_share", "inner_to_rim", "inner_p99_to_rim_p95",
                      "inner_median", "rim_p95", "inner_cv", "inner_p99_to_median"]
SOURCE_FEATURES = ["stored_rgb", "residual_colour", "jpeg_quality", "width", "height", "aspect", "head_fill",
                   "border_share", "file_kib"]
STYLE_FEATURES = WEIGHTING_FEATURES + SOURCE_FEATURES


def jpeg_quality(image) -> float:
    """An estimate of the encoder's quality setting from the luminance quantisation table (IJG scaling of the
    standard table, whose mean is 57.6 at quality 50); NaN for a file that is not a JPEG."""
    tables = getattr(image, "quantization", None)
    if not tables:
        return float("nan")
    mean = float(np.mean(tables[min(tables)]))
    scale = 100.0 * mean / 57.625  # percent of the quality-50 table
    quality = (200.0 - scale) / 2.0 if scale <= 100 else 5000.0 / scale
    return float(np.clip(quality, 1, 100))


def weighting_statistics(gray: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Intensity statistics of the head's inside against its rim (gray in 0..1); see the module docstring."""
    depth = ndimage.distance_transform_edt(mask)
    radius = float(depth.max()) or 1.0
    inner, rim = gray[depth > INNER_DEPTH * radius], gray[mask & (depth <= RIM_DEPTH * radius)]
    if inner.size < 16 or rim.size < 16:  # no head found: a blank or a tiny image
        inner = rim = gray.ravel()
    median = float(np.median(inner)) + 1e-3
    rim_p95 = float(np.percentile(rim, 95)) + 1e-3
    return {
        "inner_skew": float(stats.skew(inner)) if inner.std() > 0 else 0.0,
        "inner_dark_share": float(np.mean(inner < 0.6 * median)),
        "inner_bright_share": float(np.mean(inner > 1.4 * median)),
        "inner_to_rim": median / (float(np.median(rim)) + 1e-3),
        "inner_p99_to_rim_p95": float(np.percentile(inner, 99)) / rim_p95,
        "inner_median": median,
        "rim_p95": rim_p95,
        "inner_cv": float(inner.std()) / median,
        "inner_p99_to_median": float(np.percentile(inner, 99)) / median,
    }


def style_features(data: bytes, max_pixels: int = 50_000_000) -> dict[str, float]:
    """Every STYLE_FEATURES value of one encoded image; ImageError if it cannot be decoded."""
    image = open_image(data, max_pixels)
    stored = image.mode
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    gray = rgb.mean(axis=2)
    mask = head_mask(gray)
    rows, cols = np.nonzero(mask)
    if rows.size:
        head_box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        border = 1.0 - head_box / gray.size
    else:
        border = 1.0
    return {
        **weighting_statistics(gray, mask),
        "stored_rgb": float(stored not in ("L", "I", "I;16", "F", "1")),
        "residual_colour": float(np.abs(rgb - gray[..., None]).mean()),
        "jpeg_quality": jpeg_quality(image),
        "width": float(image.width),
        "height": float(image.height),
        "aspect": image.width / image.height,
        "head_fill": float(mask.mean()),
        "border_share": float(border),
        "file_kib": len(data) / 1024.0,
    }


def _row(path: str) -> dict:
    try:
        return {"path": path, **style_features(Path(path).read_bytes())}
    except (ImageError, OSError) as exc:
        return {"path": path, "error": str(exc)}


def style_frame(paths: list[str], workers: int = 1) -> pd.DataFrame:
    """One row per path: STYLE_FEATURES, and `error` (None when the file decoded)."""
    paths = [str(p) for p in paths]
    if workers > 1 and len(paths) > 64:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(track(pool.map(_row, paths, chunksize=64), len(paths), "style features", log))
    else:
        rows = [_row(p) for p in paths]
    frame = pd.DataFrame(rows, columns=["path", *STYLE_FEATURES, "error"])
    return frame.astype({name: float for name in STYLE_FEATURES})



def weighting_model(features: pd.DataFrame, hand: pd.DataFrame, style: StyleParams, seed: int):
    """(predict: features -> is-T2 booleans, the method and its agreement with the hand labels as value, k, n)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labelled = features.merge(hand, on="file")
    labelled = labelled[labelled[WEIGHTING_FEATURES].notna().all(axis=1)]
    is_t2 = (labelled.weighting == T2).to_numpy()

    def agreement(predicted: np.ndarray) -> dict | None:
        agree = int(np.sum(predicted == is_t2))
        return {"value": agree / len(labelled), "k": agree, "n": len(labelled)} if len(labelled) else None

    if len(labelled) < style.min_hand_labels or is_t2.all() or not is_t2.any():
        def predict_rule(frame: pd.DataFrame) -> np.ndarray:
            return (frame.inner_to_rim > style.t2_ratio).to_numpy()

        return predict_rule, {"method": f"rule inner_to_rim > {style.t2_ratio}",
                              "why": f"{len(labelled)} of the hand-labelled scans are in the data "
                                     f"(style.min_hand_labels is {style.min_hand_labels})",
                              "agreement": agreement(predict_rule(labelled))}

    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=style.regularisation, max_iter=1000))
    folds = min(style.folds, int(is_t2.sum()), int((~is_t2).sum()))
    out_of_fold = cross_val_predict(classifier, labelled[WEIGHTING_FEATURES], is_t2,
                                    cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    classifier.fit(labelled[WEIGHTING_FEATURES], is_t2)

    def predict(frame: pd.DataFrame) -> np.ndarray:
        usable = frame[WEIGHTING_FEATURES].notna().all(axis=1).to_numpy()
        out = np.zeros(len(frame), dtype=bool)
        if usable.any():
            out[usable] = classifier.predict(frame.loc[usable, WEIGHTING_FEATURES])
        return out

    return predict, {
        "method": f"logistic regression on {len(WEIGHTING_FEATURES)} weighting features, fitted on "
                  f"{len(labelled)} hand-labelled scans ({int(is_t2.sum())} T2-like)",
        "agreement": agreement(out_of_fold),
        "agreement_note": f"{folds}-fold out-of-fold predictions against the hand labels",
    }


def split_membership(params: Params) -> pd.DataFrame:
    """path (as the splits write it), split, and clean for test."""
    frames = []
    for split in SPLIT_ORDER:
        path = params.paths.splits / f"{split}.csv"
        if not path.exists():
            raise ProjectError(f"{path} not found: run `dvc repro split` (or `dvc pull`) first")
        frame = pd.read_csv(path)
        frames.append(frame[["path"]].assign(split=split, clean=frame["clean"] if "clean" in frame else False))
    return pd.concat(frames, ignore_index=True)


def run_style(params: Params) -> dict:
    """Write paths.style (one row per readable scan: path as the splits write it, file under data/raw, label,
    stored mode, STYLE_FEATURES, error, weighting, split) and paths.metrics/style.json (the weighting method)."""
    manifest = pd.read_parquet(params.paths.manifest)
    manifest = manifest[manifest.readable].reset_index(drop=True)
    manifest["full_path"] = [(Path(params.paths.raw) / p).as_posix() for p in manifest.path]
    features = style_frame(manifest.full_path.tolist(), params.manifest.workers).drop(columns="path")
    features = pd.concat([manifest[["path", "full_path", "label", "mode"]].rename(columns={"path": "file"}),
                          features], axis=1)
    hand_path = Path(params.style.hand_labels)
    if not hand_path.exists():
        raise ProjectError(f"{hand_path} not found (params style.hand_labels): it holds the hand-labelled MRI "
                           "weighting of a sample of scans, columns file (relative to data/raw) and weighting")
    predict_t2, method = weighting_model(features, pd.read_csv(hand_path), params.style, params.seed)
    features["weighting"] = np.where(predict_t2(features), T2, T1)
    styles = features.merge(split_membership(params), left_on="full_path", right_on="path", how="left")
    styles = styles.drop(columns="path").rename(columns={"full_path": "path"})
    styles["split"] = styles.split.fillna("excluded")  # quarantined, or dropped as a twin of a test image
    styles["clean"] = styles.clean.fillna(False).astype(bool)
    params.paths.style.parent.mkdir(parents=True, exist_ok=True)
    styles.to_parquet(params.paths.style, index=False)
    summary = {"weighting_method": method, "scans": len(styles),
               "weighting_by_split": pd.crosstab(styles.split, styles.weighting).to_dict(orient="index")}
    params.paths.metrics.mkdir(parents=True, exist_ok=True)
    (params.paths.metrics / "style.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"style": str(params.paths.style), **summary}


def read_styles(params: Params) -> pd.DataFrame:
    """paths.style, or an error naming the stage that writes it."""
    if not params.paths.style.exists():
        raise ProjectError(f"{params.paths.style} not found: run `dvc repro style` (or `dvc pull`) first")
    return pd.read_parquet(params.paths.style)
