"""The flow's overhead per remote stage, on a one-machine cluster that shares no disk (bench.cluster): the same
training stage run in the flow's workspace (flow.runner: local) and on a worker node in a checkout of its own
(flow.runner: ray), in the same run, `--repeats` times each, alternating.

For the remote runs it splits the stage's wall time into what the node did (clone, pull of the inputs, the command,
commit and push of the outputs) and what the flow did after (the lock round trip: check the node's entry, write it,
check the outputs out from the DVC remote); for the local runs, the command and the commit. Medians, with the CPU
model, go to bench/results/remote.json.

Usage: python -m bench.remote [--data ../shared/datasets/brain-tumor-mri] [--sample 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.cluster import Cluster, prepare_head_repo
from bench.training import machine, now, write_results

ROOT = Path(__file__).resolve().parents[1]
STAGE = "train@custom_cnn"
SMALL = ["models.custom_cnn.image_size=64", "models.custom_cnn.epochs=2", "stack.time_budget=5"]


def run(repo: Path, cluster: Cluster, overrides: list[str]) -> tuple[dict, float]:
    from flows.training import run_with_runner

    changes = {"MLFLOW_TRACKING_URI": cluster.tracking_uri, **cluster.ray_auth()}
    previous, saved = Path.cwd(), {key: os.environ.get(key) for key in changes}
    os.chdir(repo)
    os.environ.update(changes)
    start = time.perf_counter()
    try:
        result = run_with_runner(str(repo / "params.yaml"), overrides)
    finally:
        os.chdir(previous)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return result, time.perf_counter() - start


def stale(repo: Path) -> None:
    """Make the benchmarked stage, and only it, run again."""
    shutil.rmtree(repo / "predictions" / STAGE.split("@")[1], ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "brain-tumor-mri")
    parser.add_argument("--sample", type=int, default=100, help="training scans per class")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from prefect.testing.utilities import prefect_test_harness

    base = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    cluster = Cluster(base)
    rows = {"local": [], "remote": []}
    try:
        cluster.start()
        cluster.start_node("worker", {"trainer": 1})
        repo = prepare_head_repo(cluster, ROOT, ["custom_cnn"], [*SMALL, "flow.ray_stage_resources={trainer: 1}",
                                                                 "flow.retries=0"], args.data.resolve(), args.sample)
        with prefect_test_harness(server_startup_timeout=120):
            run(repo, cluster, ["flow.runner=local"])  # the data stages, once
            for repeat in range(args.repeats):
                for mode, overrides in (("local", ["flow.runner=local"]), ("remote", ["flow.runner=ray"])):
                    stale(repo)
                    result, wall = run(repo, cluster, overrides)
                    timing = result["timings"][STAGE]
                    rows[mode].append({"flow_seconds": wall, **timing})
                    print(f"{mode} {repeat + 1}: flow {wall:.1f} s, " + ", ".join(
                        f"{k} {v:.1f} s" for k, v in timing.items() if isinstance(v, float)), flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)

    def median(mode: str, key: str) -> float | None:
        values = [row[key] for row in rows[mode] if key in row]
        return statistics.median(values) if values else None

    summary = {key: {"local": median("local", key), "remote": median("remote", key)}
               for key in ("flow_seconds", "seconds", "pull_seconds", "push_seconds", "commit_seconds")}
    overhead = summary["flow_seconds"]["remote"] - summary["flow_seconds"]["local"]
    results = {"machine": machine(), "date": now(), "stage": STAGE, "sample_per_class": args.sample,
               "overrides": SMALL, "repeats": args.repeats, "runs": rows, "medians": summary,
               "remote_overhead_seconds": overhead}
    print(json.dumps(summary, indent=2))
    print(f"remote overhead per stage: {overhead:.1f} s (median flow time remote - local); wrote "
          f"{write_results('remote.json', results)}")
    return results


if __name__ == "__main__":
    main()
