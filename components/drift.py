"""The drift statistics of a batch of scans, and their thresholds calibrated on batches drawn from data the models
did not train on, per batch size.

One definition of each statistic, used by the reference stage to calibrate (components.reference) and by the
monitor on every incoming batch (components.monitor):

- embedding: Evidently's model-based embedding drift (ModelDriftMethod, the EmbeddingsDrift metric's method): the
  ROC AUC of a classifier telling the batch's embeddings from the training ones (0.5: alike), on embeddings
  standardised by the training embeddings' mean and spread;
- style: the largest normed Wasserstein distance (Evidently's `wasserstein` column test: the distance divided by the
  reference's standard deviation) over the acquisition-style features of components.style, each feature first
  mapped to its percentile among the training images (`percentile_ranks`): several features are ratios with a
  long tail (inner_to_rim: median 1.0, maximum 87), so on raw values one extreme scan in a batch of 20 moved the
  distance by more than a whole shift of the bulk did;
- class mix: the total-variation distance between the stack's predicted class shares and its shares on val;
- OOD share: the share of scans farther from the training embeddings than the profile's OOD threshold.

Every statistic shrinks as a batch grows, so one fixed threshold either misses drift in large batches or raises
false alarms in small ones. The reference stage therefore calibrates per size in monitor.calibration_sizes: it
draws twice monitor.calibration_draws in-distribution batches of each size and sets the four thresholds at one
common upper quantile of their statistics, the smallest that keeps the whole verdict (any check over its threshold)
on at most monitor.false_alarm_rate of those batches. The rate the thresholds reach is measured by cross-fitting:
thresholds set on one half of the batches, judged on the other, both ways.

The in-distribution batches come from the held-out splits in monitor.calibration_splits (never trained on), pooled;
the class mix, which needs the stack's predictions, from val alone. A pool is a finite sample with its own offset
from the training data, and a batch drawn from it shares that offset: calibrated on batches drawn without replacement
from one split of 482 scans, the thresholds raised 14-48% false alarms on another held-out split
(docs/monitoring.md). The pool's sampling unit is the group, not the scan: the split keeps near-duplicate groups and
a source's stated groups whole (up to 36 slices of one case), so the splits differ in composition by whole groups.
Each calibration batch is therefore a two-stage bootstrap: as many of the pool's groups as one held-out split holds,
drawn with replacement (a set of scans as a split could have come out: its offset varies as a split's does), then
the batch's scans drawn with replacement from those groups' rows. Its statistics vary as those of a batch drawn from
a fresh split of that size do, for a mean.

A batch of another size uses thresholds interpolated linearly in 1/sqrt(size) between the nearest calibrated sizes
(beyond the largest, the largest's: a higher threshold than its own, so no more false alarms).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CHECKS = ("embedding drift", "style drift", "class-mix shift", "OOD share")


def embedding_score(reference: np.ndarray, batch: np.ndarray) -> float:
    """Evidently's model-based embedding drift score of `batch` against `reference` (both already standardised)."""
    from evidently.metrics.embeddings import ModelDriftMethod

    columns = [f"e{i}" for i in range(reference.shape[1])]
    score, _, _ = ModelDriftMethod()(pd.DataFrame(batch, columns=columns), pd.DataFrame(reference, columns=columns))
    return float(score)


def percentile_ranks(reference: pd.Series, values: pd.Series) -> np.ndarray:
    """Each value's mid-rank percentile among the reference's values (ties share the middle of their run, so equal
    values on both sides map alike); NaN stays NaN."""
    ordered = np.sort(reference.dropna().to_numpy())
    values = values.to_numpy(dtype=float)
    ranks = (np.searchsorted(ordered, values, "left") + np.searchsorted(ordered, values, "right")) / (2 * len(ordered))
    return np.where(np.isnan(values), np.nan, ranks)


def ranked_style(reference: pd.DataFrame, frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """`frame`'s style columns as percentiles of `reference`'s (columns the reference has no value in stay raw)."""
    out = frame[columns].copy()
    for column in columns:
        if reference[column].notna().any():
            out[column] = percentile_ranks(reference[column], frame[column])
    return out


def style_distances(reference: pd.DataFrame, batch: pd.DataFrame, columns: list[str]) -> dict[str, float]:
    """Per style column with values on both sides: the normed Wasserstein distance, as Evidently's `wasserstein`
    column test computes it (scipy's distance divided by the reference's standard deviation, at least 0.001), on the
    columns' percentile ranks among the reference's values (the module docstring)."""
    return ranked_distances(ranked_style(reference, reference, columns), ranked_style(reference, batch, columns),
                            columns)


def ranked_distances(reference_ranks: pd.DataFrame, batch_ranks: pd.DataFrame, columns: list[str]
                     ) -> dict[str, float]:
    """style_distances on columns already ranked by `ranked_style` (calibration ranks its pool once)."""
    from scipy.stats import wasserstein_distance

    out = {}
    for column in columns:
        ref, cur = reference_ranks[column].dropna().to_numpy(), batch_ranks[column].dropna().to_numpy()
        if len(ref) and len(cur):
            out[column] = float(wasserstein_distance(ref, cur) / max(float(np.std(ref)), 0.001))
    return out


def class_mix_distance(reference_share: dict[str, float], predicted: np.ndarray) -> float:
    """Total-variation distance between the batch's predicted class shares and the reference's."""
    classes = list(reference_share)
    counts = np.array([(np.asarray(predicted) == c).sum() for c in classes], dtype=float)
    share = counts / counts.sum() if counts.sum() else counts
    return float(0.5 * np.abs(share - np.array([reference_share[c] for c in classes])).sum())


def style_statistic(distances: dict[str, float]) -> float:
    """The style check's statistic: the largest per-column distance (a style with no comparable column measures 0)."""
    return max(distances.values(), default=0.0)


def statistics(embedding: float, style: dict[str, float], mix: float, ood_share: float) -> dict[str, float]:
    """The four statistics of a batch, by check name, from the per-column style distances."""
    return dict(zip(CHECKS, (embedding, style_statistic(style), mix, ood_share)))


def common_quantile_thresholds(draws: dict[str, np.ndarray], rate: float) -> dict[str, float]:
    """Thresholds at one upper quantile q of every check's null statistics: the smallest q at which at most
    `rate` of the draws have any statistic above its threshold (bisection on q)."""
    def thresholds(q: float) -> dict[str, float]:
        return {check: float(np.quantile(values, q)) for check, values in draws.items()}

    low, high = 1.0 - rate, 1.0
    if false_alarm_rate(draws, thresholds(low)) <= rate:
        return thresholds(low)
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if false_alarm_rate(draws, thresholds(middle)) <= rate else (middle, high)
    return thresholds(high)


def false_alarm_rate(draws: dict[str, np.ndarray], limits: dict[str, float]) -> float:
    """Share of the draws on which any check is over its threshold."""
    return float(np.mean(np.any([draws[c] > limits[c] for c in draws], axis=0)))


class BatchPool:
    """In-distribution scans (each row: its embedding, style features, predicted class and distance to the training
    data) to draw batches from, scored against the training profile. `predicted` may be None for a pool that only
    serves the checks without the class mix; `groups` (one id per row, e.g. the splits' `group` column) are the
    pool's sampling units for calibration, each row its own group when None, and `set_groups` how many of them make
    one calibration set (None: all; a pool of k splits: a k-th of them)."""

    def __init__(self, reference_embeddings: np.ndarray, reference_style: pd.DataFrame, style_columns: list[str],
                 reference_mix: dict[str, float], ood_threshold: float, embeddings: np.ndarray,
                 style: pd.DataFrame, predicted: np.ndarray | None, distances: np.ndarray,
                 groups: np.ndarray | None = None, set_groups: int | None = None):
        self.mean = reference_embeddings.mean(axis=0)
        self.spread = reference_embeddings.std(axis=0) + 1e-8
        self.reference = (reference_embeddings - self.mean) / self.spread
        self.columns = style_columns
        # Every row's style percentiles among the training images, ranked once for all draws.
        self.reference_ranks = ranked_style(reference_style, reference_style, style_columns)
        self.style_ranks = ranked_style(reference_style, style.reset_index(drop=True), style_columns)
        self.mix, self.ood_threshold = reference_mix, ood_threshold
        self.embeddings = (embeddings - self.mean) / self.spread
        self.predicted = None if predicted is None else np.asarray(predicted)
        self.distances = np.asarray(distances)
        codes = np.arange(len(self.distances)) if groups is None else pd.factorize(np.asarray(groups))[0]
        self.group_rows = np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes))[:-1])
        self.set_groups = set_groups or len(self.group_rows)

    def __len__(self) -> int:
        return len(self.distances)

    def batch(self, rows: np.ndarray, checks: tuple[str, ...] = CHECKS) -> dict[str, float]:
        """The statistics in `checks` of the batch of these rows (only those: the embedding score fits a model)."""
        compute = {
            "embedding drift": lambda: embedding_score(self.reference, self.embeddings[rows]),
            "style drift": lambda: style_statistic(ranked_distances(self.reference_ranks, self.style_ranks.iloc[rows],
                                                                    self.columns)),
            "class-mix shift": lambda: class_mix_distance(self.mix, self.predicted[rows]),
            "OOD share": lambda: float(np.mean(self.distances[rows] > self.ood_threshold)),
        }
        return {check: compute[check]() for check in checks}

    def draws(self, size: int, count: int, rng: np.random.Generator,
              checks: tuple[str, ...] = CHECKS) -> dict[str, np.ndarray]:
        """{check: its statistic on `count` batches of `size` rows}, as batches arrive: each drawn without
        replacement, or with it (a bootstrap) when the pool holds fewer than `size` rows."""
        rows = [self.batch(rng.choice(len(self), size, replace=size > len(self)), checks) for _ in range(count)]
        return {check: np.array([row[check] for row in rows]) for check in checks}

    def null_draws(self, size: int, count: int, rng: np.random.Generator,
                   checks: tuple[str, ...] = CHECKS) -> dict[str, np.ndarray]:
        """Like `draws`, for calibration: each batch a two-stage bootstrap (the module docstring), `set_groups` of the
        pool's groups drawn with replacement, then `size` rows drawn with replacement from theirs."""
        def batch_rows() -> np.ndarray:
            picked = rng.integers(len(self.group_rows), size=self.set_groups)
            return rng.choice(np.concatenate([self.group_rows[g] for g in picked]), size, replace=True)

        rows = [self.batch(batch_rows(), checks) for _ in range(count)]
        return {check: np.array([row[check] for row in rows]) for check in checks}


def calibrate(pools: dict[str, BatchPool], sizes: list[int], draws: int, rate: float, seed: int) -> dict:
    """Thresholds per calibrated size (see the module docstring), set on 2 x `draws` batches, and the false-alarm
    rate they reach, measured by cross-fitting (each half's thresholds on the other half). `pools` names, for each
    check of CHECKS, the pool its in-distribution batches come from; the
    i-th draws of all checks make the i-th batch's verdict."""
    missing = set(CHECKS) - set(pools)
    if missing:
        raise ValueError(f"no calibration pool for {sorted(missing)}")
    rng = np.random.default_rng(seed)
    served: dict[int, tuple[BatchPool, tuple[str, ...]]] = {}
    for check in CHECKS:
        pool, checks = served.get(id(pools[check]), (pools[check], ()))
        served[id(pools[check])] = (pool, checks + (check,))

    def null(size: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for pool, checks in served.values():
            out.update(pool.null_draws(size, draws, rng, checks))
        return out

    out = {"false_alarm_rate": rate, "draws": draws, "checks": list(CHECKS),
           "pool": {check: len(pools[check]) for check in CHECKS},
           "pool_groups": {check: len(pools[check].group_rows) for check in CHECKS},
           "set_groups": {check: pools[check].set_groups for check in CHECKS}, "sizes": {}}
    for size in sorted(sizes):
        halves = null(size), null(size)
        both = {check: np.concatenate([halves[0][check], halves[1][check]]) for check in CHECKS}
        # Each half's thresholds judged on the other half: an honest (if slightly pessimistic) rate for the
        # thresholds set on both, whose upper quantile is twice as precise as one half's.
        crossed = [false_alarm_rate(halves[1 - i], common_quantile_thresholds(halves[i], rate)) for i in (0, 1)]
        out["sizes"][str(size)] = {"thresholds": common_quantile_thresholds(both, rate),
                                   "measured_false_alarm_rate": float(np.mean(crossed))}
    return out


def thresholds_at(calibration: dict, size: int) -> dict[str, float]:
    """The thresholds for a batch of `size` scans: a calibrated size's own, or interpolated linearly in 1/sqrt(size)
    between the two nearest calibrated sizes; below the smallest the smallest's, beyond the largest the largest's."""
    calibrated = sorted((int(s), entry["thresholds"]) for s, entry in calibration["sizes"].items())
    if not calibrated:
        raise ValueError("the calibration holds no batch size (val smaller than every monitor.calibration_sizes)")
    if size <= calibrated[0][0]:
        return dict(calibrated[0][1])
    if size >= calibrated[-1][0]:
        return dict(calibrated[-1][1])
    for (small, low), (large, high) in zip(calibrated, calibrated[1:]):
        if small <= size <= large:
            weight = (small ** -0.5 - size ** -0.5) / (small ** -0.5 - large ** -0.5)
            return {check: (1 - weight) * low[check] + weight * high[check] for check in low}
    raise AssertionError("unreachable")
