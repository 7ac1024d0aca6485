import json

from components.report import comparison_table, target_checks, write_report
from tests.conftest import TRAINED_EXTRA, tiny_params


def test_report_is_written_from_the_run_outputs(in_trained, tmp_path):
    params = tiny_params(in_trained, TRAINED_EXTRA + [f"report.out={tmp_path}/results.md",
                                                      f"report.figures={tmp_path}/results"])
    out = write_report(params, commit="abc1234")
    text = out.read_text()
    evaluation = json.loads((params.paths.metrics / "evaluation.json").read_text())

    for name, sets in evaluation.items():
        comparison = text.split("## Comparison", 1)[1].split("## Targets", 1)[0]
        row = next(line for line in comparison.splitlines() if line.startswith(f"| {name} |"))
        assert f"{100 * sets['test']['accuracy']:.1f}%" in row
        assert f"{100 * sets['test_clean']['accuracy']:.1f}%" in row
    for stage in ["train@" + m for m in params.stack.models] + ["stack", "evaluate", "register"]:
        assert f"| {stage} | `" in text, f"no wall time for {stage}"
    registered = json.loads((in_trained / "reports" / "registered.json").read_text())
    assert registered["run_id"] in text
    assert "page written at `abc1234`" in text and "trained at git commit `" in text
    assert (tmp_path / "results" / "confusion_stack.png").stat().st_size > 0
    assert "](results/confusion_stack.png)" in text


def test_targets_compare_the_stack_with_the_best_model_and_soft_vote(params):
    def sets(accuracy):
        return {"test_clean": {"accuracy": accuracy}}

    evaluation = {"custom_cnn": sets(0.96), "mobilenetv2": sets(0.90), "soft_vote": sets(0.97), "stack": sets(0.95)}
    checks = {what: met for what, met, _ in target_checks(evaluation, params.report)}
    assert checks["custom_cnn >= 95.0%"] and not checks["mobilenetv2 >= 95.0%"]
    assert not checks["stack >= 99.0%"]
    assert not checks["stack above the best single model (custom_cnn)"]
    assert not checks["stack above soft voting"]


def test_comparison_table_has_one_row_per_model_and_a_column_per_class(params):
    metrics = {"accuracy": 0.5, "macro_f1": 0.4, "tumor_sensitivity": 0.9, "ece": 0.1,
               **{f"sensitivity_{c}": 0.25 for c in params.data.classes}}
    table = comparison_table({"a": {"test": metrics, "test_clean": metrics}}, params.data.classes)
    header, rule, row = table.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|")
    assert row.startswith("| a | 50.0% | 40.0% | 90.0% |")
