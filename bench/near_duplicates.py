"""Print the near-duplicate threshold table of docs/near-duplicates.md from data/manifest.parquet."""

import numpy as np
import pandas as pd

from components.config import load_params
from components.split import hamming, hash_bits


def main() -> None:
    params = load_params()
    manifest = pd.read_parquet(params.paths.manifest)
    test, train = manifest[manifest.official_split == "test"], manifest[manifest.official_split == "train"]
    distances = hamming(hash_bits(test.dhash), hash_bits(train.dhash))
    cross_class = test.label.to_numpy()[:, None] != train.label.to_numpy()[None, :]
    print("| t | test images with a twin | training images removed | test images matched across classes |")
    for t in (0, 4, 8, 10, 12, 16, 20, 24, 30, 40):
        within = distances <= t
        print(f"| {t} | {within.any(1).sum()} | {within.any(0).sum()} | {(within & cross_class).any(1).sum()} |")
    print("nearest-distance percentiles 5/25/50/75/95:", np.percentile(distances.min(1), [5, 25, 50, 75, 95]))


if __name__ == "__main__":
    main()
