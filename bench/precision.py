"""Is bfloat16 mixed precision faster than float32 for training on this machine's CPU?

Mixed precision switches on only in a process that sees a GPU (components.devices.configure_tensorflow), because on
a CPU it pays only where the cores have bf16 units that TensorFlow's kernels use. This measures it: per model at the
profile's image size, training images/s of `model.fit` on in-memory arrays under the Keras policy
`mixed_bfloat16` against `float32` (the baseline), the two interleaved so that machine noise hits both alike;
medians over repeats. Results go to bench/results/precision.json and are printed.

Usage: python -m bench.precision [--models custom_cnn ...] [--images 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.training import machine, now, write_results
from components.devices import cpu_flags

POLICIES = ("float32", "mixed_bfloat16")  # the baseline first


def bench_model(params, frame, name: str, repeats: int) -> dict:
    import keras
    import numpy as np

    from components.dataset import load_images
    from components.models import build_model

    model_params = params.model(name)
    images = load_images(frame, model_params.image_size, params.data.preprocess)
    labels = frame.label.map({c: i for i, c in enumerate(params.data.classes)}).to_numpy(np.int32)
    models = {}
    for policy in POLICIES:
        keras.mixed_precision.set_global_policy(policy)
        model = build_model(name, model_params, params.train, len(params.data.classes))
        model.compile("adam", "sparse_categorical_crossentropy", jit_compile=False)
        model.fit(images, labels, batch_size=model_params.batch_size, epochs=1, verbose=0)  # trace and warm up
        models[policy] = model
    keras.mixed_precision.set_global_policy("float32")
    rates = {policy: [] for policy in POLICIES}
    for _ in range(repeats):
        for policy, model in models.items():
            start = time.perf_counter()
            model.fit(images, labels, batch_size=model_params.batch_size, epochs=1, verbose=0)
            rates[policy].append(len(frame) / (time.perf_counter() - start))
    keras.backend.clear_session()
    baseline, mixed = (statistics.median(rates[p]) for p in POLICIES)
    return {"model": name, "image_size": model_params.image_size, "images_per_s": rates,
            "median_float32": baseline, "median_mixed_bfloat16": mixed, "speedup": mixed / baseline}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["custom_cnn", "mobilenetv2", "densenet169", "resnet50"])
    parser.add_argument("--images", type=int, default=256, help="training images per timed epoch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from components.config import load_params
    from components.dataset import read_split

    params = load_params()
    frame = read_split(params.paths.splits, "train")
    frame = frame.sample(min(args.images, len(frame)), random_state=params.seed)
    bf16_flags = sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx"))
    results = {"machine": machine(), "date": now(), "cpu_bf16_flags": bf16_flags, "images": len(frame),
               "repeats": args.repeats, "models": []}
    print(f"CPU bf16 flags: {' '.join(results['cpu_bf16_flags']) or 'none'}")
    for name in args.models:
        row = bench_model(params, frame, name, args.repeats)
        results["models"].append(row)
        print(f"{name} {row['image_size']}px: float32 {row['median_float32']:.1f} img/s, mixed_bfloat16 "
              f"{row['median_mixed_bfloat16']:.1f} img/s -> x{row['speedup']:.2f}", flush=True)
        write_results("precision.json", results)
    print(f"wrote {write_results('precision.json', results)}")
    return results


if __name__ == "__main__":
    main()
