import json

import numpy as np
import pandas as pd
import pytest

from components.manifest import build_manifest
from components.split import hamming, hash_bits, make_splits
from tests.conftest import KNOWN_TWIN

HOLDOUT_NAMES = ("train", "val", "stack", "gate")


def synthetic_manifest(seed: int = 1, groups_per_class: dict[str, int] | None = None) -> pd.DataFrame:
    """A manifest without images: official Training rows in duplicate groups of 1-4 rows (copies of one random
    256-bit dhash with at most 3 bits flipped: within any twin distance, far from every other group), unequal
    class sizes, and a few official Testing rows with hashes of their own. `origin` names each row's group."""
    rng = np.random.default_rng(seed)
    groups_per_class = groups_per_class or {"glioma": 60, "meningioma": 45, "notumor": 75, "pituitary": 50}
    rows = []
    for label, count in groups_per_class.items():
        for g in range(count):
            base = rng.integers(0, 2, 256, dtype=np.uint8)
            for member in range(int(rng.choice([1, 1, 1, 2, 3, 4]))):
                bits = base.copy()
                bits[rng.choice(256, member % 4, replace=False)] ^= 1
                rows.append({"path": f"Training/{label}/{label}-{g}-{member}.jpg", "label": label,
                             "official_split": "train", "origin": f"{label}-{g}",
                             "dhash": np.packbits(bits).tobytes().hex()})
        for t in range(5):
            rows.append({"path": f"Testing/{label}/{label}-{t}.jpg", "label": label, "official_split": "test",
                         "origin": f"test-{label}-{t}",
                         "dhash": np.packbits(rng.integers(0, 2, 256, dtype=np.uint8)).tobytes().hex()})
    frame = pd.DataFrame(rows)
    return frame.assign(readable=True, content_hash=[f"sha-{i}" for i in range(len(frame))])


NO_QUARANTINE = pd.DataFrame(columns=["path"])


@pytest.mark.parametrize("val_fraction", [0.15, 0.3])
def test_val_stack_and_gate_shares_match_the_asked_fractions(params, tmp_path, val_fraction):
    manifest = synthetic_manifest()
    split = params.split.model_copy(update={"val_fraction": val_fraction, "stack_fraction": 0.12,
                                            "gate_fraction": 0.1})
    splits, report, removed = make_splits(manifest, NO_QUARANTINE, tmp_path, split, params.seed)
    pool = sum(len(splits[name]) for name in HOLDOUT_NAMES)
    assert removed.empty and pool == (manifest.official_split == "train").sum()
    for name, fraction in (("val", split.val_fraction), ("stack", split.stack_fraction),
                           ("gate", split.gate_fraction)):
        assert abs(len(splits[name]) / pool - fraction) <= 0.01, (name, len(splits[name]) / pool)
        assert report["shares_of_training_pool"][name] == pytest.approx(len(splits[name]) / pool, abs=1e-4)
        # Stratified: every class holds out about the same share.
        pool_counts = pd.concat([splits[n] for n in HOLDOUT_NAMES]).label.value_counts()
        shares = splits[name].label.value_counts().reindex(pool_counts.index, fill_value=0) / pool_counts
        assert (abs(shares - fraction) <= 0.03).all(), shares.to_dict()


def test_duplicate_groups_never_straddle_train_val_gate_and_the_seed_decides(params, tmp_path):
    manifest = synthetic_manifest()
    origin = manifest.set_index(manifest.path.map(lambda p: (tmp_path / p).as_posix())).origin
    split = params.split.model_copy(update={"val_fraction": 0.2, "gate_fraction": 0.1})
    splits, _, _ = make_splits(manifest, NO_QUARANTINE, tmp_path, split, params.seed)
    where = pd.concat([frame.assign(split=name) for name, frame in splits.items()])
    assert where.path.is_unique, "a file is in two splits"
    # Every constructed duplicate group lands whole in one split, and the stage found the same groups.
    assert (where.groupby(where.path.map(origin)).split.nunique() == 1).all()
    kept = where[where.split != "test"]
    assert kept.groupby("group").path.count().sort_values().tolist() == \
        kept.groupby(kept.path.map(origin)).path.count().sort_values().tolist()
    assert splits["gate"].label.nunique() == 4 and splits["val"].label.nunique() == 4

    again, _, _ = make_splits(manifest, NO_QUARANTINE, tmp_path, split, params.seed)
    other, _, _ = make_splits(manifest, NO_QUARANTINE, tmp_path, split, params.seed + 1)
    for name in HOLDOUT_NAMES:
        assert again[name].path.tolist() == splits[name].path.tolist()
    assert set(other["gate"].path) != set(splits["gate"].path)


def test_holdouts_that_leave_nothing_to_train_on_are_refused(params):
    from components.config import SplitParams

    with pytest.raises(ValueError, match="stack_fraction"):
        SplitParams(**{**params.split.model_dump(), "val_fraction": 0.5, "stack_fraction": 0.2, "gate_fraction": 0.3})


def test_split_stage_writes_a_gate_csv_disjoint_from_the_others(workspace):
    from components.config import load_params
    from components.dataset import read_split

    params = load_params(workspace / "params.yaml")
    frames = {name: read_split(params.paths.splits, name) for name in ("train", "val", "stack", "gate", "test")}
    assert len(frames["gate"]) > 0 and set(frames["gate"].columns) == set(frames["val"].columns)
    paths = [set(frame.path) for frame in frames.values()]
    assert sum(map(len, paths)) == len(set().union(*paths)), "splits overlap"
    assert not set(frames["gate"].group) & (set(frames["train"].group) | set(frames["val"].group))
    assert not set(frames["stack"].group) & (set(frames["train"].group) | set(frames["val"].group))
    report = json.loads(params.paths.split_report.read_text())
    assert sum(report["counts"]["gate"].values()) == len(frames["gate"])


def test_real_sample_split_has_no_test_copy_in_train_or_val(real_sample, params):
    manifest = build_manifest(real_sample, params.manifest)
    splits, report, removed = make_splits(manifest, pd.DataFrame(columns=["path"]), real_sample, params.split,
                                          params.seed)
    train_val = pd.concat([splits[name] for name in HOLDOUT_NAMES])

    assert not train_val.content_hash.isin(set(splits["test"].content_hash)).any()
    assert report["removed_from_training"]["exact_copy_of_test"] >= 1
    assert str(real_sample / KNOWN_TWIN[1]) in set(removed.path)
    # The official Testing set is kept whole.
    assert len(splits["test"]) == (manifest.official_split == "test").sum()
    # No near duplicate of a test image survives either.
    distances = hamming(hash_bits(train_val.dhash), hash_bits(splits["test"].dhash))
    assert distances.min() > params.split.near_duplicate_distance
    # Duplicate groups never straddle train, val and gate, and val holds every class.
    assert not set(splits["train"].group) & set(splits["val"].group)
    assert not set(splits["gate"].group) & (set(splits["train"].group) | set(splits["val"].group))
    assert len(splits["gate"]) > 0
    assert set(splits["val"].label) == set(params.data.classes)
    # The known twin's test image is not clean; every clean row is far from all of official Training.
    test = splits["test"].set_index("path")
    assert not test.loc[str(real_sample / KNOWN_TWIN[0]), "clean"]
    assert 0 < test.clean.sum() < len(test)


def test_quarantined_files_are_excluded(real_sample, params):
    manifest = build_manifest(real_sample, params.manifest)
    victim = manifest.path[manifest.official_split == "train"].iloc[0]
    splits, _, _ = make_splits(manifest, pd.DataFrame({"path": [victim]}), real_sample, params.split, params.seed)
    assert str(real_sample / victim) not in set(pd.concat(splits.values()).path)
