"""The benchmark suite: `python -m bench` from the project root, after a finished run (repo up to date, a champion).

Each part runs in its own process (one TensorFlow per process) and records bench/results/<part>.json; this
command then prints every goal and writes bench/results/summary.md.
  training  input pipeline vs image_dataset_from_directory; training vs bare in-memory model.fit
  noop      no-op `dvc repro` and no-op scheduled train_pipeline
  serving   the ensemble pyfunc vs the four Keras models called directly
  load      the served ensemble under 1, 4, 16 clients; the team MLflow server under 4 trainings' metric logging
Usage: python -m bench [--parts training noop serving] [--training-args "--images 256 --repeats 2"]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

from bench.training import RESULTS_DIR, now

PARTS = ("training", "noop", "serving", "load")


def goal_rows(part: str, results: dict) -> list[tuple[str, str, str, bool]]:
    """(what, measured, goal, met) for every goal in one part's results."""
    rows = []
    if part == "training":
        for row in results.get("pipeline", []):
            ratio = row["median_ratio_from_epoch_2"]
            rows.append((f"input pipeline {row['image_size']} px vs directory loader", f"x{ratio:.1f}", ">= x3",
                         ratio >= 3))
        for row in results.get("training", []):
            ratio = row["median_ratio"]
            rows.append((f"training {row['model']} {row['image_size']} px vs in-memory bound",
                         f"x{ratio:.2f} ({row['pipeline_images_per_s']:.0f} img/s)", ">= x0.9", ratio >= 0.9))
    elif part == "noop":
        dvc, flow = results["dvc_repro"], results["flow"]
        rows.append(("no-op dvc repro", f"{dvc['median_seconds']:.2f} s", "<= 3 s", dvc["median_seconds"] <= 3))
        rows.append(("no-op train_pipeline flow", f"{flow['median_seconds']:.1f} s", "<= 30 s",
                     flow["median_seconds"] <= 30))
    elif part == "serving":
        for kind in ("latency", "throughput"):
            row = results[kind]
            rows.append((f"ensemble pyfunc {kind}, {row['images']} image(s)",
                         f"x{row['median_ratio']:.2f} ({row['pyfunc_seconds'] * 1000:.0f} ms)", "<= x1.2",
                         row["median_ratio"] <= 1.2))
    return rows


def summary(parts: list[str]) -> str:
    lines = [f"# Benchmark results ({now()})", "", "Written by `python -m bench`; medians of repeats measured side "
             "by side with their baseline in the same run.", "", "| measurement | result | goal | met |",
             "|---|---|---|---|"]
    machines = set()
    for part in parts:
        path = RESULTS_DIR / f"{part}.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        machines.add(f"{results['machine']} ({part}: {results['date']})")
        lines += [f"| {what} | {measured} | {goal} | {'yes' if met else '**no**'} |"
                  for what, measured, goal, met in goal_rows(part, results)]
    return "\n".join(lines + ["", "Machine and date per part: " + "; ".join(sorted(machines)), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    for part in PARTS:
        parser.add_argument(f"--{part}-args", default="", help=f"extra arguments for python -m bench.{part}")
    args = parser.parse_args()
    failed = []
    for part in args.parts:
        extra = shlex.split(getattr(args, f"{part}_args"))
        print(f"== bench.{part}", flush=True)
        if subprocess.run([sys.executable, "-m", f"bench.{part}", *extra]).returncode != 0:
            failed.append(part)
    text = summary(list(PARTS))
    (RESULTS_DIR / "summary.md").write_text(text)
    print(text)
    if failed:
        raise SystemExit(f"benchmark parts failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
