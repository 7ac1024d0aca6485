"""The reference profile (components.reference, the `reference` stage the session's trained workspace ran) and the
drift monitor (components.monitor) on the tiny trained workspace, at the committed thresholds: each is calibrated by
the reference stage on batches drawn from the workspace's own val split, as on real data. Batches drawn from val
pass at two sizes, a contrast-inverted (T2-like) one drifts and its out-of-distribution files are named."""

import json
import os

import mlflow
import numpy as np
import pandas as pd
import pytest

from components import tracking
from components.drift import (CHECKS, BatchPool, calibrate, common_quantile_thresholds, false_alarm_rate,
                              percentile_ranks, style_distances, thresholds_at)
from components.monitor import class_mix_shift, load_model, monitor_paths
from components.reference import embedding_extractor, load_reference
from components.style import STYLE_FEATURES
from tests.batches import write_batch, write_val_batch
from tests.conftest import TRAINED_EXTRA, tiny_params

NO_QUARANTINE = pd.DataFrame(columns=["path", "label", "reason"])


@pytest.fixture(scope="module")
def monitored(trained_workspace):
    """The workspace's ensemble loaded once, and the monitor's summaries of batches under data/incoming: `val-20` and
    `like` (20 and 24 scans drawn from val), `shifted` (24 val scans, 20 of them contrast-inverted), `new` (24 new
    scans generated like the training data) and `few` (3)."""
    previous = os.getcwd()
    os.chdir(trained_workspace)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        params = tiny_params(trained_workspace, TRAINED_EXTRA)
        loaded = load_model(params, None)
        val = pd.read_csv(params.paths.splits / "val.csv").path.tolist()
        out = {"params": params, "workspace": trained_workspace}
        for name, count, inverted, seed in (("val-20", 20, 0, 11), ("like", 24, 0, 101), ("shifted", 24, 20, 202),
                                            ("new", 24, 0, 505), ("few", 3, 0, 303)):
            folder = trained_workspace / "data" / "incoming" / f"monitor-{name}"
            normal, flipped = (write_batch(folder, count, seed, inverted) if name == "new"
                               else write_val_batch(folder, val, count, seed, inverted))
            paths = sorted(str(folder / f) for f in normal + flipped)
            summary = monitor_paths(params, folder, paths, NO_QUARANTINE,
                                    trained_workspace / "reports" / "monitoring" / name, loaded=loaded)
            out[name] = {"summary": summary, "normal": normal, "inverted": flipped}
        return out
    finally:
        os.chdir(previous)


def test_the_reference_embeds_every_training_image_as_training_decodes_it(in_trained):
    from components.dataset import make_dataset

    import keras

    params = tiny_params(in_trained, TRAINED_EXTRA)
    reference = load_reference(params.paths.reference)
    train = pd.read_csv(params.paths.splits / "train.csv")
    stored = pd.read_parquet(params.paths.reference / "embeddings.parquet")
    assert stored.path.tolist() == train.path.tolist() and len(reference.embeddings) == len(train)
    name = reference.meta["embedding_model"]
    model = keras.models.load_model(params.paths.models / name / "model.keras")
    assert reference.embeddings.shape[1] == model.get_layer("pool").output.shape[-1]
    # The training input pipeline's own decoding of the first rows, through the model's pooled layer.
    rows = train.head(8)
    images, _ = next(iter(make_dataset(rows, params.data, params.model(name), params.train, training=False,
                                       seed=params.seed, batch_size=len(rows))))
    expected = np.asarray(embedding_extractor(model).predict_on_batch(images))
    np.testing.assert_allclose(reference.embeddings[:len(rows)], expected, rtol=1e-4, atol=1e-6)
    assert set(STYLE_FEATURES) <= set(reference.style.columns) and set(reference.style.path) == set(train.path)


def test_the_reference_records_the_val_class_mix_and_an_ood_threshold_from_val_distances(in_trained):
    params = tiny_params(in_trained, TRAINED_EXTRA)
    reference = load_reference(params.paths.reference)
    val = pd.read_parquet(params.paths.predictions / "stack" / "val.parquet")
    winners = val[[f"prob_{c}" for c in params.data.classes]].idxmax(axis=1).str.removeprefix("prob_")
    shares = winners.value_counts(normalize=True).reindex(params.data.classes, fill_value=0.0)
    assert reference.meta["class_mix"] == pytest.approx(shares.to_dict())
    distances = pd.read_parquet(params.paths.reference / "val_distances.parquet")
    assert sorted(distances.path) == sorted(pd.read_csv(params.paths.splits / "val.csv").path)
    above = (distances.distance > reference.threshold).mean()
    assert above <= 1 - reference.meta["ood_percentile"] / 100 + 1 / len(distances)
    assert distances.distance.median() <= reference.threshold <= distances.distance.max()


@pytest.mark.parametrize("batch", ["val-20", "like", "new"])
def test_batches_drawn_like_the_training_data_do_not_trigger_at_the_committed_thresholds(monitored, batch):
    summary = monitored[batch]["summary"]
    assert summary["verdict"], "20 scans are enough for a verdict"
    assert not summary["drift"] and summary["reasons"] == [], summary["checks"]
    assert len(summary["checks"]) == 4 and not any(check["drift"] for check in summary["checks"])
    size = summary["metrics"]["scans"]
    reference = load_reference(monitored["workspace"] / monitored["params"].paths.reference)
    expected = thresholds_at(reference.meta["calibration"], size)
    assert {c["check"]: c["threshold"] for c in summary["checks"]} == pytest.approx(expected)
    assert all(f"calibrated for {size} scans" in c["rule"] for c in summary["checks"])
    scans = pd.read_csv(summary["out_dir"] + "/scans.csv")
    assert sorted(scans.file) == sorted(monitored[batch]["normal"])


def test_an_inverted_batch_triggers_and_names_its_out_of_distribution_files(monitored):
    summary, like = monitored["shifted"]["summary"], monitored["like"]["summary"]
    assert summary["drift"] and {"OOD share", "style drift"} <= set(summary["reasons"]), summary["checks"]
    ood = {row["file"] for row in summary["ood_files"]}
    assert set(monitored["shifted"]["inverted"]) <= ood, "every inverted scan is named"
    assert len(ood & set(monitored["shifted"]["normal"])) < len(monitored["shifted"]["normal"]), \
        "scans drawn like the training data are not all called OOD"
    # An inversion moves the intensity statistics of the head, which components.style measures.
    assert {"inner_median", "inner_to_rim", "rim_p95", "inner_skew"} & set(summary["style_drifted"])
    assert summary["metrics"]["style_max_distance"] > like["metrics"]["style_max_distance"]
    assert summary["metrics"]["embedding_drift_score"] > like["metrics"]["embedding_drift_score"]
    assert summary["metrics"]["ood_share"] > like["metrics"]["ood_share"]


def test_the_report_and_the_mlflow_run_hold_the_verdict_and_name_the_champion(monitored, in_trained):
    summary = monitored["shifted"]["summary"]
    out = summary["out_dir"]
    page = open(f"{out}/index.html").read()
    assert "Drift:" in page and all(f"<code>{f}</code>" in page for f in monitored["shifted"]["inverted"])
    assert "Drift in embeddings" in open(f"{out}/drift.html").read(), "Evidently's own report"
    assert json.loads(open(f"{out}/summary.json").read())["reasons"] == summary["reasons"]
    tracking.configure(monitored["params"].tracking)
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["ood_share"] == pytest.approx(summary["metrics"]["ood_share"])
    assert run.data.metrics["embedding_drift_score"] == pytest.approx(summary["metrics"]["embedding_drift_score"])
    assert run.data.tags["drift"] == "true" and run.data.tags["drift_reasons"] == ", ".join(summary["reasons"])
    champion = run.data.tags["champion_version"]
    client = mlflow.MlflowClient()
    try:
        expected = str(client.get_model_version_by_alias(run.data.tags["registered_model"], "champion").version)
    except mlflow.exceptions.MlflowException:
        expected = "none"
    assert champion == expected
    listed = {item.path for item in client.list_artifacts(run.info.run_id, "monitoring")}
    assert {"monitoring/index.html", "monitoring/drift.html", "monitoring/scans.csv"} <= listed


def test_a_batch_below_min_scans_lists_its_scans_but_gives_no_verdict(monitored):
    summary = monitored["few"]["summary"]
    assert not summary["verdict"] and not summary["drift"] and summary["checks"] == []
    assert "monitor.min_scans" in summary["why_no_verdict"] and summary["metrics"]["scans"] == 3


def test_class_mix_shift_is_a_total_variation_distance_tested_against_sampling_noise():
    reference = {"glioma": 40, "meningioma": 30, "notumor": 20, "pituitary": 10}
    same = class_mix_shift(reference, {"glioma": 4, "meningioma": 3, "notumor": 2, "pituitary": 1})
    assert same["distance"] == pytest.approx(0.0) and same["p_value"] > 0.5
    healthy = class_mix_shift(reference, {"glioma": 5, "meningioma": 5, "notumor": 80, "pituitary": 10})
    assert healthy["distance"] == pytest.approx(0.6) and healthy["p_value"] < 1e-6
    # A shift as large in 5 scans is far weaker evidence: the distance alone would not tell them apart.
    small = class_mix_shift(reference, {"glioma": 0, "meningioma": 0, "notumor": 4, "pituitary": 1})
    assert small["distance"] > healthy["distance"] and small["p_value"] > 1e3 * healthy["p_value"]


def test_the_reference_calibrates_every_size_and_records_the_false_alarm_rate_it_reaches(in_trained):
    params = tiny_params(in_trained, TRAINED_EXTRA)
    calibration = load_reference(params.paths.reference).meta["calibration"]
    assert sorted(int(s) for s in calibration["sizes"]) == sorted(params.monitor.calibration_sizes)
    assert calibration["false_alarm_rate"] == params.monitor.false_alarm_rate
    held_out = {split: len(pd.read_csv(params.paths.splits / f"{split}.csv"))
                for split in params.monitor.calibration_splits}
    assert calibration["splits"] == params.monitor.calibration_splits
    assert calibration["pool"]["class-mix shift"] == held_out["val"], "the class mix: val, which the stack predicted"
    for check in ("embedding drift", "style drift", "OOD share"):
        assert calibration["pool"][check] == sum(held_out.values())
    for size, entry in calibration["sizes"].items():
        assert set(entry["thresholds"]) == {"embedding drift", "style drift", "class-mix shift", "OOD share"}
        assert 0 <= entry["measured_false_alarm_rate"] <= 1


def test_common_quantile_thresholds_hold_the_false_alarm_rate_on_their_draws():
    rng = np.random.default_rng(0)
    draws = {"a": rng.normal(size=1000), "b": rng.exponential(size=1000), "c": rng.normal(size=1000) ** 2}
    for rate in (0.01, 0.05, 0.2):
        limits = common_quantile_thresholds(draws, rate)
        assert false_alarm_rate(draws, limits) <= rate
        looser = {check: np.quantile(values, 1 - 2 * rate) for check, values in draws.items()}
        assert false_alarm_rate(draws, looser) > rate, "the bisection stops at the rate, not far inside it"


def test_one_extreme_scan_moves_the_style_distance_no_more_than_its_share_of_the_batch():
    """On percentile ranks, a long-tailed ratio's one outlier in 20 scans moves the distance by at most 1/20 of the
    rank range (in reference standard deviations); on raw values it moved it by more than a shift of the bulk."""
    rng = np.random.default_rng(6)
    reference = pd.DataFrame({"ratio": np.exp(rng.normal(0, 0.3, 2000)), "flag": rng.random(2000) < 0.5})
    reference.loc[:4, "ratio"] = 80.0  # a long tail, as inner_to_rim has
    reference["flag"] = reference.flag.astype(float)
    batch = reference.sample(20, random_state=1).reset_index(drop=True)
    batch.loc[:, "ratio"] = batch.ratio.clip(upper=5.0)
    calm = style_distances(reference, batch, ["ratio", "flag"])
    with_outlier = style_distances(reference, batch.assign(ratio=[200.0, *batch.ratio[1:]]), ["ratio", "flag"])
    rank_spread = np.sqrt(1 / 12)  # a uniform percentile's standard deviation
    assert with_outlier["ratio"] - calm["ratio"] <= 1 / 20 / rank_spread + 1e-9
    shifted = style_distances(reference, batch.assign(ratio=batch.ratio * 1.5), ["ratio", "flag"])
    assert shifted["ratio"] > with_outlier["ratio"], "a shift of the whole batch outweighs one extreme scan"
    assert calm["flag"] == with_outlier["flag"], "columns are ranked on their own"
    assert percentile_ranks(pd.Series([1.0, 1.0, 2.0, 3.0]), pd.Series([1.0, np.nan, 9.0])).tolist()[0] == 0.25
    assert np.isnan(percentile_ranks(pd.Series([1.0, 2.0]), pd.Series([np.nan]))[0])


def test_calibration_batches_carry_the_pools_own_sampling_error():
    """A batch drawn from one finite pool shares the pool's offset; a fresh batch does not. The OOD share of
    calibration draws must vary as a fresh batch's does over new pools (binomial at n, plus the pool's at N)."""
    rng = np.random.default_rng(3)
    share, size, pool_size = 0.05, 200, 400
    distances = (rng.random(pool_size) < share).astype(float)  # 1: beyond the OOD threshold of 0.5
    pool = BatchPool(np.zeros((4, 2)), pd.DataFrame(), [], {}, 0.5, np.zeros((pool_size, 2)), pd.DataFrame(),
                     None, distances)
    observed = distances.mean()
    fresh_spread = np.sqrt(observed * (1 - observed) * (1 / size + 1 / pool_size))
    calibrating = pool.null_draws(size, 2000, rng, ("OOD share",))["OOD share"].std()
    arriving = pool.draws(size, 2000, rng, ("OOD share",))["OOD share"].std()
    assert calibrating == pytest.approx(fresh_spread, rel=0.15)
    assert arriving < 0.8 * calibrating, "without replacement from the pool, batches share its offset"


def test_calibration_resamples_whole_groups_so_clustered_pools_give_wider_thresholds():
    """A pool of groups of 10 alike scans holds a tenth as many independent units: its own offset varies as a pool
    of N/10 scans would, and calibration batches must carry that (binomial at n, plus the pool's at N/10)."""
    rng = np.random.default_rng(5)
    share, size, groups, group_size = 0.1, 60, 60, 10
    beyond = np.repeat((rng.random(groups) < share).astype(float), group_size)  # every scan of a group alike
    pool = BatchPool(np.zeros((4, 2)), pd.DataFrame(), [], {}, 0.5, np.zeros((len(beyond), 2)), pd.DataFrame(),
                     None, beyond, groups=np.repeat(np.arange(groups), group_size))
    observed = beyond.mean()
    clustered_spread = np.sqrt(observed * (1 - observed) * (1 / size + 1 / groups))
    calibrating = pool.null_draws(size, 2000, rng, ("OOD share",))["OOD share"].std()
    assert calibrating == pytest.approx(clustered_spread, rel=0.15)
    as_scans = BatchPool(np.zeros((4, 2)), pd.DataFrame(), [], {}, 0.5, np.zeros((len(beyond), 2)), pd.DataFrame(),
                         None, beyond).null_draws(size, 2000, rng, ("OOD share",))["OOD share"].std()
    assert as_scans < 0.8 * calibrating, "resampling scans, not groups, understates the pool's own offset"


def test_calibrate_draws_each_check_from_its_own_pool():
    rng = np.random.default_rng(4)
    small = BatchPool(np.zeros((4, 2)), pd.DataFrame(), [], {}, 0.5, np.zeros((50, 2)), pd.DataFrame(), None,
                      (rng.random(50) < 0.5).astype(float))
    calm = BatchPool(np.zeros((4, 2)), pd.DataFrame(), [], {}, 0.5, np.zeros((50, 2)), pd.DataFrame(), None,
                     np.zeros(50))
    with pytest.raises(ValueError, match="no calibration pool"):
        calibrate({"OOD share": small}, [20], 20, 0.05, seed=0)
    # Only the OOD share is asked of `small` and only zeros of `calm`: the thresholds show which pool served which.
    pools = {check: calm for check in CHECKS} | {"OOD share": small}
    calm.batch = lambda rows, checks=CHECKS: {check: 0.0 for check in checks}
    calibration = calibrate(pools, [20], 40, 0.05, seed=0)
    assert calibration["pool"] == {check: 50 for check in CHECKS}
    assert calibration["sizes"]["20"]["thresholds"]["OOD share"] > 0.2
    assert all(calibration["sizes"]["20"]["thresholds"][c] == 0.0 for c in CHECKS if c != "OOD share")


def test_thresholds_between_calibrated_sizes_follow_one_over_root_n():
    calibration = {"sizes": {"20": {"thresholds": {"x": 0.5}}, "80": {"thresholds": {"x": 0.25}}}}
    assert thresholds_at(calibration, 20) == {"x": 0.5} and thresholds_at(calibration, 10) == {"x": 0.5}
    assert thresholds_at(calibration, 500) == {"x": 0.25}, "beyond the largest size: its (higher) threshold"
    # linear in 1/sqrt(n): 45 sits at this share of the way from 20 to 80
    weight = (20 ** -0.5 - 45 ** -0.5) / (20 ** -0.5 - 80 ** -0.5)
    assert thresholds_at(calibration, 45)["x"] == pytest.approx(0.5 - 0.25 * weight)
