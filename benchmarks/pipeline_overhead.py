"""Runner (Ray, --devices 0-1) vs a plain single-process loop on the same images and model.

The plain loop decodes, preprocesses and infers in turn with one ONNX Runtime session using
every core, at the same batch size.  Both run --reps times, interleaved, after the same
untimed warm-up; medians are reported.  The runner's figure is its measured card rate
(first batch submitted -> last result), the number ``perf.json`` reports; Ray start-up
and model loading are excluded from both.

    python benchmarks/pipeline_overhead.py [--images 256] [--batch-size 16] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import common  # noqa: F401 - puts the checkout on sys.path
import numpy as np
import onnxruntime as ort

from runner import demo
from runner.config import RunConfig
from runner.devices import cpu_slots
from runner.evaluation import run_evaluation
from runner.preprocess import get_recipe, load_crop, to_tensor
from runner.ray_start import start_ray
from runner.report import perf_summary


def plain_loop(model: str, paths: list[str], batch_size: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = cpu_slots()
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    recipe = get_recipe("huawei")
    warm = np.random.default_rng(0).standard_normal((batch_size, 3, 300, 300)).astype(np.float32)
    for _ in range(2):  # the same untimed warm-up the runner's device actors get
        sess.run(None, {"image": warm})
    t0 = time.perf_counter()
    for a in range(0, len(paths), batch_size):
        crops = np.stack([load_crop(p, recipe) for p in paths[a : a + batch_size]])
        sess.run(None, {"image": to_tensor(crops, recipe)})
    return len(paths) / (time.perf_counter() - t0)


def runner_rate(model: str, images: str, labels: str, n: int, batch_size: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(model=model, images=images, labels=labels, devices="0-1",
                        batch_size=batch_size, limit=n, out=out, progress=False)
        return perf_summary(run_evaluation(cfg))["card"]["measured_fps"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default="benchmarks/results/pipeline_overhead.json")
    args = p.parse_args()

    images, labels, model = demo.prepare(args.images)
    paths = sorted(str(p) for p in images.glob("*.JPEG"))[: args.images]
    start_ray(None, {})
    plain, ray_runs = [], []
    for rep in range(args.reps):
        plain.append(plain_loop(str(model), paths, args.batch_size))
        ray_runs.append(runner_rate(str(model), str(images), str(labels), args.images,
                                    args.batch_size))
        print(f"rep {rep}: plain {plain[-1]:.2f} img/s, runner {ray_runs[-1]:.2f} img/s")
    rows = [
        {"path": "plain loop (1 process, all cores)", "img_per_s": statistics.median(plain)},
        {"path": "runner --devices 0-1", "img_per_s": statistics.median(ray_runs)},
    ]
    ratio = rows[1]["img_per_s"] / rows[0]["img_per_s"]
    common.print_table(rows, ["path", "img_per_s"])
    print(f"runner / plain = {ratio:.3f}  ({args.images} images, batch {args.batch_size}, "
          f"EN-B3 random init, {cpu_slots()} cores, medians of {args.reps})")
    common.write_json(args.json, {"benchmark": "pipeline_overhead", "images": args.images,
                                  "batch_size": args.batch_size, "cores": cpu_slots(),
                                  "plain": plain, "runner": ray_runs, "rows": rows,
                                  "ratio": ratio})


if __name__ == "__main__":
    main()
