"""Load on the team's servers, each against its baseline measured in the same run.

1. Serving: `mlflow models serve -m MODEL_URI --env-manager local` (started on a free 127.0.0.1 port and stopped
   by this script) under 1, 4 and 16 concurrent clients (threads, one `requests.Session` each). Every request is
   one base64 image from a small fixed set. Per level: p50 and p99 latency, throughput and errors (goal: 0), and
   the server's RSS (its process and children, psutil) before and after the load. Baseline: the same images, in
   the same threads, scored in this process by the served version's own Keras models and stacker called directly
   (bench/serving.py's direct_predict): what the HTTP server costs over the models themselves.
2. Tracking: the MLflow server of `braintumor services up` (PostgreSQL, basic auth; on random ports under a temp
   folder, with throwaway credentials this script sets) taking the metric logging of 4 concurrent "trainings":
   processes that each log EPOCHS x METRICS with mlflow.log_metrics to their own run. Wall time, logged metrics
   per second, errors, and a read-back of every logged point. Baseline: the same logging to a local sqlite store.

Each measurement is repeated (interleaved with its baseline) and the medians are kept in bench/results/load.json.
Every level is bounded by a number of requests (--requests) and seconds (--seconds); every process by a timeout.
`--tiny` registers a tiny ensemble (two small Keras models and a logistic-regression stacker, as
tests/components/test_serving.py does) in a temporary sqlite store and serves that: it runs without trained
models and measures the serving stack rather than the CNNs.
Usage: python -m bench.load [--tiny | --model-uri models:/brain-tumor-ensemble@champion] [--clients 1 4 16]
       [--requests 200] [--seconds 60] [--repeats 3] [--epochs 100] [--metrics 10] [--only serving|tracking]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.training import RESULTS_DIR, machine, now, write_results

RESULTS_NAME = "load.json"
READY, RESULT = "bench-load-worker ready", "bench-load-worker result: "  # a logging worker's lines on stdout
ROOT = Path(__file__).resolve().parents[1]
ENSEMBLE = "brain-tumor-ensemble"
TINY_SIZES = {"tiny_a": 32, "tiny_b": 48}
CREDENTIAL_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                  "MLFLOW_TRACKING_TOKEN", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                  "PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
                  "MLFLOW_RUN_ID")
logger = logging.getLogger("bench.load")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def environ(**changes: str | None):
    """os.environ with `changes` (None removes), restored afterwards."""
    saved = {key: os.environ.get(key) for key in changes}
    try:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def child_env(**changes: str) -> dict[str, str]:
    """A subprocess's environment: ours without MLflow targets or any service secret, plus `changes`."""
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env | changes


# ------------------------------------------------------------------------------------------------------ images

def scan_image(label: int, rng: np.random.Generator, size: int):
    """A toy grey scan as a JPEG's PIL image: a bright blob whose position depends on the class, plus noise."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    cy, cx = [(0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7)][label % 4]
    blob = np.exp(-(((y / size - cy) ** 2 + (x / size - cx) ** 2) / 0.02))
    return Image.fromarray(np.clip(blob * 200 + rng.normal(30, 15, (size, size)), 0, 255).astype(np.uint8), "L")


def generated_images(count: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    blobs = []
    for n in range(count):
        buffer = io.BytesIO()
        scan_image(n, rng, size).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def split_images(count: int) -> list[bytes]:
    """The first `count` images of the test split (what bench/serving.py scores)."""
    from components.config import load_params
    from components.dataset import read_split

    params = load_params(ROOT / "params.yaml")
    paths = read_split(params.paths.splits, "test").path.astype(str).tolist()[:count]
    return [Path(p).read_bytes() for p in paths]


# --------------------------------------------------------------------------------------------- the tiny ensemble

def register_tiny_ensemble(work: Path, image: bytes) -> tuple[str, str]:
    """(tracking URI, model URI): two tiny Keras models and a logistic-regression stacker logged by
    components.register.log_ensemble in a sqlite store under `work`, registered as brain-tumor-ensemble and given
    @champion. As tests/components/test_serving.py builds its ensemble."""
    import keras
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from sklearn.linear_model import LogisticRegression

    from components.config import load_params
    from components.register import log_ensemble
    from components.stack import Stacker, stack_features

    classes = load_params(ROOT / "params.yaml").data.classes
    (work / "splits").mkdir(parents=True)
    (work / "example.jpg").write_bytes(image)  # log_ensemble's input example is the first test image
    pd.DataFrame({"path": [str(work / "example.jpg")]}).to_csv(work / "splits" / "test.csv", index=False)
    for name, size in TINY_SIZES.items():
        (work / "models" / name).mkdir(parents=True)
        keras.Sequential([keras.Input((size, size, 3)), keras.layers.Rescaling(1 / 255),
                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(len(classes), "softmax")]
                         ).save(work / "models" / name / "model.keras")
    params = load_params(ROOT / "params.yaml", [
        f"paths.models={work / 'models'}", f"paths.splits={work / 'splits'}", f"stack.models={list(TINY_SIZES)}"])
    rng = np.random.default_rng(0)
    probabilities = {name: rng.dirichlet(np.ones(len(classes)), 40) for name in TINY_SIZES}
    automl = LogisticRegression(max_iter=200).fit(stack_features(probabilities, params.stack),
                                                  np.arange(40) % len(classes))
    Stacker(automl, list(TINY_SIZES), classes, params.stack).save(work / "models" / "stacker")

    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:  # artifacts under `work` too (MLflow's default is ./mlruns in the cwd)
        experiment = mlflow.create_experiment("load-bench", artifact_location=(work / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_ensemble(params)
        version = mlflow.register_model(info.model_uri, ENSEMBLE)
        MlflowClient(tracking_uri).set_registered_model_alias(ENSEMBLE, "champion", version.version)
    finally:
        mlflow.set_tracking_uri(previous)
    return tracking_uri, f"models:/{ENSEMBLE}@champion"


# ------------------------------------------------------------------------------------------------ load generator

def run_level(make_caller, clients: int, requests: int, seconds: float) -> dict:
    """`requests` calls (at most `seconds`) spread over `clients` threads; call i is `caller(i)` in a caller that
    `make_caller()` made for its thread. Latency of each call, throughput over the level's wall time."""
    lock = threading.Lock()
    issued = iter(range(requests))
    latencies: list[float] = []
    errors: list[str] = []
    go = threading.Event()
    state = {"deadline": float("inf"), "timed_out": False}

    def client() -> None:
        caller = make_caller()
        go.wait()
        while True:
            with lock:
                if time.perf_counter() > state["deadline"]:
                    state["timed_out"] = True
                    return
                index = next(issued, None)
            if index is None:
                return
            start = time.perf_counter()
            try:
                caller(index)
            except Exception as exc:  # every failure is counted and the first one kept
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:500])
                continue
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    state["deadline"] = start + seconds
    go.set()
    for thread in threads:
        thread.join(seconds + 120)
    wall = time.perf_counter() - start
    hung = sum(thread.is_alive() for thread in threads)
    p50, p99 = (np.percentile(latencies, [50, 99]) * 1000).tolist() if latencies else (float("nan"),) * 2
    return {"clients": clients, "ok": len(latencies), "errors": len(errors) + hung, "first_error": next(iter(errors),
            None), "p50_ms": p50, "p99_ms": p99, "throughput_per_s": len(latencies) / wall, "seconds": wall,
            "stopped_by_time_bound": state["timed_out"]}


def rss(pid: int) -> dict:
    """Resident memory of the process `pid` and all its children (MB), and of each of them."""
    import psutil

    root = psutil.Process(pid)
    processes = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            processes[process.pid] = (process.name(), process.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            continue
    return {"total_mb": sum(mb for _, mb in processes.values()),
            "processes": [{"pid": pid, "name": name, "mb": mb} for pid, (name, mb) in processes.items()]}


# ------------------------------------------------------------------------------------------------------ serving

def start_model_server(model_uri: str, tracking_uri: str | None, port: int, log: Path, timeout: float,
                       workers: int) -> subprocess.Popen:
    import requests

    env = child_env()
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
            if key in os.environ:  # credentials for a tracking server named in our environment
                env[key] = os.environ[key]
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
               "-p", str(port), "-w", str(workers)]
    handle = log.open("w")
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=env,
                              cwd=ROOT, start_new_session=True)
    handle.close()
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise SystemExit(f"mlflow models serve exited ({server.returncode}); log {log}:\n{tail(log)}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            stop(server)
            raise SystemExit(f"mlflow models serve did not answer within {timeout:g} s; log {log}:\n{tail(log)}")
        time.sleep(0.5)


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group we started (start_new_session), then SIGKILL after `timeout`."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
    with contextlib.suppress(ProcessLookupError):  # workers left in the group
        os.killpg(process.pid, signal.SIGKILL)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def bench_serving(args, work: Path) -> dict:
    import mlflow
    import requests

    from bench.serving import direct_predict

    images = generated_images(args.images, args.image_size) if args.tiny else split_images(args.images)
    if args.tiny:
        tracking_uri, model_uri = register_tiny_ensemble(work / "tiny", images[0])
    else:
        from components import tracking
        from components.config import load_params

        tracking_uri, model_uri = tracking.configure(load_params(ROOT / "params.yaml").tracking), args.model_uri
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:  # the very models and stacker the server loads, for the in-process baseline
        ensemble = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    finally:
        mlflow.set_tracking_uri(previous)
    encoded = [base64.b64encode(blob).decode() for blob in images]
    bodies = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[text]]}}) for text in encoded]
    port = free_port()
    url = f"http://127.0.0.1:{port}/invocations"

    def server_caller():
        session = requests.Session()

        def call(index: int) -> None:
            answer = session.post(url, data=bodies[index % len(bodies)], timeout=args.seconds + 60,
                                  headers={"Content-Type": "application/json"})
            if answer.status_code != 200 or len(answer.json()["predictions"]) != 1:
                raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:300]}")
        return call

    def direct_caller():
        def call(index: int) -> None:  # decoding the base64 text is part of the work, as in the server
            out = direct_predict(ensemble.models, ensemble.stacker, [base64.b64decode(encoded[index % len(encoded)])],
                                 ensemble.preprocess)
            if out.shape[0] != 1:
                raise RuntimeError(f"direct path returned {out.shape}")
        return call

    started = time.perf_counter()
    server = start_model_server(model_uri, tracking_uri, port, work / "model-server.log", args.startup_timeout,
                                args.workers)
    startup_seconds = time.perf_counter() - started
    try:
        memory = {"before": rss(server.pid)}
        with requests.Session() as session:  # warm up both paths, and check that they agree
            for index, text in enumerate(encoded):
                answer = session.post(url, data=bodies[index], headers={"Content-Type": "application/json"},
                                      timeout=args.seconds + 60)
                if answer.status_code != 200:
                    raise SystemExit(f"the server refused image {index}: HTTP {answer.status_code} {answer.text}")
                served = [[row[k] for k in sorted(row) if k.startswith("prob_")]
                          for row in answer.json()["predictions"]]
                direct = direct_predict(ensemble.models, ensemble.stacker, [base64.b64decode(text)], ensemble.preprocess)
                np.testing.assert_allclose(served, direct, atol=1e-4)
        memory["after_warmup"] = rss(server.pid)
        levels = []
        for clients in args.clients:
            runs = {"server": [], "direct": []}
            for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
                runs["server"].append(run_level(server_caller, clients, args.requests, args.seconds))
                runs["direct"].append(run_level(direct_caller, clients, args.requests, args.seconds))
            level = {"clients": clients, **{kind: summarise(rows) for kind, rows in runs.items()}, "runs": runs}
            level["server_over_direct_p50"] = level["server"]["p50_ms"] / level["direct"]["p50_ms"]
            level["server_over_direct_throughput"] = (level["server"]["throughput_per_s"]
                                                      / level["direct"]["throughput_per_s"])
            levels.append(level)
            print(serving_row(level), flush=True)
        memory["after"] = rss(server.pid)
    except BaseException:
        print(f"model server log ({work / 'model-server.log'}):\n{tail(work / 'model-server.log')}", file=sys.stderr)
        raise
    finally:
        stop(server)
    return {"model_uri": "tiny ensemble (--tiny)" if args.tiny else model_uri, "workers": args.workers,
            "images": {"count": len(images), "median_bytes": int(statistics.median(map(len, images))),
                       "source": f"generated {args.image_size} px JPEGs" if args.tiny else "test split"},
            "requests_per_level": args.requests, "seconds_bound_per_level": args.seconds, "repeats": args.repeats,
            "server_startup_seconds": startup_seconds, "rss_mb": {k: v["total_mb"] for k, v in memory.items()},
            "rss_detail": memory, "levels": levels}


def summarise(rows: list[dict]) -> dict:
    """Medians over repeats; errors summed (the goal is 0 in every repeat)."""
    return {"p50_ms": statistics.median(r["p50_ms"] for r in rows),
            "p99_ms": statistics.median(r["p99_ms"] for r in rows),
            "throughput_per_s": statistics.median(r["throughput_per_s"] for r in rows),
            "ok": sum(r["ok"] for r in rows), "errors": sum(r["errors"] for r in rows),
            "first_error": next((r["first_error"] for r in rows if r["first_error"]), None),
            "stopped_by_time_bound": any(r["stopped_by_time_bound"] for r in rows)}


SERVING_HEADER = ("clients | server p50 / p99 ms | server req/s | errors | direct p50 / p99 ms | direct req/s | "
                  "errors | server/direct p50, req/s")


def serving_row(level: dict) -> str:
    s, d = level["server"], level["direct"]
    return (f"{level['clients']:>7} | {s['p50_ms']:8.1f} / {s['p99_ms']:7.1f} | {s['throughput_per_s']:12.1f} | "
            f"{s['errors']:6} | {d['p50_ms']:8.1f} / {d['p99_ms']:7.1f} | {d['throughput_per_s']:12.1f} | "
            f"{d['errors']:6} | x{level['server_over_direct_p50']:.2f}, x{level['server_over_direct_throughput']:.2f}")


# ----------------------------------------------------------------------------------------------------- tracking

def log_worker(experiment_id: str, epochs: int, metrics: int, seed: int) -> None:
    """One "training" (run as `python -m bench.load --log-worker ...`): a run in the store MLFLOW_TRACKING_URI
    names; says `ready`, waits for `go` on stdin, logs `epochs` x `metrics` with mlflow.log_metrics (one call per
    epoch), then prints a JSON line with its time and errors."""
    import mlflow

    rng = np.random.default_rng(seed)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"load-{seed}")
    print(READY, flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    errors, first_error, logged = 0, None, 0
    start = time.perf_counter()
    for epoch in range(epochs):
        values = {f"metric_{j}": float(v) for j, v in enumerate(rng.random(metrics))}
        try:
            mlflow.log_metrics(values, step=epoch)
            logged += len(values)
        except Exception as exc:  # counted; the training would go on
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"[:500]
    seconds = time.perf_counter() - start
    mlflow.end_run()
    print(RESULT + json.dumps({"run_id": run.info.run_id, "seconds": seconds, "logged": logged, "errors": errors,
                      "first_error": first_error}), flush=True)


def run_trainings(env: dict[str, str], experiment_id: str, trainings: int, epochs: int, metrics: int,
                  timeout: float, logs: Path) -> dict:
    """`trainings` log_worker processes released at once; wall time from the release to the last one's end.
    Their stderr goes to files in `logs`."""
    logs.mkdir(parents=True, exist_ok=True)
    workers = []
    for seed in range(trainings):
        with (logs / f"worker-{seed}.log").open("a") as err:
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "bench.load", "--log-worker", experiment_id, str(epochs), str(metrics),
                 str(seed)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                cwd=ROOT, start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        for worker in workers:  # start-up (imports, run creation) is not part of the measurement
            read_line(worker, READY, deadline)
        start = time.perf_counter()
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results = []
        for worker in workers:
            line = read_line(worker, RESULT, deadline)
            results.append((time.perf_counter(), json.loads(line.removeprefix(RESULT))))
        wall = max(t for t, _ in results) - start
        for worker in workers:
            worker.wait(max(1.0, deadline - time.monotonic()))
    except SystemExit as exc:
        raise SystemExit(f"{exc}\n" + "\n".join(f"--- {log.name}:\n{tail(log)}"
                                                 for log in sorted(logs.glob("worker-*.log")))) from None
    finally:
        for worker in workers:
            if worker.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(30)
    rows = [row for _, row in results]
    logged = sum(r["logged"] for r in rows)
    return {"wall_seconds": wall, "logged_metrics": logged, "metrics_per_s": logged / wall,
            "errors": sum(r["errors"] for r in rows), "first_error": next((r["first_error"] for r in rows
                                                                          if r["first_error"]), None),
            "worker_seconds": [r["seconds"] for r in rows], "run_ids": [r["run_id"] for r in rows]}


def read_line(process: subprocess.Popen, prefix: str, deadline: float) -> str:
    """The next stdout line of `process` that starts with `prefix` (MLflow prints its own lines there too), or
    SystemExit if the process ends first or `deadline` (time.monotonic) passes."""
    while True:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if not box:
            raise SystemExit("a logging worker timed out (raise --worker-timeout)")
        if not box[0]:
            raise SystemExit(f"a logging worker exited ({process.wait()})")
        if box[0].startswith(prefix):
            return box[0].strip()


def missing_points(tracking_uri: str, run_ids: list[str], epochs: int, metrics: int) -> int:
    """Logged points the store does not give back (every metric of every run should have `epochs` steps)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    return sum(epochs - len({m.step for m in client.get_metric_history(run_id, f"metric_{j}")})
               for run_id in run_ids for j in range(metrics))


def bench_tracking(args, work: Path) -> dict:
    from mlflow import MlflowClient

    from flows import services as svc
    from components.config import load_params

    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    pg, ml, pf = sorted(ports)
    params = load_params(ROOT / "params.yaml", [
        f"services.dir={work / 'services'}", f"services.postgres.port={pg}", f"services.mlflow.port={ml}",
        f"services.prefect.port={pf}", f"services.mlflow.artifacts={work / 'server-artifacts'}",
        f"services.startup_timeout={args.startup_timeout}", "services.stop_timeout=30"])
    password = "bench-" + secrets.token_urlsafe(18)
    team = {"MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
            "PREFECT_SERVER_API_AUTH_STRING": "bench:" + secrets.token_urlsafe(18)}
    url = svc.mlflow_url(params.services)
    sqlite_uri = f"sqlite:///{work / 'baseline.db'}"
    targets = {"server": child_env(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="admin",
                                   MLFLOW_TRACKING_PASSWORD=password),
               "sqlite": child_env(MLFLOW_TRACKING_URI=sqlite_uri)}
    started = time.perf_counter()
    try:
        with environ(**team, MLFLOW_AUTH_ADMIN_USERNAME=None):
            svc.up(params)
        up_seconds = time.perf_counter() - started
        with environ(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password):
            experiments = {"server": MlflowClient(url).create_experiment("load-bench"),
                           "sqlite": MlflowClient(sqlite_uri).create_experiment(
                               "load-bench", artifact_location=(work / "sqlite-artifacts").as_uri())}
            for target in ("server", "sqlite"):  # warm up: the server's first requests, the store's first writes
                run_trainings(targets[target], experiments[target], args.trainings, min(5, args.epochs),
                              args.metrics, args.worker_timeout, work / "worker-logs" / target)
            runs: dict[str, list[dict]] = {"server": [], "sqlite": []}
            for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
                for target in ("server", "sqlite"):
                    row = run_trainings(targets[target], experiments[target], args.trainings, args.epochs,
                                        args.metrics, args.worker_timeout, work / "worker-logs" / target)
                    row["missing_points"] = missing_points(targets[target]["MLFLOW_TRACKING_URI"], row["run_ids"],
                                                           args.epochs, args.metrics)
                    runs[target].append(row)
    finally:
        with environ(**team):
            svc.down(params)
    result = {"server": "MLflow server of `braintumor services up` (PostgreSQL, basic auth, "
                        f"{params.services.mlflow.workers} worker)", "baseline": "local sqlite store",
              "trainings": args.trainings, "epochs": args.epochs, "metrics_per_epoch": args.metrics,
              "metrics_per_training": args.epochs * args.metrics, "repeats": args.repeats,
              "services_up_seconds": up_seconds}
    for target, rows in runs.items():
        result[target] = {"wall_seconds": statistics.median(r["wall_seconds"] for r in rows),
                          "metrics_per_s": statistics.median(r["metrics_per_s"] for r in rows),
                          "log_calls_per_s": statistics.median(r["metrics_per_s"] for r in rows) / args.metrics,
                          "errors": sum(r["errors"] for r in rows),
                          "missing_points": sum(r["missing_points"] for r in rows),
                          "first_error": next((r["first_error"] for r in rows if r["first_error"]), None),
                          "runs": [{k: v for k, v in r.items() if k != "run_ids"} for r in rows]}
    result["server_over_sqlite_wall"] = result["server"]["wall_seconds"] / result["sqlite"]["wall_seconds"]
    return result


def tracking_rows(result: dict) -> list[str]:
    rows = [f"{'store':>7} | wall s | metrics/s | log_metrics calls/s | errors | missing points"]
    for target in ("server", "sqlite"):
        row = result[target]
        rows.append(f"{target:>7} | {row['wall_seconds']:6.2f} | {row['metrics_per_s']:9.0f} | "
                    f"{row['log_calls_per_s']:19.1f} | {row['errors']:6} | {row['missing_points']:14}")
    return rows


# ---------------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="models:/brain-tumor-ensemble@champion")
    parser.add_argument("--tiny", action="store_true", help="serve a tiny ensemble registered in a temp sqlite store")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=200, help="requests per level and repeat")
    parser.add_argument("--seconds", type=float, default=60, help="time bound per level and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=8, help="size of the fixed image set")
    parser.add_argument("--image-size", type=int, default=256, help="side of the generated images (--tiny)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the model server")
    parser.add_argument("--trainings", type=int, default=4, help="concurrent logging processes")
    parser.add_argument("--epochs", type=int, default=100, help="log_metrics calls per training")
    parser.add_argument("--metrics", type=int, default=10, help="metrics per log_metrics call")
    parser.add_argument("--worker-timeout", type=float, default=300, help="seconds for one round of trainings")
    parser.add_argument("--startup-timeout", type=float, default=300, help="seconds a server may take to answer")
    parser.add_argument("--only", choices=["serving", "tracking"], help="run one part; keep the other's results")
    parser.add_argument("--log-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.log_worker:
        experiment_id, epochs, metrics, seed = args.log_worker
        log_worker(experiment_id, int(epochs), int(metrics), int(seed))
        return {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    previous = json.loads((RESULTS_DIR / RESULTS_NAME).read_text()) if (RESULTS_DIR / RESULTS_NAME).exists() else {}
    results = {"machine": machine(), "date": now()}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as folder:
        work = Path(folder)
        if args.only != "tracking":
            print(f"serving: {args.requests} requests per level (at most {args.seconds:g} s), {args.repeats} "
                  "repeats, medians\n" + SERVING_HEADER, flush=True)
            results["serving"] = bench_serving(args, work)
            memory = results["serving"]["rss_mb"]
            print(f"model server RSS (with children): {memory['before']:.0f} MB before, {memory['after_warmup']:.0f}"
                  f" MB after warm-up, {memory['after']:.0f} MB after the load", flush=True)
        else:
            results["serving"] = previous.get("serving")
        if args.only != "serving":
            print(f"tracking: {args.trainings} concurrent trainings x {args.epochs} epochs x {args.metrics} metrics, "
                  f"{args.repeats} repeats, medians", flush=True)
            results["tracking"] = bench_tracking(args, work)
            print("\n".join(tracking_rows(results["tracking"])), flush=True)
        else:
            results["tracking"] = previous.get("tracking")
    path = write_results(RESULTS_NAME, results)
    failures = []
    if results.get("serving") and any(level[kind]["errors"] for level in results["serving"]["levels"]
                                      for kind in ("server", "direct")):
        failures.append("serving requests failed (goal: 0 errors)")
    if results.get("tracking") and (results["tracking"]["server"]["errors"]
                                    or results["tracking"]["server"]["missing_points"]):
        failures.append("metric logging to the tracking server failed or lost points")
    print(f"wrote {path}")
    if failures:
        raise SystemExit("; ".join(failures))
    return results


if __name__ == "__main__":
    main()
