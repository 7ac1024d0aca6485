"""Ablation of one model's training: each variant is the committed profile with a few params changed, trained in a
prepared workspace and judged on val and on external tumor scans, never on test.

For each variant (`name`, then its `-S` overrides) it runs the stage's own command, `braintumor -S seed=SEED
-S KEY=VALUE ... train --model MODEL`, in the workspace, and records:
- minutes: the command's wall time (TensorFlow start, training, and predicting val, stack and test);
- epochs run and the best epoch's val accuracy (plots/MODEL/history.csv);
- on val (predictions/MODEL/val.parquet, the saved model): accuracy, tumor sensitivity, and the counter-shortcut
  cells of the audit: T2-like tumors and T1-like healthy scans (their weighting from the `style` stage's
  data/style.parquet), each with its count and a Wilson interval; and val accuracy with flip test-time
  augmentation (the mean of each scan's and its mirror's probabilities), which needs no training to measure;
- on an external folder of tumor scans (default ../shared/datasets/external-dev, without the Kaggle set's
  duplicates, as `braintumor evaluate-external` drops them): tumor sensitivity.

The workspace is a clone of the repo with the data imported and `dvc repro style` run (the splits and the style
table): the trainings overwrite its models/MODEL and predictions/MODEL, so use one kept for this. Results go to
bench/results/ablation.json (each run appends, and records after every variant) and a markdown table is printed.
Variants run one after another: on 2 cores a training already uses both.

Usage: python -m bench.ablation --workspace DIR [--model custom_cnn] [--seed 42]
       [--variant NAME KEY=VALUE ...]... (default: the variants in VARIANTS)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.training import RESULTS_DIR, machine, now

RESULTS = RESULTS_DIR / "ablation.json"
OFF_CONTRAST = ["gamma=0.0", "invert=0.0", "blur=0.0", "noise=0.0", "low_resolution=0.0"]
VARIANTS = {
    # the committed profile: with the seed of a past run, also a check of same-seed reproducibility
    "profile": [],
    "profile, again": [],  # the same seed on the same machine: the run-to-run spread the others are read against
    "no contrast augmentation": [f"models.{{model}}.augmentation.{key}" for key in OFF_CONTRAST],
    "no head crop or standardisation": ["data.preprocess.crop_to_head=false", "data.preprocess.standardise=false"],
    "style balance": ["train.style_balance=true"],
    "twice the epochs": ["models.{model}.epochs={twice_the_epochs}"],  # how far the unused budget would go
}


def overrides_for(variant: list[str], model: str, params) -> list[str]:
    """The variant's overrides, with {model} and {twice_the_epochs} (of the profile's model) filled in."""
    return [item.format(model=model, twice_the_epochs=2 * params.model(model).epochs) for item in variant]


def external_scans(params, source: Path):
    """The readable scans of `source` that evaluate-external would score: no model trained on them and none
    duplicates an image of the imported data set (components.external.why_dropped)."""
    from components.external import detect_layout, find_duplicates, load_workspace, scan_source, why_dropped

    scans = scan_source(source, detect_layout(source, params.data.classes), params)
    scans = scans.join(find_duplicates(scans, load_workspace(params), params.paths.raw,
                                       params.split.near_duplicate_distance))
    return scans[why_dropped(scans, params.manifest.base_source).isna() & scans.readable].reset_index(drop=True)


def judge(workspace: Path, params, model: str, external) -> dict:
    """Val (overall and per style cell) and external figures of the model the last training left."""
    import keras
    import numpy as np
    import pandas as pd

    from components.audit import per_cell
    from components.dataset import load_images
    from components.metrics import NO_TUMOR, labelled_figures, proportion
    from components.style import T1, T2, read_styles

    classes, settings = params.data.classes, params.evaluate
    val = pd.read_parquet(workspace / params.paths.predictions / model / "val.parquet")
    cells = per_cell({model: val}, read_styles(params), classes, settings)[model]
    history = pd.read_csv(workspace / params.paths.plots / model / "history.csv")
    out = {
        "epochs_run": len(history),
        "best_epoch": int(history.val_accuracy.idxmax()) + 1,
        "best_val_accuracy": float(history.val_accuracy.max()),
        "val_accuracy": cells["all"]["accuracy"],
        "val_tumor_sensitivity": cells.get("tumor", {}).get("tumor_sensitivity"),
        "val_t2_like_tumor_sensitivity": cells.get(f"tumor {T2}", {}).get("tumor_sensitivity"),
        "val_t1_like_notumor_specificity": cells.get(f"{NO_TUMOR} {T1}", {}).get("tumor_specificity"),
    }
    network = keras.models.load_model(workspace / params.paths.models / model / "model.keras")
    size = int(network.input_shape[1])
    # Flip test-time augmentation, measured on val without building it in: the mean of the scan and its mirror.
    images = load_images(val, size, params.data.preprocess)
    mirrored = (network.predict(images, verbose=0) + network.predict(images[:, :, ::-1], verbose=0)) / 2
    right = int((mirrored.argmax(axis=1) == val.label.map({c: i for i, c in enumerate(classes)}).to_numpy()).sum())
    out["val_accuracy_flip_tta"] = proportion(right / len(val), right, len(val), settings.interval_below,
                                              settings.confidence)
    if external is not None and len(external):
        probabilities = network.predict(load_images(external, size, params.data.preprocess), verbose=0)
        figures = labelled_figures(external.label.to_numpy(), probabilities, classes, settings.tumor_threshold,
                                   settings.interval_below, settings.confidence)
        out["external_tumor_sensitivity"] = figures.get("tumor_sensitivity")
    keras.backend.clear_session()
    return out


def train_variant(workspace: Path, model: str, seed: int, overrides: list[str], log: Path) -> float:
    command = ["braintumor", "-S", f"seed={seed}", *[x for o in overrides for x in ("-S", o)], "train",
               "--model", model]
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, cwd=workspace, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    minutes = (time.perf_counter() - start) / 60
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}) in {workspace}; see {log}")
    return minutes


def markdown(rows: list[dict]) -> str:
    from components.metrics import proportion_text

    lines = ["| variant | minutes | epochs (best) | best val acc. | val accuracy | with flip TTA | val tumor sens. | "
             "val T2-like tumors | val T1-like healthy | external tumors |", "|---|" + "---|" * 9]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['minutes']:.1f} | {row['epochs_run']} ({row['best_epoch']}) | "
                     f"{100 * row['best_val_accuracy']:.1f}% | {proportion_text(row['val_accuracy'])} | "
                     f"{proportion_text(row['val_accuracy_flip_tta'])} | "
                     f"{proportion_text(row['val_tumor_sensitivity'])} | "
                     f"{proportion_text(row['val_t2_like_tumor_sensitivity'])} | "
                     f"{proportion_text(row['val_t1_like_notumor_specificity'])} | "
                     f"{proportion_text(row.get('external_tumor_sensitivity'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--model", default="custom_cnn")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--external", type=Path, default=Path("../shared/datasets/external-dev"),
                        help="labelled folder of external scans (any evaluate-external layout); '' for none")
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                        help="a variant: its name, then its overrides (repeatable)")
    args = parser.parse_args(argv)

    from components.config import load_params

    workspace = args.workspace.resolve()
    external_dir = args.external.resolve() if str(args.external) else None
    variants = {v[0]: v[1:] for v in args.variant} if args.variant else VARIANTS
    os.chdir(workspace)  # params paths are relative to the workspace
    params = load_params(workspace / "params.yaml", [f"seed={args.seed}"])
    if not (workspace / params.paths.style).exists():
        raise SystemExit(f"{workspace / params.paths.style} not found: prepare the workspace with "
                         "`braintumor data import --source ...` and `dvc repro style`")
    external = external_scans(params, external_dir) if external_dir else None
    logs = workspace / "logs" / "ablation"
    logs.mkdir(parents=True, exist_ok=True)
    record = {"when": now(), "machine": machine(), "model": args.model, "seed": args.seed,
              "external": str(args.external), "external_scans": None if external is None else len(external),
              "rows": []}
    history = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    rows = record["rows"]
    for name, variant in variants.items():
        overrides = overrides_for(variant, args.model, params)
        variant_params = load_params(workspace / "params.yaml", [f"seed={args.seed}", *overrides])
        print(f"[{now()}] {name}: {' '.join(overrides) or '(the profile)'}", flush=True)
        minutes = train_variant(workspace, args.model, args.seed, overrides,
                                logs / f"{name.replace(' ', '_')}.log")
        rows.append({"variant": name, "overrides": overrides, "minutes": minutes,
                     **judge(workspace, variant_params, args.model, external)})
        print(markdown(rows[-1:]), flush=True)
        # recorded after every variant: an interrupted ablation keeps the variants it finished
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps([*history, record], indent=2) + "\n")
    print(markdown(rows))
    print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
