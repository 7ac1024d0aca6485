import pandas as pd

from components.manifest import build_manifest
from components.split import hamming, hash_bits, make_splits
from tests.conftest import KNOWN_TWIN


def test_real_sample_split_has_no_test_copy_in_train_or_val(real_sample, params):
    manifest = build_manifest(real_sample, params.manifest)
    splits, report, removed = make_splits(manifest, pd.DataFrame(columns=["path"]), real_sample, params.split,
                                          params.seed)
    train_val = pd.concat([splits["train"], splits["val"]])

    assert not train_val.content_hash.isin(set(splits["test"].content_hash)).any()
    assert report["removed_from_training"]["exact_copy_of_test"] >= 1
    assert str(real_sample / KNOWN_TWIN[1]) in set(removed.path)
    # The official Testing set is kept whole.
    assert len(splits["test"]) == (manifest.official_split == "test").sum()
    # No near duplicate of a test image survives either.
    distances = hamming(hash_bits(train_val.dhash), hash_bits(splits["test"].dhash))
    assert distances.min() > params.split.near_duplicate_distance
    # Duplicate groups never straddle train and val, and val holds every class.
    assert not set(splits["train"].group) & set(splits["val"].group)
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
