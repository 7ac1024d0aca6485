"""Manifest + GX validation: every bad input is quarantined or fails hard, naming the file; raw is untouched."""

import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import Preprocess
from components.images import load_rgb
from components.manifest import build_manifest
from components.validate import ValidationFailed, validate_manifest
from tests.conftest import tree_digest


def png_header_bomb(path, width=20000, height=20000):
    """A tiny PNG whose header claims width x height: PIL refuses it at open, no 400 MB is ever allocated."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def run(raw, params, tmp_path):
    manifest = build_manifest(raw, params.manifest)
    summary = validate_manifest(manifest, params.validate_params, params.data.classes, tmp_path / "docs",
                                tmp_path / "quarantine.csv", tmp_path / "summary.json")
    return manifest, summary, pd.read_csv(tmp_path / "quarantine.csv")


@pytest.fixture
def lenient(params):
    """Tiny fixtures have ~56 files, so a handful of bad ones is a large share."""
    return params.model_copy(update={"validate_": params.validate_params.model_copy(
        update={"max_quarantine_share": 0.5})})


def test_bad_files_are_quarantined_with_their_reason_and_raw_is_unchanged(tiny_dataset, lenient, tmp_path):
    folder = tiny_dataset / "Training" / "glioma"
    good = (folder / "Tr-gl_0000.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is a text file, renamed")
    png_header_bomb(folder / "bomb.png")
    before = tree_digest(tiny_dataset)

    manifest, summary, quarantine = run(tiny_dataset, lenient, tmp_path)

    reasons = dict(zip(quarantine.path, quarantine.reason))
    assert "corrupt image" in reasons["Training/glioma/corrupt.jpg"]
    assert "empty file" in reasons["Training/glioma/empty.jpg"]
    assert "not an image" in reasons["Training/glioma/notes.jpg"]
    assert "decompression bomb" in reasons["Training/glioma/bomb.png"]
    assert summary["quarantined"] == 4 and summary["success"]
    assert (tmp_path / "docs" / "index.html").exists()
    assert tree_digest(tiny_dataset) == before


def test_unusual_modes_are_normalised_and_counted(tiny_dataset, lenient, tmp_path):
    folder = tiny_dataset / "Training" / "notumor"
    rgba = Image.new("RGBA", (40, 40), (200, 10, 10, 128))
    rgba.save(folder / "alpha.png")
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)).save(folder / "deep.png")
    Image.new("CMYK", (40, 40), (0, 100, 200, 0)).save(folder / "print.jpg")

    manifest, summary, quarantine = run(tiny_dataset, lenient, tmp_path)

    assert summary["normalised"] == 3 and quarantine.empty
    assert {"RGBA", "CMYK"} <= set(summary["modes"]) and any(m.startswith("I") for m in summary["modes"])
    for name in ("alpha.png", "deep.png", "print.jpg"):
        array = load_rgb(folder / name, 24, Preprocess.plain())
        assert array.shape == (24, 24, 3) and array.dtype == np.uint8
    assert load_rgb(folder / "deep.png", 40, Preprocess.plain()).max() == 255, "16-bit range must be rescaled, not clipped"


@pytest.mark.parametrize("breakage, expected", [
    ("unknown_class", "column='label'"),
    ("empty_class", "column='files'"),
    ("escaping_symlink", "column='link_escapes'"),
    ("too_many_bad_files", "column='readable'"),
])
def test_hard_failures_name_the_failed_expectation(tiny_dataset, params, tmp_path, breakage, expected):
    if breakage == "unknown_class":
        (tiny_dataset / "Training" / "astrocytoma").mkdir()
        (tiny_dataset / "Training" / "glioma" / "Tr-gl_0000.jpg").rename(
            tiny_dataset / "Training" / "astrocytoma" / "x.jpg")
    elif breakage == "empty_class":
        for path in (tiny_dataset / "Training" / "pituitary").glob("*"):
            path.unlink()
        for path in (tiny_dataset / "Testing" / "pituitary").glob("*"):
            path.unlink()
    elif breakage == "escaping_symlink":
        outside = tmp_path / "outside.jpg"
        outside.write_bytes((tiny_dataset / "Training" / "glioma" / "Tr-gl_0001.jpg").read_bytes())
        (tiny_dataset / "Training" / "glioma" / "link.jpg").symlink_to(outside)
    else:
        for n in range(5):
            (tiny_dataset / "Training" / "glioma" / f"bad{n}.jpg").write_bytes(b"")
    before = tree_digest(tiny_dataset)

    with pytest.raises(ValidationFailed, match="data validation failed") as failure:
        run(tiny_dataset, params, tmp_path)

    assert expected in str(failure.value)
    if breakage == "escaping_symlink":
        assert "Training/glioma/link.jpg" in str(failure.value)
    if breakage == "unknown_class":
        assert "Training/astrocytoma/x.jpg" in str(failure.value)
    assert tree_digest(tiny_dataset) == before
