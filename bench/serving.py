"""The registered ensemble pyfunc against the same four Keras models and stacker called directly.

Latency: one image per call. Throughput: a batch of 64 images per call. Both start from image files, as a client
would send them. The direct path decodes each file once per input size, calls each model's compiled
`predict_on_batch`, then the stacker: what a hand-written server would do. Medians of interleaved repeats; goal: pyfunc time at most 1.2x the direct path.
Usage: python -m bench.serving [--model-uri models:/brain-tumor-ensemble@champion] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bench.training import machine, now, write_results

RESULTS_NAME = "serving.json"


def direct_predict(models: dict, stacker, paths: list[str]) -> np.ndarray:
    from components.images import load_rgb

    batches: dict[int, np.ndarray] = {}
    probabilities = {}
    for name, model in models.items():
        size = model.input_shape[1]
        if size not in batches:
            batches[size] = np.stack([load_rgb(p, size, preprocess) for p in paths]).astype(np.float32)
        probabilities[name] = np.asarray(model.predict_on_batch(batches[size]))  # compiled; eager call is ~10x slower
    return stacker.predict_proba(probabilities)


def compare(pyfunc, models: dict, stacker, paths: list[str], repeats: int) -> dict:
    import pandas as pd

    import base64
    from pathlib import Path

    # What a client posts: each image's bytes, base64 (the served model takes no paths).
    frame = pd.DataFrame({"image": [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]})
    served = pyfunc.predict(frame).filter(like="prob_").to_numpy()  # warm up both, and check they agree
    direct = direct_predict(models, stacker, paths, pyfunc.unwrap_python_model().preprocess)
    np.testing.assert_allclose(served, direct, atol=1e-4)
    ours, raw = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        pyfunc.predict(frame)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        direct_predict(models, stacker, paths, pyfunc.unwrap_python_model().preprocess)
        raw.append(time.perf_counter() - start)
    return {"images": len(paths), "pyfunc_seconds": statistics.median(ours),
            "direct_seconds": statistics.median(raw),
            "pyfunc_images_per_s": len(paths) / statistics.median(ours),
            "median_ratio": statistics.median(a / b for a, b in zip(ours, raw)), "goal": 1.2}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="models:/brain-tumor-ensemble@champion")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    import mlflow

    from components import tracking
    from components.config import load_params
    from components.dataset import read_split

    params = load_params()
    tracking.configure(params.tracking)
    pyfunc = mlflow.pyfunc.load_model(args.model_uri)
    ensemble = pyfunc.unwrap_python_model()  # the very models and stacker the pyfunc serves
    paths = read_split(params.paths.splits, "test").path.astype(str).tolist()
    results = {"machine": machine(), "date": now(), "model_uri": args.model_uri,
               "latency": compare(pyfunc, ensemble.models, ensemble.stacker, paths[:1], args.repeats),
               "throughput": compare(pyfunc, ensemble.models, ensemble.stacker, paths[:64],
                                     max(3, args.repeats // 3))}
    for kind in ("latency", "throughput"):
        row = results[kind]
        print(f"pyfunc {kind} ({row['images']} images): {row['pyfunc_seconds'] * 1000:.0f} ms vs direct "
              f"{row['direct_seconds'] * 1000:.0f} ms -> x{row['median_ratio']:.2f} (goal <= 1.2)", flush=True)
    write_results(RESULTS_NAME, results)
    return results


if __name__ == "__main__":
    main()
