"""The CI suite's time: `.ci/run` on a fresh clone, its wall time and each test file's seconds, with the CPU model,
and the estimate for the slowest machine we run (a 2-core AVX2-only EPYC). CI has 90 minutes; the suite's own goal is
45 minutes on that machine.

The estimate multiplies by SLOWEST_FACTOR, measured on the same suite on both machine types (35.6 minutes on the
EPYC against about 17 on a 2-core AMX Xeon, issue #24); re-measure it when a run on the EPYC is at hand. It was
measured with the suite on one process; on two pytest-xdist workers both machines use both their cores, and the
waits that do not slow down with the CPU (servers starting, polling) are a larger share, so the factor is if anything
high for that.

Usage (from the project root, with ../shared beside it):
    python -m bench.suite                          # clones HEAD beside the repo, runs .ci/run there (about 30 min)
    python -m bench.suite --junit F --wall S       # records a `.ci/run` already made with --junitxml=F, S seconds
    python -m bench.suite --junit F1 --wall S1 --junit F2 --wall S2 --commit REV \
        --baseline-junit B --baseline-wall T --baseline-commit OLD
                                                   # medians over runs, with a baseline run made beside them (same
                                                   # machine, same hour): machines of one kind differ, so a change is
                                                   # judged against it
Results: bench/results/suite.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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


def pytest_command() -> str:
    """The test command `.ci/run` runs (the README's): how many workers the wall time had."""
    return next(line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.startswith("python -m pytest"))


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


def runs_summary(junits: list[Path], walls: list[float]) -> dict:
    """Medians over runs of one commit: the wall, and each test file's seconds; every run's wall and counts."""
    per_run = [file_seconds(junit) for junit in junits]
    names = sorted({name for seconds, _ in per_run for name in seconds})
    seconds = {name: statistics.median(run.get(name, 0.0) for run, _ in per_run) for name in names}
    return {
        "wall_minutes": round(statistics.median(walls) / 60, 1),
        # summed over the tests: with pytest-xdist workers side by side, more than the wall time
        "test_minutes": round(sum(seconds.values()) / 60, 1),
        "runs": [{"wall_minutes": round(wall / 60, 1), "counts": counts} for wall, (_, counts) in zip(walls, per_run)],
        "file_seconds": {name: round(value, 1) for name, value in sorted(seconds.items(), key=lambda i: -i[1])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--junit", type=Path, action="append", help="junit XML of a finished `.ci/run` (repeatable)")
    parser.add_argument("--wall", type=float, action="append", help="that run's wall seconds, install included "
                        "(one per --junit, in the same order)")
    parser.add_argument("--commit", help="the commit those runs tested")
    parser.add_argument("--baseline-junit", type=Path, action="append",
                        help="junit XML of a `.ci/run` of an earlier commit, run beside them (repeatable)")
    parser.add_argument("--baseline-wall", type=float, action="append", help="the baseline runs' wall seconds")
    parser.add_argument("--baseline-commit", help="the commit the baseline runs tested")
    args = parser.parse_args()
    if len(args.junit or []) != len(args.wall or []) or \
            len(args.baseline_junit or []) != len(args.baseline_wall or []):
        parser.error("give one --wall per --junit, and one --baseline-wall per --baseline-junit")
    if args.junit:
        junits, walls = args.junit, args.wall
    else:
        junit, wall = run_ci()
        junits, walls = [junit], [wall]
    summary = runs_summary(junits, walls)
    estimate = summary["wall_minutes"] * SLOWEST_FACTOR
    results = {
        "date": now(), "machine": machine(), "command": pytest_command(), "commit": args.commit,
        **{key: summary[key] for key in ("wall_minutes", "test_minutes", "runs")},
        "slowest_machine_factor": round(SLOWEST_FACTOR, 2), "slowest_machine_estimate_minutes": round(estimate, 1),
        "goal_minutes": GOAL_MINUTES, "goal_met": estimate <= GOAL_MINUTES,
        "file_seconds": summary["file_seconds"],
    }
    if args.baseline_junit:
        base = runs_summary(args.baseline_junit, args.baseline_wall)
        results["baseline"] = {"commit": args.baseline_commit, **base, "change_seconds": {
            name: round(results["file_seconds"].get(name, 0.0) - base["file_seconds"].get(name, 0.0), 1)
            for name in sorted(set(results["file_seconds"]) | set(base["file_seconds"]),
                               key=lambda n: results["file_seconds"].get(n, 0.0) - base["file_seconds"].get(n, 0.0))}}
    path = write_results("suite.json", results)
    print(f"{machine()}: .ci/run median {summary['wall_minutes']:.1f} min over {len(walls)} run(s) "
          f"{[run['wall_minutes'] for run in summary['runs']]}; estimate on the slowest machine {estimate:.1f} min "
          f"(goal {GOAL_MINUTES:g}) -> {path}")
    for name, value in list(summary["file_seconds"].items())[:10]:
        print(f"  {value:7.1f} s  {name}")
    if args.baseline_junit:
        base = results["baseline"]
        print(f"baseline {base['commit']} beside them: .ci/run median {base['wall_minutes']:.1f} min "
              f"{[run['wall_minutes'] for run in base['runs']]}; largest changes per file (medians):")
        for name, change in [*base["change_seconds"].items()][:5]:
            print(f"  {change:+7.1f} s  {name}")


if __name__ == "__main__":
    main()
