import shutil
from pathlib import Path

import pandas as pd
import pytest

from components.validate import OutsideInputRoot
from flows.inference import batch_predict
from tests.conftest import TRAINED_EXTRA


def test_batch_predict_scores_good_scans_and_quarantines_bad_ones(prefect_harness, in_trained):
    incoming = in_trained / "data" / "incoming" / "monday"
    incoming.mkdir(parents=True, exist_ok=True)
    test = pd.read_csv(in_trained / "data" / "splits" / "test.csv")
    for path in test.path.iloc[:3]:
        shutil.copy2(path, incoming)
    (incoming / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (incoming / "empty.jpg").write_bytes(b"")

    result = batch_predict(str(incoming), model_uri="models:/brain-tumor-ensemble@challenger",
                           params_path=str(in_trained / "params_trained.yaml"))

    assert result["scored"] == 3
    reasons = {row["path"]: row["reason"] for row in result["quarantined"]}
    assert set(reasons) == {"broken.jpg", "empty.jpg"} and "empty file" in reasons["empty.jpg"]
    predictions = pd.read_csv(result["predictions"])
    assert len(predictions) == 3 and predictions.predicted_class.notna().all()
    assert (incoming / "broken.jpg").exists(), "quarantined files are never deleted"
    # monitor.after_batch_predict: the batch is monitored with the same model; 3 scans are too few for a verdict.
    monitoring = result["monitoring"]["summary"]
    assert monitoring["metrics"]["scans"] == 3 and monitoring["metrics"]["quarantined"] == 2
    assert not monitoring["verdict"] and result["monitoring"]["retrain"] is None
    assert Path(monitoring["report"]).exists()


def test_batch_predict_refuses_folders_outside_its_root(prefect_harness, in_trained, tmp_path):
    with pytest.raises(OutsideInputRoot, match="outside the input root"):
        batch_predict(str(tmp_path), params_path=str(in_trained / "params_trained.yaml"))
    with pytest.raises(OutsideInputRoot):
        batch_predict(str(in_trained / "data" / "incoming" / ".." / ".." / "data"),
                      params_path=str(in_trained / "params_trained.yaml"))
