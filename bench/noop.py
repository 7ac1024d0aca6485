"""No-op costs on an up-to-date repo: `dvc repro` and a scheduled `train_pipeline` run that trains nothing.

Baselines measured in the same run: `dvc version` (the DVC command's own start-up) for `dvc repro`, and an empty
Prefect flow on the same server for the training flow. Goals: no-op `dvc repro` <= 3 s, no-op flow <= 30 s.
Run from the project root after a finished `dvc repro` or `braintumor flow train`.
Usage: python -m bench.noop [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from bench.training import machine, now, write_results

RESULTS_NAME = "noop.json"


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run(*command: str) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def bench_dvc(repeats: int) -> dict:
    first = run("dvc", "repro")
    if "Running stage" in first:
        raise SystemExit("dvc repro ran stages: the repo is not up to date, so this is not a no-op benchmark")
    repro, version = [], []
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        repro.append(timed(lambda: run("dvc", "repro")))
        version.append(timed(lambda: run("dvc", "version")))
    return {"dvc_repro_seconds": repro, "dvc_version_seconds": version,
            "median_seconds": statistics.median(repro),
            "median_ratio_to_dvc_startup": statistics.median(a / b for a, b in zip(repro, version)),
            "goal_seconds": 3.0}


def bench_flow(repeats: int) -> dict:
    from prefect import flow

    from flows.training import run_with_runner

    @flow(name="empty-baseline")
    def empty() -> None:
        return None

    empty()  # starts the (ephemeral) API server once, as a served deployment would already have it
    result = run_with_runner()
    if result["ran"]:
        raise SystemExit(f"train_pipeline ran {result['ran']}: the repo is not up to date")
    pipeline, baseline = [], []
    for _ in range(repeats):
        pipeline.append(timed(run_with_runner))
        baseline.append(timed(empty))
    return {"flow_seconds": pipeline, "empty_flow_seconds": baseline, "median_seconds": statistics.median(pipeline),
            "median_ratio_to_empty_flow": statistics.median(a / b for a, b in zip(pipeline, baseline)),
            "goal_seconds": 30.0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    results = {"machine": machine(), "date": now(), "dvc_repro": bench_dvc(args.repeats)}
    print(f"no-op dvc repro: median {results['dvc_repro']['median_seconds']:.2f} s (goal <= 3 s); "
          f"x{results['dvc_repro']['median_ratio_to_dvc_startup']:.1f} `dvc version`", flush=True)
    results["flow"] = bench_flow(max(1, args.repeats // 2))
    print(f"no-op train_pipeline: median {results['flow']['median_seconds']:.1f} s (goal <= 30 s); "
          f"x{results['flow']['median_ratio_to_empty_flow']:.1f} an empty flow", flush=True)
    write_results(RESULTS_NAME, results)
    return results


if __name__ == "__main__":
    main()
