"""Leakage-free splits: official Testing stays `test`; train, val and gate come from what is left of Training once
every exact or near duplicate of a test image is dropped; duplicate groups never straddle train, val and gate, and
neither do the groups a source states (the manifest's `source_group`: adjacent slices of one case of an appended
collection).

`stack` is held out for the meta-learner alone (components.stack): the base models' early stopping and schedules
chose on `val`, so their val predictions are optimistic; the stacker is fitted on rows no base-model choice saw.
`gate` is held out for the promotion gate alone (components.promote): no training, early stopping, stacking or
report reads it, so the gate compares registered versions on images none of them was selected on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from components.config import Paths, SplitParams
from components.validate import check_split_leakage

SPLIT_COLUMNS = ["path", "label", "content_hash", "dhash", "group", "source", "weighting"]
HOLDOUTS = ("val", "stack", "gate")  # carved from the de-duplicated training pool, in this order; the rest is train


def hash_bits(hashes: pd.Series) -> np.ndarray:
    """Hex perceptual hashes -> (n, bits) float32 matrix of 0/1, so Hamming distances are two matmuls."""
    return np.array([np.unpackbits(np.frombuffer(bytes.fromhex(h), dtype=np.uint8)) for h in hashes],
                    dtype=np.float32).reshape(len(hashes), -1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between the rows of two bit matrices."""
    return (a @ (1 - b).T + (1 - a) @ b.T).astype(np.int32)


def duplicate_groups(bits: np.ndarray, distance: int, source_groups: pd.Series | None = None) -> np.ndarray:
    """Group id per row: connected components of the graph joining rows within `distance` of each other (exact
    copies have distance 0) and rows of one stated source group (None: no group stated)."""
    adjacency = csr_matrix(hamming(bits, bits) <= distance)
    if source_groups is not None:
        codes, _ = pd.factorize(pd.Series(source_groups).reset_index(drop=True))  # -1 where no group is stated
        rows = np.flatnonzero(codes >= 0)
        if len(rows):
            first = pd.Series(rows).groupby(codes[rows]).transform("min").to_numpy()  # each row -> its group's first
            adjacency = adjacency + csr_matrix((np.ones(len(rows), dtype=bool), (rows, first)), shape=adjacency.shape)
    _, labels = connected_components(adjacency, directed=False)
    return labels


def quotas(sizes: pd.Series, fraction: float) -> pd.Series:
    """Rows each class should hold out: `fraction` of each class, rounded so the total is round(fraction * N)
    (largest remainders first, ties in class order)."""
    exact = sizes * fraction
    out = np.floor(exact).astype(int)
    spare = int(round(fraction * sizes.sum())) - int(out.sum())
    remainders = (exact - out).to_numpy()
    for i in np.argsort(-remainders, kind="stable")[:max(spare, 0)]:
        out.iloc[i] += 1
    return out


def carve(labels: pd.Series, groups: pd.Series, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Split name per row: whole duplicate groups, class by class, go to each holdout (in `fractions` order) until
    the class's quota is reached; the rest is `train`.

    A group counts for its majority label. The groups of each class are visited in one seeded random order; a
    group is taken when it brings the holdout closer to its quota, so singletons fill the last gap exactly."""
    frame = pd.DataFrame({"label": labels.to_numpy(), "group": groups.to_numpy()})
    majority = frame.groupby("group").label.agg(lambda s: s.value_counts().sort_index(kind="stable").idxmax())
    group_size = frame.group.value_counts()
    stratum = frame.group.map(majority)
    sizes = stratum.value_counts().sort_index()
    targets = {name: quotas(sizes, fraction) for name, fraction in fractions.items()}
    rng = np.random.default_rng(seed)
    chosen: dict[int, str] = {}
    for label in sizes.index:
        members = np.sort(majority.index[majority == label].to_numpy())
        order = list(members[rng.permutation(len(members))])
        for name in fractions:
            target, taken, left = int(targets[name][label]), 0, []
            for group in order:
                size = int(group_size[group])
                if taken + size / 2 < target:  # |taken + size - target| < |taken - target|
                    chosen[group], taken = name, taken + size
                else:
                    left.append(group)
            order = left
    return frame.group.map(chosen).fillna("train").to_numpy()


def make_splits(manifest: pd.DataFrame, quarantine: pd.DataFrame, raw_dir: Path, params: SplitParams,
                seed: int) -> tuple[dict[str, pd.DataFrame], dict, pd.DataFrame]:
    manifest = manifest.reindex(columns=[*manifest.columns.drop(["source", "weighting", "source_group"],
                                                                 errors="ignore"),
                                         "source", "weighting", "source_group"])  # manifests from before provenance
    usable = manifest[manifest.readable & ~manifest.path.isin(set(quarantine.path))].reset_index(drop=True)
    usable = usable.assign(path=[(Path(raw_dir) / p).as_posix() for p in usable.path])
    test = usable[usable.official_split == "test"].reset_index(drop=True)
    pool = usable[usable.official_split == "train"].reset_index(drop=True)

    pool_bits, test_bits = hash_bits(pool.dhash), hash_bits(test.dhash)
    to_test = hamming(pool_bits, test_bits)  # (pool, test)
    nearest = to_test.argmin(axis=1)
    exact = pool.content_hash.isin(set(test.content_hash)).to_numpy()
    near = (to_test.min(axis=1) <= params.near_duplicate_distance) & ~exact
    removed = pool[exact | near].assign(
        reason=np.where(exact[exact | near], "exact copy of a test image", "near duplicate of a test image"),
        distance=to_test.min(axis=1)[exact | near],
        test_twin=test.path.to_numpy()[nearest[exact | near]],
    )

    kept = pool[~(exact | near)].reset_index(drop=True)
    kept["group"] = duplicate_groups(pool_bits[~(exact | near)], params.near_duplicate_distance, kept.source_group)
    assigned = carve(kept.label, kept.group, {"val": params.val_fraction, "stack": params.stack_fraction,
                                              "gate": params.gate_fraction}, seed)

    # Judged against the whole official Training pool: a test image whose twin we removed is not clean either.
    test["group"] = -1
    test["clean"] = to_test.min(axis=0) > params.clean_distance
    splits = {name: kept[assigned == name][SPLIT_COLUMNS].reset_index(drop=True) for name in ("train", *HOLDOUTS)}
    splits["test"] = test[SPLIT_COLUMNS + ["clean"]]

    cross = test.content_hash[test.content_hash.isin(set(pool.content_hash))]
    report = {
        "counts": {name: frame.label.value_counts().sort_index().to_dict() for name, frame in splits.items()},
        "counts_by_source": {name: frame.source.fillna("unknown").value_counts().sort_index().to_dict()
                             for name, frame in splits.items()},
        "shares_of_training_pool": {name: round(len(splits[name]) / max(len(kept), 1), 4)
                                    for name in ("train", *HOLDOUTS)},
        "clean_test": int(test.clean.sum()),
        "removed_from_training": {
            "total": len(removed),
            "exact_copy_of_test": int(exact.sum()),
            "near_duplicate_of_test": int(near.sum()),
            "exact_groups_across_official_split": int(cross.nunique()),
            "test_images_with_exact_copy_in_training": len(cross),
        },
        "near_duplicate_distance": params.near_duplicate_distance,
        "clean_distance": params.clean_distance,
    }
    return splits, report, removed[["path", "label", "reason", "distance", "test_twin"]]


def write_splits(paths: Paths, params: SplitParams, seed: int) -> dict:
    manifest = pd.read_parquet(paths.manifest)
    quarantine = pd.read_csv(paths.quarantine)
    splits, report, removed = make_splits(manifest, quarantine, paths.raw, params, seed)
    check_split_leakage(pd.concat([splits[name] for name in ("train", *HOLDOUTS)]), splits["test"],
                        paths.split_validation)
    paths.splits.mkdir(parents=True, exist_ok=True)
    for name, frame in splits.items():
        frame.to_csv(paths.splits / f"{name}.csv", index=False)
    paths.split_report.parent.mkdir(parents=True, exist_ok=True)
    paths.split_report.write_text(json.dumps(report, indent=2) + "\n")
    removed.to_csv(paths.split_removed, index=False)
    return report
