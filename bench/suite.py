"""The CI suite's time: `.ci/run` on a fresh clone, its wall time and each test file's seconds, with the CPU model,
and the estimate for the slowest machine we run (a 2-core AVX2-only EPYC). CI has 90 minutes; the suite's own goal is
45 minutes on that machine.

The estimate multiplies by SLOWEST_FACTOR, measured on the same suite on both machine types (35.6 minutes on the
EPYC against about 17 on a 2-core AMX Xeon, issue #24); re-measure it when a run on the EPYC is at hand.

Usage (from the project root, with ../shared beside it):
    python -m bench.suite                          # clones HEAD beside the repo, runs .ci/run there (about 30 min)
    python -m bench.suite --junit F --wall S       # records a `.ci/run` already made with --junitxml=F, S seconds
Results: bench/results/suite.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from bench.training import machine, now, write_results

ROOT = Path(__file__).resolve().parents[1]
SLOWEST_FACTOR = 35.6 / 17.0
GOAL_MINUTES = 45.0


def file_seconds(junit: Path) -> tuple[dict[str, float], dict[str, int]]:
    """{test file: seconds (setup, call and teardown)}, and the counts of passed, failed, errors and skipped."""
    seconds: dict[str, float] = defaultdict(float)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for case in ET.parse(junit).getroot().iter("testcase"):
        seconds[case.get("classname", "").replace(".", "/") + ".py"] += float(case.get("time", 0))
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        counts[{"failure": "failed", "error": "errors"}.get(outcome, outcome)] += 1
    return dict(sorted(seconds.items(), key=lambda item: -item[1])), counts


def run_ci() -> tuple[Path, float]:
    """`.ci/run` on a fresh clone of HEAD beside the repo (CI's layout: ../shared next to it); (junit file, wall s)."""
    clone = Path(tempfile.mkdtemp(prefix=".suite-", dir=ROOT.parent))
    junit = clone.with_suffix(".xml")
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {**os.environ, "PYTEST_ADDOPTS": f"--junitxml={junit} -p no:cacheprovider"}
        start = time.perf_counter()
        subprocess.run(["bash", ".ci/run"], cwd=clone, env=env, check=False)
        return junit, time.perf_counter() - start
    finally:
        shutil.rmtree(clone, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--junit", type=Path, help="junit XML of a finished `.ci/run`")
    parser.add_argument("--wall", type=float, help="that run's wall seconds (install included)")
    args = parser.parse_args()
    junit, wall = (args.junit, args.wall) if args.junit else run_ci()
    seconds, counts = file_seconds(junit)
    tests = sum(seconds.values())
    estimate = wall * SLOWEST_FACTOR / 60
    results = {
        "date": now(), "machine": machine(), "wall_minutes": round(wall / 60, 1),
        "test_minutes": round(tests / 60, 1), "counts": counts,
        "slowest_machine_factor": round(SLOWEST_FACTOR, 2), "slowest_machine_estimate_minutes": round(estimate, 1),
        "goal_minutes": GOAL_MINUTES, "goal_met": estimate <= GOAL_MINUTES,
        "file_seconds": {name: round(value, 1) for name, value in seconds.items()},
    }
    path = write_results("suite.json", results)
    print(f"{machine()}: .ci/run {wall / 60:.1f} min ({tests / 60:.1f} min of tests; {counts}); "
          f"estimate on the slowest machine {estimate:.1f} min (goal {GOAL_MINUTES:g}) -> {path}")
    for name, value in list(seconds.items())[:10]:
        print(f"  {value:7.1f} s  {name}")


if __name__ == "__main__":
    main()
