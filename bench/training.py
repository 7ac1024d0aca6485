"""Input pipeline and training throughput, each against its baseline measured in the same run.

1. Pipeline: images/s of components.dataset.make_dataset vs keras.utils.image_dataset_from_directory over the
   same files, per epoch; the goal (>= 3x) applies from the second epoch on, once the cache is warm.
2. Training: images/s of model.fit on the pipeline vs bare model.fit on in-memory arrays (the bound), per model
   and image size; goal >= 0.9x.

Medians over repeats. Results go to bench/results/training.json and are printed.
Usage: python -m bench.training [--sizes 64 128] [--models custom_cnn ...] [--images 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from components.devices import cpuinfo_value

RESULTS_DIR = Path(__file__).parent / "results"
RESULTS = RESULTS_DIR / "training.json"


def machine() -> str:
    """Host, CPU model and cores: machines of one kind differ up to 3x, so every figure names the CPU it ran on."""
    return f"{platform.node()} {cpuinfo_value('model name') or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_results(name: str, results: dict) -> Path:
    path = RESULTS_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def timed_epoch(dataset) -> float:
    start = time.perf_counter()
    for _ in dataset:
        pass
    return time.perf_counter() - start


def bench_pipeline(params, frame, size: int, epochs: int) -> dict:
    import keras

    from components.dataset import make_dataset

    model_params = params.model("custom_cnn").model_copy(update={"image_size": size})
    # The directory loader does not augment, so the ratio compares like with like: augmentation off.
    plain = model_params.model_copy(update={"augmentation": model_params.augmentation.model_copy(
        update={"flip": False, "rotation": 0.0, "zoom": 0.0, "contrast": 0.0})})
    ours = make_dataset(frame, params.data, plain, params.train, training=True, seed=params.seed)
    augmented = make_dataset(frame, params.data, model_params, params.train, training=True,
                             seed=params.seed)
    directory = Path(params.paths.raw) / "Training"
    baseline = keras.utils.image_dataset_from_directory(directory, image_size=(size, size), batch_size=32,
                                                        label_mode="int", seed=params.seed, verbose=False)
    n_dir = sum(1 for p in directory.rglob("*") if p.is_file())
    ours_rate = [len(frame) / timed_epoch(ours) for _ in range(epochs)]
    dir_rate = [n_dir / timed_epoch(baseline) for _ in range(epochs)]
    augmented_rate = [len(frame) / timed_epoch(augmented) for _ in range(epochs)]
    warm = [a / b for a, b in zip(ours_rate[1:], dir_rate[1:])]
    return {"image_size": size, "pipeline_images_per_s": ours_rate, "directory_loader_images_per_s": dir_rate,
            "pipeline_with_augmentation_images_per_s": augmented_rate,
            "median_ratio_from_epoch_2": statistics.median(warm), "goal": 3.0}


def bench_training(params, frame, name: str, size: int, repeats: int) -> dict:
    import numpy as np

    from components.dataset import load_images, make_dataset
    from components.models import build_model

    model_params = params.model(name).model_copy(update={"image_size": size})
    model = build_model(name, model_params, params.train, len(params.data.classes))
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=False)
    dataset = make_dataset(frame, params.data, model_params, params.train, training=True, seed=params.seed)
    images = load_images(frame, size, params.data.preprocess)
    labels = frame.label.map({c: i for i, c in enumerate(params.data.classes)}).to_numpy(np.int32)
    batch = model_params.batch_size
    model.fit(images, labels, batch_size=batch, epochs=1, verbose=0)  # trace + warm up both paths
    model.fit(dataset, epochs=1, verbose=0)
    bound, ours = [], []
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        start = time.perf_counter()
        model.fit(images, labels, batch_size=batch, epochs=1, verbose=0, shuffle=True)
        bound.append(len(frame) / (time.perf_counter() - start))
        start = time.perf_counter()
        model.fit(dataset, epochs=1, verbose=0)
        ours.append(len(frame) / (time.perf_counter() - start))
    return {"model": name, "image_size": size, "pipeline_images_per_s": statistics.median(ours),
            "in_memory_images_per_s": statistics.median(bound),
            "median_ratio": statistics.median(a / b for a, b in zip(ours, bound)), "goal": 0.9}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--models", nargs="+", default=["custom_cnn", "mobilenetv2", "densenet169", "resnet50"])
    parser.add_argument("--images", type=int, default=512, help="training images per timed epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipeline-epochs", type=int, default=4)
    parser.add_argument("--only", choices=["pipeline", "training"], help="run one part; keep the other's results")
    args = parser.parse_args(argv)

    from components.config import load_params
    from components.dataset import read_split

    params = load_params()
    train = read_split(params.paths.splits, "train")
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results = {"machine": machine(), "date": now(),
               "pipeline": [] if args.only != "training" else previous.get("pipeline", []),
               "training": [] if args.only != "pipeline" else previous.get("training", [])}
    for size in args.sizes if args.only != "training" else []:
        row = bench_pipeline(params, train, size, args.pipeline_epochs)
        results["pipeline"].append(row)
        print(f"pipeline {size}px: ours {row['pipeline_images_per_s']} vs directory "
              f"{row['directory_loader_images_per_s']} img/s -> x{row['median_ratio_from_epoch_2']:.1f} (goal 3)")
    subset = train.sample(min(args.images, len(train)), random_state=params.seed)
    for size in args.sizes if args.only != "pipeline" else []:
        for name in args.models:
            row = bench_training(params, subset, name, size, args.repeats)
            results["training"].append(row)
            print(f"train {name} {size}px: pipeline {row['pipeline_images_per_s']:.1f} vs in-memory "
                  f"{row['in_memory_images_per_s']:.1f} img/s -> x{row['median_ratio']:.2f} (goal 0.9)", flush=True)
            write_results(RESULTS.name, results)
    print(f"wrote {write_results(RESULTS.name, results)}")
    return results


if __name__ == "__main__":
    main()
