"""Precision variants side by side: fp32 vs INT8 (and any other ONNX) on the same images,
the same devices, in one benchmark run; the card's measured img/s and the top-1 of each.

Each model runs through the ``runner.evaluate`` command line --reps times, interleaved
(fp32, int8, fp32, int8, ...), in this one process (one Ray instance), and its figures are
read back from the run's ``perf.json``: ``card.measured_fps`` (first batch submitted -> last
result; Ray start-up and model loading excluded) and the accuracy.  Medians are reported,
with the ratio of each model to the first.

By default the decoded crops come from a ``--cache`` built by an untimed first run, so the
figures compare the models rather than JPEG decoding, which shares the same 2 cores;
``--no-cache`` decodes in every run (the streaming figure).

    python benchmarks/precision.py [--limit N] [--reps 3] [--no-cache]
        [--model fp32=runs/models/efficientnet_lite0.onnx --model int8=...int8.onnx]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import common

from runner.evaluate import main as evaluate_main

SAMPLE = common.ROOT.parent / "shared" / "data" / "imagenet-sample" / "val_227"
MODELS = ["fp32=runs/models/efficientnet_lite0.onnx",
          "int8=runs/models/efficientnet_lite0_int8.onnx"]
MAKE = """make the models first:
  python -m convert.lite2onnx --variant lite0 runs/models/efficientnet_lite0.onnx
  python -m convert.quantize runs/models/efficientnet_lite0.onnx \\
      runs/models/efficientnet_lite0_int8.onnx \\
      --calibrate ../shared/data/imagenet-sample/val_orig"""


def evaluate(model: str, out: Path, args: argparse.Namespace, cache: str | None) -> dict:
    """One run through the command line's entry point; its perf.json."""
    argv = ["--model", model, "--images", args.images, "--labels", args.labels, "--devices",
            args.devices, "--batch-size", str(args.batch_size), "--out", str(out),
            "--overwrite", "--no-progress"]
    argv += ["--limit", str(args.limit)] if args.limit else []
    argv += ["--cache", cache] if cache else []
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = evaluate_main(argv)
    if code != 0:
        sys.exit(f"precision: runner.evaluate {' '.join(argv)} exited {code}:\n"
                 f"{printed.getvalue()[-2000:]}")
    return json.loads((out / "perf.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="a model to run (repeatable; the first is the reference); "
                   "default fp32 and int8 Lite0 from runs/models")
    p.add_argument("--images", default=str(SAMPLE))
    p.add_argument("--labels", default=str(SAMPLE / "val_label.txt"))
    p.add_argument("--limit", type=int, help="first N images (default all)")
    p.add_argument("--devices", default="0-1")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-cache", action="store_true", help="decode in every run")
    p.add_argument("--json", default="benchmarks/results/precision.json")
    args = p.parse_args()
    os.chdir(common.ROOT)  # model paths and --json are relative to the checkout

    models = dict(spec.split("=", 1) for spec in (args.model or MODELS))
    missing = [path for path in models.values() if not Path(path).is_file()]
    if missing:
        sys.exit(f"precision: missing {', '.join(missing)}; {MAKE}")
    runs: dict[str, list[dict]] = {name: [] for name in models}
    with tempfile.TemporaryDirectory(prefix="cardrunner-precision.") as tmp:
        cache = None if args.no_cache else str(Path(tmp) / "cache")
        first = next(iter(models.values()))
        evaluate(first, Path(tmp) / "warmup", args, cache)  # untimed: builds the cache
        for rep in range(args.reps):
            for name, path in models.items():
                perf = evaluate(path, Path(tmp) / f"{name}_{rep}", args, cache)
                runs[name].append(perf)
                print(f"rep {rep} {name}: {perf['card']['measured_fps']:.1f} img/s, top1 "
                      f"{perf['accuracy']['top1']}%", flush=True)
    rows = []
    for name, perfs in runs.items():
        acc = perfs[0]["accuracy"]
        rows.append({
            "model": name, "precision": perfs[0]["environment"]["precision"],
            "images": acc["scored"], "top1": acc["top1"], "top5": acc["top5"],
            "measured_fps": statistics.median(r["card"]["measured_fps"] for r in perfs),
            "sum_compute_fps": statistics.median(r["card"]["sum_compute_fps"] for r in perfs),
            "all_measured_fps": [r["card"]["measured_fps"] for r in perfs],
        })
    ref = rows[0]
    for row in rows:
        row["speed_ratio"] = row["measured_fps"] / ref["measured_fps"]
        row["compute_ratio"] = row["sum_compute_fps"] / ref["sum_compute_fps"]
        row["top1_drop"] = round(ref["top1"] - row["top1"], 2)
    common.print_table(rows, ["model", "precision", "images", "top1", "top5", "top1_drop",
                              "measured_fps", "speed_ratio", "sum_compute_fps",
                              "compute_ratio"])
    for row in rows:
        print(f"{row['model']}: top1 {row['top1']}%  top5 {row['top5']}%  over "
              f"{row['images']} images; {row['measured_fps']:.2f} img/s "
              f"({row['speed_ratio']:.2f}x {ref['model']})")
    decode = "streaming decode" if args.no_cache else "crops from --cache"
    print(f"--devices {args.devices}, batch {args.batch_size}, {decode}, medians of "
          f"{args.reps} interleaved runs")
    common.write_json(args.json, {"benchmark": "precision", "devices": args.devices,
                                  "batch_size": args.batch_size, "images": args.images,
                                  "limit": args.limit, "cache": not args.no_cache,
                                  "reps": args.reps, "models": models, "rows": rows})


if __name__ == "__main__":
    main()
