"""Drift alarms: the false-alarm rate and the detection rate of the monitor's verdict, per batch size.

In a workspace after the main job (trained models, the `reference` stage's calibrated thresholds), every scan of a
pool is scored once through the monitor's own path (the ensemble via components.predict.score_files, the embedding
model, the style features, the distance to the training data); batches are then drawn from the scored rows and judged
with components.drift's statistics against the thresholds calibrated for their size, as `braintumor flow monitor`
judges a folder. Pools:

- in distribution: the held-out splits as they are (stack, val, gate): on a split outside the reference's
  monitor.calibration_splits no threshold was calibrated, so its alarms are false alarms; the others are shown as
  the calibration pool;
- shifted copies of val: inverted contrast, blurred, low resolution, another colour mode and JPEG quality, the skull
  masked away (the head's rim cut off), and a batch of one weighting only (val's T2-like scans, from the style stage);
- every folder of ../shared/datasets other than the training set (another collection, as it comes).

Results: bench/results/drift.json (rates with their counts, the CPU model), and the plot docs/monitoring/detection.png.
Usage (in the prepared workspace): python -m bench.drift [--sizes 20 60 200] [--batches 100]; to judge the same
batches by an earlier calibration too: [--calibration OLD/reference.json] [--pools "stack split"] [--out NAME.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter, ImageOps

from bench.training import machine, now, write_results

PLOT = Path(__file__).resolve().parents[1] / "docs" / "monitoring" / "detection.png"
SPLITS = ("stack", "val", "gate")  # the held-out splits: false alarms on those the reference did not calibrate on
SHIFTS = {
    "inverted contrast": lambda image: ImageOps.invert(image.convert("RGB")),
    "blurred": lambda image: image.filter(ImageFilter.GaussianBlur(radius=3)),
    "low resolution": lambda image: image.resize((max(image.width // 4, 8), max(image.height // 4, 8))).resize(
        image.size),
    "colour mode and JPEG quality": None,  # handled in write_shifted: mode flipped, quality 20
    "skull masked": None,  # handled in write_shifted: the head's rim cut off
}


def strip_skull(image: Image.Image, rim: float = 0.12) -> Image.Image:
    """Black outside the head eroded by `rim` of its size: the skull and scalp go, as in skull-stripped series."""
    from scipy import ndimage

    from components.images import head_mask

    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    mask = head_mask(gray)
    if mask.any():
        depth = max(1, int(rim * np.sqrt(mask.sum())))
        mask = ndimage.binary_erosion(mask, iterations=depth)
    return Image.fromarray((gray * mask * 255).astype(np.uint8), "L")


def write_shifted(paths: list[str], shift: str, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n, path in enumerate(paths):
        image = Image.open(path)
        target = folder / f"{n:05d}.jpg"
        if shift == "colour mode and JPEG quality":
            (image.convert("RGB") if image.mode == "L" else image.convert("L")).save(target, quality=20)
        elif shift == "skull masked":
            strip_skull(image).save(target, quality=95)
        else:
            SHIFTS[shift](image).save(target, quality=95)
        out.append(str(target))
    return out


def score_pool(paths: list[str], scorer, extractor, reference, params) -> dict:
    """Per scan: the stack's predicted class, the embedding, the style features and the distance to the training
    embeddings, as the monitor computes them; scans the model refuses are left out."""
    from components.predict import score_files
    from components.reference import embed, neighbour_distance
    from components.stack import STACK
    from components.style import style_frame

    probabilities, scored, _ = score_files(scorer, paths)
    kept = [paths[i] for i in scored]
    embeddings = embed(extractor, kept, reference.preprocess, params.train.eval_batch_size)
    return {"predicted": np.asarray(scorer.classes)[probabilities[STACK].argmax(axis=1)], "embeddings": embeddings,
            "style": style_frame(kept, params.manifest.workers),
            "distances": neighbour_distance(reference.embeddings, embeddings, int(reference.meta["neighbours"]))}


def rates(pool: dict, reference, sizes: list[int], batches: int, seed: int, calibration: dict | None = None
          ) -> list[dict]:
    """Share of `batches` batches of each size with a drift verdict (with replacement when the pool is smaller)."""
    from components.drift import CHECKS, BatchPool, thresholds_at
    from components.style import STYLE_FEATURES

    scorer = BatchPool(reference.embeddings, reference.style, STYLE_FEATURES, reference.meta["class_mix"],
                       reference.threshold, pool["embeddings"], pool["style"], pool["predicted"], pool["distances"])
    rng = np.random.default_rng(seed)
    out = []
    for size in sizes:
        limits = thresholds_at(calibration or reference.meta["calibration"], size)
        draws = scorer.draws(size, batches, rng)
        alarms = np.any([draws[c] > limits[c] for c in CHECKS], axis=0)
        out.append({"size": size, "batches": batches, "alarms": int(alarms.sum()), "rate": float(alarms.mean()),
                    "pool": len(pool["predicted"]), "with_replacement": size > len(pool["predicted"]),
                    "by_check": {c: float(np.mean(draws[c] > limits[c])) for c in CHECKS}})
    return out


def plot(results: dict, out: Path) -> Path:
    from components.metrics import save_figure

    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for name, rows in results["pools"].items():
        kind = results["kinds"][name]
        style = {"false alarm": dict(color="black", linewidth=2.5), "calibration": dict(color="grey", linestyle=":")}
        axis.plot([r["size"] for r in rows], [100 * r["rate"] for r in rows], marker="o",
                  label=f"{name} ({kind})", **style.get(kind, {}))
    axis.axhline(100 * results["false_alarm_rate"], color="red", linestyle="--", linewidth=1,
                 label=f"monitor.false_alarm_rate ({100 * results['false_alarm_rate']:g}%)")
    axis.set(xscale="log", xlabel="batch size (scans)", ylabel="batches with a drift verdict (%)", ylim=(-3, 103),
             title=f"Drift verdicts per batch size ({results['machine']})")
    axis.set_xticks([r["size"] for r in next(iter(results["pools"].values()))],
                    [str(r["size"]) for r in next(iter(results["pools"].values()))])
    axis.legend(fontsize=7, loc="center right")
    axis.grid(alpha=0.3)
    return save_figure(figure, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 60, 200])
    parser.add_argument("--batches", type=int, default=100, help="batches drawn per pool and size")
    parser.add_argument("--shared", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--out", default="drift.json", help="results file name under bench/results")
    parser.add_argument("--pools", nargs="+", help="only the pools of these names (e.g. \"stack split\")")
    parser.add_argument("--calibration", type=Path, help="a reference.json whose thresholds judge every batch (e.g. "
                        "an earlier one, from a registered version's `reference` artifact) beside the workspace's")
    args = parser.parse_args(argv)

    from components.config import load_params
    from components.monitor import load_model
    from components.reference import embedding_extractor
    from components.style import T2, read_styles

    params = load_params()
    scorer, what, reference = load_model(params, None)
    extractor = embedding_extractor(scorer.models[reference.meta["embedding_model"]])
    val = pd.read_csv(params.paths.splits / "val.csv").path.tolist()
    styles = read_styles(params)
    t2_val = styles[(styles.split == "val") & (styles.weighting == T2)].path.tolist()
    calibrated_on = reference.meta["calibration"].get("splits", ["val"])
    held_out = {split: pd.read_csv(params.paths.splits / f"{split}.csv").path.tolist() for split in SPLITS}
    pools = {f"{split} split": (held_out[split], "calibration" if split in calibrated_on else "false alarm")
             for split in SPLITS}
    pools["val, T2-like only"] = (t2_val, "shift")
    scratch = Path(tempfile.mkdtemp(prefix="drift-bench-"))
    try:
        for shift in SHIFTS:
            pools[f"val, {shift}"] = (write_shifted(val, shift, scratch / shift.replace(" ", "-")), "shift")
        for folder in sorted(p for p in args.shared.iterdir() if p.is_dir() and p.resolve() !=
                             Path(params.paths.raw).resolve() and not (p / "Training").is_dir()):
            files = sorted(str(f) for f in folder.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
            pools[folder.name] = (files, "another collection")
        results = {"machine": machine(), "date": now(), "model": what, "sizes": args.sizes, "batches": args.batches,
                   "false_alarm_rate": reference.meta["calibration"]["false_alarm_rate"], "pools": {}, "kinds": {}}
        other = json.loads(args.calibration.read_text())["calibration"] if args.calibration else None
        if other:
            results |= {"other_calibration": str(args.calibration), "pools_other_calibration": {}}
        for index, (name, (paths, kind)) in enumerate(pools.items()):
            if args.pools and name not in args.pools:
                continue
            print(f"{name}: scoring {len(paths)} scans", flush=True)
            scored = score_pool(paths, scorer, extractor, reference, params)
            results["pools"][name] = rates(scored, reference, args.sizes, args.batches, params.seed + index)
            if other:  # the same batches (the same seed), judged by the other calibration's thresholds
                results["pools_other_calibration"][name] = rates(scored, reference, args.sizes, args.batches,
                                                                 params.seed + index, other)
                print("  other calibration: " + ", ".join(
                    f"{r['size']} scans: {100 * r['rate']:.0f}%" for r in results["pools_other_calibration"][name]))
            results["kinds"][name] = kind
            print("  " + ", ".join(f"{r['size']} scans: {100 * r['rate']:.0f}% ({r['alarms']}/{r['batches']})"
                                   for r in results["pools"][name]), flush=True)
            write_results(args.out, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    written = write_results(args.out, results)
    print(f"wrote {written}" + ("" if args.pools else f" and {plot(results, args.plot)}"))
    return results


if __name__ == "__main__":
    main()
