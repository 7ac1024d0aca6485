"""Do two CPU trainings at once beat the same two one after the other on this machine?

`devices.cpu_concurrency` decides how many trainings the flow runs at once without a GPU. This measures what that
choice costs: two trainings (default custom_cnn and mobilenetv2 at the profile's image sizes, each in its own
process as the flow runs them) on the same sample of training images, timed
- one after the other (the baseline, `cpu_concurrency: 1`);
- both at once, each with TensorFlow's default thread pools (`cpu_concurrency: 2` as the flow runs it);
- both at once, each limited to `cores / 2` intra-op threads (what a flow would have to set to avoid
  oversubscribing the cores).
Each worker process loads and decodes its images, builds its model and runs `model.fit` for a few epochs on
in-memory arrays, so the wall time includes TensorFlow's start-up and the decode, as a training's does. The modes
are interleaved in every repeat so that machine noise hits them alike; medians over repeats. Each run appends its
figures to bench/results/concurrency.json (short runs weigh start-up more than long ones: keep both) and prints them.

Run it in a workspace with the splits (`dvc repro split`), with no other training running.
Usage: python -m bench.concurrency [--workspace .] [--models custom_cnn mobilenetv2] [--images 512] [--epochs 2]
       [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.training import RESULTS_DIR, machine, now

RESULTS = RESULTS_DIR / "concurrency.json"

MODES = ("one after the other", "both at once", "both at once, threads split")


def worker(model: str, images: int, epochs: int, threads: int) -> None:
    """One training, as its own process: decode, build, fit. `threads` 0 keeps TensorFlow's default pools."""
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    import numpy as np

    from components.config import load_params
    from components.dataset import load_images, read_split
    from components.models import build_model

    params = load_params()
    frame = read_split(params.paths.splits, "train")
    frame = frame.sample(min(images, len(frame)), random_state=params.seed)
    model_params = params.model(model)
    pixels = load_images(frame, model_params.image_size, params.data.preprocess)
    labels = frame.label.map({c: i for i, c in enumerate(params.data.classes)}).to_numpy(np.int32)
    network = build_model(model, model_params, params.train, len(params.data.classes))
    network.compile("adam", "sparse_categorical_crossentropy")
    network.fit(pixels, labels, batch_size=model_params.batch_size, epochs=epochs, verbose=0)


def run(commands: list[list[str]], workspace: Path, at_once: bool) -> float:
    """Wall seconds of the worker commands, started together or one after the other; a failed worker stops it."""
    start = time.perf_counter()
    if at_once:
        processes = [subprocess.Popen(command, cwd=workspace) for command in commands]
        codes = [process.wait() for process in processes]
    else:
        codes = [subprocess.run(command, cwd=workspace).returncode for command in commands]
    if any(codes):
        raise SystemExit(f"a worker failed (exit codes {codes}) in {workspace}: run `dvc repro split` there first")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path("."))
    parser.add_argument("--models", nargs=2, default=["custom_cnn", "mobilenetv2"])
    parser.add_argument("--images", type=int, default=512, help="training images each worker decodes and fits")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one training
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.images, args.epochs, args.threads)
        return {}

    workspace = args.workspace.resolve()
    split_threads = max(1, (os.cpu_count() or 2) // 2)
    env_path = os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"] = env_path.rstrip(os.pathsep)

    def commands(threads: int) -> list[list[str]]:
        return [[sys.executable, "-m", "bench.concurrency", "--worker", model, "--images", str(args.images),
                 "--epochs", str(args.epochs), "--threads", str(threads)] for model in args.models]

    seconds = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES:
            threads = split_threads if mode.endswith("threads split") else 0
            seconds[mode].append(run(commands(threads), workspace, at_once=mode.startswith("both")))
            print(f"repeat {repeat + 1}: {mode}: {seconds[mode][-1]:.1f} s", flush=True)
    baseline = statistics.median(seconds[MODES[0]])
    results = {"machine": machine(), "date": now(), "cores": os.cpu_count(), "models": args.models,
               "images": args.images, "epochs": args.epochs, "repeats": args.repeats, "seconds": seconds,
               "median_seconds": {mode: statistics.median(values) for mode, values in seconds.items()},
               "speedup_vs_one_after_the_other": {mode: baseline / statistics.median(values)
                                                  for mode, values in seconds.items()}}
    for mode in MODES:
        print(f"{mode}: median {results['median_seconds'][mode]:.1f} s, "
              f"x{results['speedup_vs_one_after_the_other'][mode]:.2f} against one after the other")
    runs = json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"runs": [*runs, results]}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return results


if __name__ == "__main__":
    main()
