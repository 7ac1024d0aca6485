"""What a person sees of a stage: its own progress and result lines, within a line budget; the libraries' chatter
(TensorFlow's C++ logs, Keras's fit printout, Great Expectations) in logs/<stage>.log; everything with -v."""

import json
import re
import subprocess
import sys

from flows.console import stage_log_name
from flows.training import CONSOLE_LINE
from tests.conftest import tiny_overrides

CONSOLE_BUDGET = 12  # lines on stderr for one tiny training: a start line, an epoch line, a result line, and slack


def braintumor(args: list[str], cwd) -> subprocess.CompletedProcess:
    overrides = [flag for override in tiny_overrides() for flag in ("-S", override)]
    return subprocess.run([sys.executable, "-m", "flows.cli", *overrides, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_a_training_shows_progress_and_result_within_budget_and_logs_the_chatter(workspace):
    done = braintumor(["train", "--model", "custom_cnn"], workspace)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert 0 < len(lines) <= CONSOLE_BUDGET, f"{len(lines)} console lines:\n{done.stderr}"
    strangers = [line for line in lines if not CONSOLE_LINE.match(line)]
    assert not strangers, f"library output reached the console: {strangers}"
    assert any(re.search(r"train@custom_cnn: epoch 1/1: \d+ s, loss [\d.]+, val_accuracy", line) for line in lines), lines
    assert json.loads(done.stdout)["model"] == "custom_cnn", "stdout holds the result alone"
    log = (workspace / "logs" / f"{stage_log_name('train@custom_cnn')}.log").read_text()
    assert re.search(r"\d+/\d+ - \d+s - .*loss", log), "Keras's own fit printout went to the stage's log"
    assert "epoch 1/1: " in log, "the log holds the console's lines too"


def test_validate_keeps_great_expectations_out_of_the_console(workspace):
    done = braintumor(["validate"], workspace)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(CONSOLE_LINE.match(line) for line in done.stderr.splitlines()), done.stderr
    assert json.loads(done.stdout)["success"] is True
    log = (workspace / "logs" / "validate.log").read_text()
    assert "great_expectations" in log, "GX's INFO lines are in the stage's log"


def test_verbose_shows_everything_on_the_console(workspace):
    done = braintumor(["-v", "validate"], workspace)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "great_expectations" in done.stderr
    assert not (workspace / "logs" / "validate.log").exists()
