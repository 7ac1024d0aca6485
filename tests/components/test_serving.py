"""The served ensemble as an HTTP endpoint that is safe to expose: image bytes in, paths only under an operator's
root, per-image and per-request limits, and clean 4xx answers (no stack trace, no server path) for bad input.

Fast: two tiny Keras models and a logistic-regression stacker, registered through `components.register.log_ensemble`
in an MLflow sqlite store under tmp, and served by MLflow's own scoring app (`scoring_server.init`) in-process."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

from components.config import Preprocess, load_params
from components.images import load_rgb, normalise, to_rgb
from components.predict import IMAGE_ROOT_ENV, BadInput, Limits, batch_at, decode_rows, predict_paths
from tests.conftest import CLASSES, ROOT, class_image

SIZES = {"tiny_a": 32, "tiny_b": 48}
# Limits chosen here, far from params.yaml's, so the test sees that register bakes in the params it is given.
MAX_ROWS, MAX_BYTES, MAX_PIXELS = 3, 120_000, 250_000


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit black PNG of width x height pixels in a few kB: rows are compressed one at a time."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\0" * (1 + math.ceil(width / 8))
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(model URI, params, folder of scans): the ensemble logged by `log_ensemble` with this module's limits."""
    import keras
    from sklearn.linear_model import LogisticRegression

    from components.config import load_params
    from components.register import log_ensemble
    from components.stack import Stacker, stack_features

    work = tmp_path_factory.mktemp("serving")
    rng = np.random.default_rng(0)
    scans = work / "scans"
    scans.mkdir()
    for n in range(2 * MAX_ROWS + 1):
        class_image(n % 4, rng, size=40).save(scans / f"scan_{n}.jpg", quality=90)
    (work / "splits").mkdir()  # log_ensemble's input example is the first test image
    pd.DataFrame({"path": [str(scans / "scan_0.jpg")]}).to_csv(work / "splits" / "test.csv", index=False)
    for name, size in SIZES.items():
        (work / "models" / name).mkdir(parents=True)
        keras.Sequential([keras.Input((size, size, 3)), keras.layers.Rescaling(1 / 255),
                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(len(CLASSES), "softmax")]
                         ).save(work / "models" / name / "model.keras")
    params = load_params(ROOT / "params.yaml", [
        f"paths.models={work / 'models'}", f"paths.splits={work / 'splits'}", f"stack.models={list(SIZES)}",
        f"paths.reference={work / 'models' / 'reference'}",
        f"serve.max_rows={MAX_ROWS}", f"serve.max_image_bytes={MAX_BYTES}", f"serve.max_image_pixels={MAX_PIXELS}"])
    probabilities = {name: rng.dirichlet(np.ones(len(CLASSES)), 40) for name in SIZES}
    features = stack_features(probabilities, params.stack)
    automl = LogisticRegression(max_iter=200).fit(features, np.arange(40) % len(CLASSES))
    Stacker(automl, list(SIZES), CLASSES, params.stack).save(work / "models" / "stacker")
    (work / "models" / "reference").mkdir()  # the monitor's reference profile travels with the version
    (work / "models" / "reference" / "reference.json").write_text("{}\n")

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    try:  # artifacts under tmp too (MLflow's default is ./mlruns in the cwd)
        experiment = mlflow.create_experiment("serving", artifact_location=(work / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_ensemble(params)
        yield info.model_uri, params, scans
    finally:
        mlflow.set_tracking_uri(previous)


def serve(model_uri: str, image_root: Path | None = None) -> TestClient:
    """MLflow's scoring app (what `mlflow models serve` runs) around the model, loaded as the server loads it."""
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server

    with pytest.MonkeyPatch.context() as patch:  # the root is read at load time; init() sets a global env var
        patch.delenv(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, raising=False)
        if image_root is None:
            patch.delenv(IMAGE_ROOT_ENV, raising=False)
        else:
            patch.setenv(IMAGE_ROOT_ENV, str(image_root))
        return TestClient(scoring_server.init(mlflow.pyfunc.load_model(model_uri)))


@pytest.fixture(scope="module")
def client(registered) -> TestClient:
    return serve(registered[0])


def post(client: TestClient, values, columns=("image",)):
    rows = [[value] for value in values]
    return client.post("/invocations", json={"dataframe_split": {"columns": list(columns), "data": rows}})


def refusal(answer) -> str:
    """The model's own reason from a clean 4xx: after MLflow's echo of the client's data ("Failed to predict data
    '<frame>'. Error: ..."), with no stack trace and no server-side path anywhere in the body."""
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
    body = answer.json()
    assert "stack_trace" not in body and "Traceback" not in answer.text and 'File "' not in answer.text
    for server_path in (str(ROOT), sys.prefix, str(Path(mlflow.__file__).parent)):
        assert server_path not in answer.text
    return body["message"].partition("\nError: ")[2] or body["message"]


def assert_still_serves(client: TestClient, scans: Path) -> None:
    answer = post(client, [b64((scans / "scan_1.jpg").read_bytes())])
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["predicted_class"] in CLASSES


def test_register_bakes_the_serve_limits_into_the_version(registered):
    uri, params, _ = registered
    limits = mlflow.pyfunc.load_model(uri).unwrap_python_model().limits
    assert (limits.max_rows, limits.max_image_bytes, limits.max_image_pixels) == (
        params.serve.max_rows, params.serve.max_image_bytes, params.serve.max_image_pixels) == (
        MAX_ROWS, MAX_BYTES, MAX_PIXELS)
    assert limits.image_root is None, "paths are refused unless the operator names a root"


def test_valid_images_score_and_one_bad_row_is_named(client, registered):
    scans = registered[2]
    good = [b64((scans / f"scan_{n}.jpg").read_bytes()) for n in range(MAX_ROWS)]
    answer = post(client, good)
    assert answer.status_code == 200, answer.text
    predictions = pd.DataFrame(answer.json()["predictions"])
    assert len(predictions) == MAX_ROWS and set(predictions.predicted_class) <= set(CLASSES)
    np.testing.assert_allclose(predictions.filter(like="prob_").sum(axis=1), 1.0, rtol=1e-6)

    reason = refusal(post(client, [good[0], b64(b"plain text"), good[1]]))
    assert "row 1" in reason and "not an image" in reason
    assert "row 0" not in reason and "row 2" not in reason


FUZZ = {  # name -> (column values, words the reason must hold)
    "random bytes": (lambda s: [b64(np.random.default_rng(1).bytes(3000))], ["row 0", "not an image"]),
    "truncated JPEG": (lambda s: [b64((s / "scan_2.jpg").read_bytes()[:400])], ["row 0", "corrupt image"]),
    "20000x20000 PNG": (lambda s: [b64(png_bomb(20_000, 20_000))], ["row 0", "decompression bomb"]),
    "PNG over the pixel limit": (lambda s: [b64(png_bomb(600, 600))], ["row 0", "decompression bomb",
                                                                        str(MAX_PIXELS)]),
    "over-long base64": (lambda s: ["A" * (4 * math.ceil(MAX_BYTES / 3) + 4)], ["row 0", str(MAX_BYTES)]),
    "not base64": (lambda s: ["this is not base64!"], ["row 0", "not base64"]),
    "a number": (lambda s: [17], ["row 0"]),
    "empty frame": (lambda s: [], ["got 0"]),
    "too many rows": (lambda s: [b64((s / "scan_0.jpg").read_bytes())] * (MAX_ROWS + 1), [f"got {MAX_ROWS + 1}"]),
    "server path": (lambda s: ["/etc/passwd"], ["row 0", "does not read file paths"]),
}


@pytest.mark.parametrize("case", FUZZ)
def test_bad_input_gets_a_clean_4xx_and_the_server_stays_up(client, registered, case):
    scans = registered[2]
    values, words = FUZZ[case]
    reason = refusal(post(client, values(scans)))
    for word in words:
        assert word in reason, reason
    assert_still_serves(client, scans)


def test_a_wrong_column_is_refused_by_the_signature(client, registered):
    answer = post(client, [b64((registered[2] / "scan_0.jpg").read_bytes())], columns=("picture",))
    assert "image" in refusal(answer)
    assert_still_serves(client, registered[2])


def test_a_path_gets_the_same_answer_whether_or_not_the_file_exists(client, registered, tmp_path):
    scans = registered[2]
    existing = scans / "scan_3.jpg"  # a real image on the server
    missing = existing.with_name("scan_X.jpg")
    assert existing.is_file() and not missing.exists() and len(str(existing)) == len(str(missing))
    reasons = [refusal(post(client, [str(path)])) for path in (existing, missing)]
    assert reasons[0] == reasons[1] and "row 0" in reasons[0]
    assert_still_serves(client, scans)


def test_the_bomb_and_over_long_base64_are_refused_before_decoding(client, registered, monkeypatch):
    calls = []  # spies on PIL's pixel decoding and on base64 decoding
    for owner, name in ((ImageFile.ImageFile, "load"), (base64, "b64decode"), (binascii, "a2b_base64")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    for case, never in (("20000x20000 PNG", {"load"}), ("PNG over the pixel limit", {"load"}),
                        ("over-long base64", {"b64decode", "a2b_base64"})):
        calls.clear()
        refusal(post(client, FUZZ[case][0](registered[2])))
        assert not never & set(calls), f"{case}: decoded ({calls})"
    calls.clear()
    assert_still_serves(client, registered[2])  # the spies do see a good image decoded
    assert {"load", "b64decode"} <= set(calls)


def test_an_internal_error_answers_500_without_trace_or_path(client, registered, monkeypatch):
    from components.stack import Stacker

    def broken(self, probabilities):
        raise RuntimeError(f"cannot open {ROOT}/secret/stacker.pkl")

    monkeypatch.setattr(Stacker, "predict_proba", broken)
    answer = post(client, [b64((registered[2] / "scan_0.jpg").read_bytes())])
    assert answer.status_code == 500
    assert "stack_trace" not in answer.json() and "secret" not in answer.text and str(ROOT) not in answer.text
    monkeypatch.undo()
    assert_still_serves(client, registered[2])


def test_paths_are_read_only_under_the_operator_root_after_resolving(registered, tmp_path):
    uri, _, scans = registered
    root, outside = tmp_path / "incoming", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    image = (scans / "scan_4.jpg").read_bytes()
    (root / "sub" / "scan.jpg").write_bytes(image)
    (outside / "scan.jpg").write_bytes(image)
    (root / "link.jpg").symlink_to(outside / "scan.jpg")
    served = serve(uri, root)

    by_bytes = post(served, [b64(image)]).json()["predictions"]
    for inside in ("sub/scan.jpg", str(root / "sub" / "scan.jpg"), "sub/../sub/scan.jpg"):
        answer = post(served, [inside])
        assert answer.status_code == 200, (inside, answer.text)
        assert answer.json()["predictions"] == by_bytes
    refused = {value: refusal(post(served, [value])) for value in (
        "../elsewhere/scan.jpg", str(outside / "scan.jpg"), "link.jpg", "sub/../../elsewhere/scan.jpg",
        "sub/missing.jpg", "missing.jpg", "/nope/x.jpg")}
    assert len(set(refused.values())) == 1, refused  # existing or not, outside or missing: one answer
    assert "allowed image root" in next(iter(refused.values()))
    assert all(str(root) not in reason for reason in refused.values())
    assert_still_serves(served, scans)


def test_predict_paths_reads_local_files_and_sends_bytes_in_chunks_of_max_rows(registered, monkeypatch):
    uri, _, scans = registered
    monkeypatch.delenv(IMAGE_ROOT_ENV, raising=False)  # the model refuses paths: only bytes can succeed
    files = [str(scans / f"scan_{n}.jpg") for n in range(2 * MAX_ROWS + 1)]
    out = predict_paths(files, uri)
    assert out.path.tolist() == files
    served = post(serve(uri), [b64(Path(f).read_bytes()) for f in files[-1:]]).json()["predictions"]
    np.testing.assert_allclose(out.filter(like="prob_").iloc[-1].to_numpy(),
                               pd.DataFrame(served).filter(like="prob_").iloc[0].to_numpy(), rtol=1e-6)

    (scans.parent / "notes.jpg").write_text("not a scan")
    with pytest.raises(BadInput) as failure:
        predict_paths([*files[:MAX_ROWS], str(scans.parent / "notes.jpg")], uri)
    assert str(scans.parent / "notes.jpg") in str(failure.value) and not re.search(r"\brow \d", str(failure.value))


def test_a_version_registered_before_the_limits_still_scores_in_process(registered, tmp_path):
    """`promote` loads the old @champion with this code: its meta has max_image_pixels only."""
    from components.predict import EnsembleModel

    models = registered[2].parent / "models"
    (tmp_path / "meta.json").write_text(json.dumps({"classes": CLASSES, "models": list(SIZES),
                                                    "max_image_pixels": MAX_PIXELS}))
    artifacts = {name: str(models / name / "model.keras") for name in SIZES}
    model = EnsembleModel()
    model.load_context(SimpleNamespace(artifacts={**artifacts, "stacker": str(models / "stacker" / "stacker.pkl"),
                                                  "meta": str(tmp_path / "meta.json")}))
    image = b64((registered[2] / "scan_0.jpg").read_bytes())
    assert len(model.predict(None, pd.DataFrame({"image": [image] * (MAX_ROWS + 1)}))) == MAX_ROWS + 1
    with pytest.raises(BadInput, match="decompression bomb"):
        model.predict(None, pd.DataFrame({"image": [b64(png_bomb(600, 600))]}))


@pytest.mark.parametrize("preprocess", [load_params(ROOT / "params.yaml").data.preprocess, Preprocess.plain()],
                         ids=["params", "plain"])
def test_served_pixels_equal_training_pixels_for_any_mode(tmp_path, preprocess):
    # A framed phantom (a bright head in a black field, off centre, not square), as the head crop expects.
    y, x = np.mgrid[0:90, 0:120]
    phantom = np.where(((y - 45) / 32) ** 2 + ((x - 55) / 40) ** 2 < 1, 90 + (x * 1.2).astype(np.uint8), 0)
    first = tmp_path / "scan.jpg"
    Image.fromarray(phantom.astype(np.uint8), mode="L").save(first, quality=95)
    gray = Image.open(first)
    files = {"jpeg": first, "rgba.png": tmp_path / "a.png", "16bit.png": tmp_path / "b.png"}
    gray.convert("RGBA").resize((70, 50)).save(files["rgba.png"])
    Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257).save(files["16bit.png"])
    limits = Limits(max_rows=len(files), max_image_bytes=10**6, max_image_pixels=10**6)
    batches, errors = decode_rows(pd.Series([b64(p.read_bytes()) for p in files.values()]), limits, {24, 32, 57},
                                  preprocess)
    assert not errors
    for size, batch in batches.items():
        expected = np.stack([load_rgb(p, size, preprocess) for p in files.values()]).astype(np.float32)
        np.testing.assert_array_equal(batch, expected)
        np.testing.assert_array_equal(batch[:1], batch_at([normalise(to_rgb(Image.open(first)), preprocess)], size,
                                                          preprocess))
    row = batches[57][0, 28, :, 0]  # the middle row of the phantom at 57 px
    if preprocess.crop_to_head:  # the black field is cropped away: the head spans the input but for the margin
        assert row[3] > 0 and row[-4] > 0
    else:
        assert row[3] == 0 and row[-4] == 0
