import json

from components.report import comparison_table, seed_spreads, target_checks, write_report
from tests.conftest import TRAINED_EXTRA, tiny_params


def test_report_is_written_from_the_run_outputs(in_trained, tmp_path):
    params = tiny_params(in_trained, TRAINED_EXTRA + [f"report.out={tmp_path}/results.md",
                                                      f"report.figures={tmp_path}/results",
                                                      f"report.runs_dir={tmp_path}/runs"])
    out = write_report(params, commit="abc1234")
    text = out.read_text()
    evaluation = json.loads((params.paths.metrics / "evaluation.json").read_text())
    test_size = sum(1 for _ in open(params.paths.splits / "test.csv")) - 1

    full = text.split("## Full test split", 1)[1].split("## Clean subset", 1)[0]
    clean = text.split("## Clean subset", 1)[1].split("## Shortcut audit", 1)[0]
    for name, sets in evaluation.items():
        row = next(line for line in full.splitlines() if line.startswith(f"| {name} |"))
        k = round(sets["test"]["accuracy"] * test_size)
        assert f"{100 * sets['test']['accuracy']:.1f}% ({k}/{test_size}" in row
        assert "CI" in row, "a tiny test split: every figure gets its interval"
        row = next(line for line in clean.splitlines() if line.startswith(f"| {name} |"))
        assert row.split(" | ")[1].startswith(f"{100 * sets['test_clean']['accuracy']:.1f}%")
    for stage in ["train@" + m for m in params.stack.models] + ["stack", "evaluate", "register"]:
        assert f"| {stage} | `" in text, f"no wall time for {stage}"
    registered = json.loads((in_trained / "reports" / "registered.json").read_text())
    assert registered["run_id"] in text
    assert "page written at `abc1234`" in text and "trained at git commit `" in text
    assert (tmp_path / "results" / "confusion_stack.png").stat().st_size > 0
    assert "](results/confusion_stack.png)" in text
    assert "### Style alone predicts the label" in text, "the audit's tables are on the page"
    assert "`external-dev`: not run here" in text
    record = json.loads((tmp_path / "runs" / f"kaggle-seed{params.seed}.json").read_text())
    assert record["evaluation"] == evaluation and record["data"] == "kaggle" and record["seed"] == params.seed
    assert "| stack: seeds within" in text and "one seed so far" in text
    assert "No seed has been run on two data versions so far." in text
    weighting = text.split("## By MRI weighting", 1)[1].split("## Seeds", 1)[0]
    assert "### official test, by estimated weighting" in weighting and "### val, by source and weighting" in weighting
    assert "| kaggle T1-like | tumor sensitivity |" in weighting or "| kaggle T2-like | tumor sensitivity |" in weighting
    assert (tmp_path / "results" / "by_weighting.png").stat().st_size > 0
    assert (tmp_path / "results" / "learning_curves.png").stat().st_size > 0
    assert "](results/learning_curves.png)" in text
    for name in params.stack.models:  # one epoch each in the tiny run: its best epoch is its last
        line = next(line for line in text.splitlines() if line.startswith(f"- {name}: best val_accuracy"))
        assert "at epoch 1 of 1 (" in line and "still improving" in line


def test_the_data_comparison_sets_each_seeds_runs_on_every_data_version_side_by_side():
    from components.report import data_comparison

    def run(data, seed, accuracy, commit):
        found = {"value": accuracy, "k": round(68 * accuracy), "n": 68}
        return {"data": data, "seed": seed, "commit": commit, "training_minutes": 30.0 + seed - 42,
                "evaluation": {"stack": {"test": {"accuracy": accuracy}}},
                "external": {"external-dev": {"all": {"stack": {"tumor_sensitivity": found}}}}}

    runs = {"kaggle-seed42": run("kaggle", 42, 0.775, "4d96c0a00"), "new+kaggle-seed42": run("new+kaggle", 42,
                                                                                              0.741, "4d96c0a00"),
            "new+kaggle-seed43": run("new+kaggle", 43, 0.728, "c99e04000")}
    text = data_comparison(runs, 43, ["glioma", "notumor"])
    assert "### seed 42" in text and "### seed 43" not in text, "seed 43 has one data version: nothing to compare"
    assert "| `kaggle` | `new+kaggle` |" in text and "| stack, full test accuracy | 77.5% | 74.1% |" in text
    assert "| trained at commit | `4d96c0a` | `4d96c0a` |" in text
    assert "| `external-dev` all: stack tumor sensitivity | 77.5% (53/68" in text
    runs["kaggle-seed43"] = run("kaggle", 43, 0.70, "c99e04000")
    both = data_comparison(runs, 43, ["glioma", "notumor"])
    assert both.index("### seed 43") < both.index("### seed 42"), "this run's seed first"


def test_a_curve_is_still_improving_when_its_best_epoch_is_at_the_end():
    import pandas as pd

    from components.report import curves_section

    rising = pd.DataFrame({"epoch": [1, 2, 3, 4], "minutes": [1.0, 2, 3, 4], "val_accuracy": [0.3, 0.5, 0.6, 0.7]})
    peaked = rising.assign(val_accuracy=[0.3, 0.8, 0.6, 0.5])
    text = curves_section({"a": rising, "b": peaked}, "val_accuracy", "results/curves.png")
    line_a, line_b = text.splitlines()[:2]
    assert "70.0% at epoch 4 of 4 (4.0 of 4.0 min)" in line_a and "still improving" in line_a
    assert "80.0% at epoch 2 of 4 (2.0 of 4.0 min)" in line_b and "flat or falling" in line_b
    assert text.endswith("(results/curves.png)")
    loss = rising.rename(columns={"val_accuracy": "val_loss"})
    assert "at epoch 1 of 4" in curves_section({"a": loss}, "val_loss", None), "for a loss the best is the lowest"


def full(accuracy, sensitivity=0.995, specificity=0.98, ece=0.02, clean=None):
    metrics = {"accuracy": accuracy, "tumor_sensitivity": sensitivity, "tumor_specificity": specificity, "ece": ece}
    return {"test": metrics, "test_clean": {**metrics, "accuracy": accuracy if clean is None else clean}}


def test_targets_are_judged_on_the_full_split_with_the_audit_external_and_seeds(params):
    targets = params.report.model_copy(update={
        "base_model_target": 0.91, "model_targets": {"custom_cnn": 0.925}, "stack_target": 0.97,
        "tumor_sensitivity_target": 0.99, "tumor_specificity_target": 0.97, "ece_target": 0.03,
        "clean_gap_points": 2.0, "counter_shortcut_gap_points": 5.0, "t1_healthy_specificity_target": 0.9,
        "external_sensitivity_target": 0.9, "external_specificity_target": 0.9, "external_accuracy_target": 0.85,
        "seed_spread_points": 1.5, "stack_seed_spread_points": 1.0, "training_budget_minutes": 90})
    evaluation = {"custom_cnn": full(0.93), "mobilenetv2": full(0.90), "soft_vote": full(0.98),
                  "stack": full(0.975, specificity=0.96, ece=0.05, clean=0.99)}
    audit = {"counter_shortcut_gaps": {"stack": {"overall": 0.99, "counter_shortcut": 0.90, "gap_points": 9.0,
                                                 "n": 40}},
             "test_cells": {"stack": {"notumor T1-like": {"tumor_specificity": {"value": 0.8, "k": 80, "n": 100}}}}}
    figure = {"value": 0.95, "k": 19, "n": 20}
    external = {"external-dev": {"metrics": {"stack": {"tumor_sensitivity": figure}}},
                "labelled": {"metrics": {"stack": {"tumor_sensitivity": figure}},
                             "by_weighting": {"T2": {"stack": {"tumor_sensitivity": {"value": 0.5, "k": 5, "n": 10},
                                                               "accuracy": {"value": 0.9, "k": 9, "n": 10}}}}},
                "held-back": None}
    seeds = {42: evaluation, 43: {**evaluation, "custom_cnn": full(0.91), "stack": full(0.972)}}
    found = {what: (met, value) for what, met, value in target_checks(evaluation, targets, audit, external, seeds,
                                                                      95.0)}
    checks = {what: met for what, (met, _) in found.items()}
    assert checks["custom_cnn >= 92.5%"] and not checks["mobilenetv2 >= 91.0%"], "a model's own target comes first"
    assert found["mobilenetv2 >= 91.0%"][1] == "90.0%, 1.0 points short"
    assert checks["stack >= 97.0%"] and not checks["stack above soft voting"]
    assert not checks["stack tumor sensitivity >= 99.0% at specificity >= 97.0%"], "specificity 96% is short"
    assert not checks["stack ECE <= 0.03"]
    assert checks["stack clean subset within 2.0 points of the full split"] is True  # 1.5 points
    assert not checks["stack: T2-like tumors within 5.0 points of all tumors"]
    assert found["stack: T1-like healthy scans called healthy >= 90.0%"] == (False, "80.0% (80/100), 10.0 points short")
    assert checks["external `external-dev`: stack tumor sensitivity >= 90.0%"]
    assert not checks["external `labelled` T2: stack tumor sensitivity >= 90.0%"]
    assert checks["external `labelled` T2: stack class accuracy >= 85.0%"]
    assert checks["external `held-back`: stack tumor sensitivity >= 90.0%"] is None, "not run is not met"
    assert not checks["custom_cnn: seeds within 1.5 points"] and checks["stack: seeds within 1.0 points"]
    assert not checks["all trainings <= 90 min"]


def test_training_wall_time_counts_trainings_that_ran_at_once_once():
    from components.report import StageTime, busy_seconds

    in_a_row = [StageTime("train@a", "1", 60, start=0), StageTime("train@b", "2", 30, start=100)]
    assert busy_seconds(in_a_row) == 90
    two_at_once = [StageTime("train@a", "1", 60, start=0), StageTime("train@b", "2", 50, start=30),
                   StageTime("train@c", "3", 10, start=40)]  # b overlaps a; c lies inside both
    assert busy_seconds(two_at_once) == 80
    assert busy_seconds([]) == 0


def test_seed_spread_is_max_minus_min_and_undefined_for_one_seed():
    spreads = seed_spreads({1: {"a": full(0.90), "b": full(0.5)}, 2: {"a": full(0.93)}, 3: {"a": full(0.91)}})
    assert abs(spreads["a"] - 0.03) < 1e-9 and spreads["b"] is None


def test_comparison_table_has_one_row_per_model_and_a_column_per_class(params):
    metrics = {"accuracy": 0.5, "macro_f1": 0.4, "tumor_sensitivity": 0.9, "ece": 0.1,
               **{f"sensitivity_{c}": 0.25 for c in params.data.classes}}
    table = comparison_table({"a": {"test": metrics, "test_clean": metrics}}, params.data.classes)
    header, rule, row = table.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|")
    assert row.startswith("| a | 50.0% | 40.0% | 90.0% |")
