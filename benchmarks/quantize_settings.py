"""INT8 calibration settings side by side: top-1, agreement with fp32 and speed of each.

Every setting ``convert.quantize`` offers (calibration method, weight granularity, weight
bits, calibration images) is made with its ``quantize`` function from the same float model,
then scored on the same decoded images (``load_calibration`` decodes exactly as the runner
does) and timed against the float model in the same process: the bare ONNX Runtime session,
1 thread, one fixed batch, fp32 and INT8 alternated, the median of --reps ratios.  The
calibration images are val_orig's (not among the scored val_227 images) except in the last
row, which calibrates on the first 256 scored images (a leak) and also reports the images
it did not see.

    python benchmarks/quantize_settings.py [--model runs/models/efficientnet_lite0.onnx]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import onnxruntime as ort

from convert.quantize import QuantSettings, load_calibration, quantize, session
from runner.metrics import image_key, read_labels, topk_indices
from runner.preprocess import Recipe, get_recipe, to_tensor

SAMPLE = common.ROOT.parent / "shared" / "data" / "imagenet-sample"
SETTINGS = [  # (row, settings, calibration folder name, calibration count)
    ("MinMax, per-channel, 7-bit weights (default)", QuantSettings(), "val_orig", 512),
    ("MinMax, per-channel, 8-bit", QuantSettings(reduce_range=False), "val_orig", 512),
    ("MinMax, per-tensor, 8-bit", QuantSettings(per_channel=False, reduce_range=False),
     "val_orig", 512),
    ("MinMax, per-tensor, 7-bit", QuantSettings(per_channel=False), "val_orig", 512),
    ("Percentile 99.999, per-channel, 7-bit", QuantSettings(method="percentile"),
     "val_orig", 512),
    ("Entropy, per-channel, 7-bit", QuantSettings(method="entropy"), "val_orig", 512),
    ("MinMax, per-channel, 7-bit, first 256 val_227 (a leak)", QuantSettings(), "val_227", 256),
]


def predict(model: str | Path, crops: np.ndarray, recipe: Recipe, threads: int,
            bs: int) -> np.ndarray:
    """Each crop's top-1 class, ranked as the runner ranks (ties to the lower class index)."""
    s = session(model, threads)
    name = s.get_inputs()[0].name
    return np.concatenate([topk_indices(s.run(None, {name: to_tensor(crops[a:a + bs], recipe)})[0],
                                        1)[:, 0] for a in range(0, len(crops), bs)])


def rate(s: ort.InferenceSession, x: np.ndarray, reps: int = 6) -> float:
    """img/s of one session on one batch (after an untimed call)."""
    name = s.get_inputs()[0].name
    s.run(None, {name: x})
    t0 = time.perf_counter()
    for _ in range(reps):
        s.run(None, {name: x})
    return reps * len(x) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/models/efficientnet_lite0.onnx")
    p.add_argument("--images", default=str(SAMPLE / "val_227"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3, help="speed ratios per setting (median)")
    p.add_argument("--json", default="benchmarks/results/quantize_settings.json")
    args = p.parse_args()
    os.chdir(common.ROOT)
    if not Path(args.model).is_file():
        sys.exit(f"quantize_settings: missing {args.model}; make it with\n"
                 f"  python -m convert.lite2onnx --variant lite0 {args.model}")
    recipe = get_recipe("tf-lite")
    images = Path(args.images)
    scored = load_calibration(images, recipe, 1_000_000)  # every image, decoded as the runner does
    truth = read_labels(images / "val_label.txt").classes
    labels = np.array([truth[image_key(n)] for n in scored.names])
    ref = predict(args.model, scored.crops, recipe, 2, args.batch_size)
    x = to_tensor(scored.crops[:args.batch_size], recipe)
    float_session = session(args.model, 1)
    rows = [{"setting": "fp32 (the float model)", "top1": round(100 * np.mean(ref == labels), 2),
             "agreement": 100.0, "speed": 1.0}]
    print(f"{len(scored.names)} images of {images}; fp32 top1 {rows[0]['top1']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cardrunner-qsettings.") as tmp:
        for title, settings, folder, count in SETTINGS:
            cal = load_calibration(SAMPLE / folder, recipe, count)
            out = Path(tmp) / "int8.onnx"
            quantize(args.model, out, cal, recipe, settings)
            pred = predict(out, scored.crops, recipe, 2, args.batch_size)
            int8_session = session(out, 1)
            ratios = [rate(int8_session, x) / rate(float_session, x) for _ in range(args.reps)]
            row = {"setting": title, "calibration": f"{len(cal.names)} {folder}",
                   "top1": round(100 * np.mean(pred == labels), 2),
                   "agreement": round(100 * np.mean(pred == ref), 2),
                   "speed": round(statistics.median(ratios), 2), "speed_all": ratios}
            unseen = ~np.isin(scored.names, cal.names)
            if unseen.sum() < len(unseen):
                int8_top1, fp32_top1 = (100 * np.mean(got[unseen] == labels[unseen])
                                        for got in (pred, ref))
                row["unseen"] = f"{unseen.sum()}: {int8_top1:.2f} vs fp32 {fp32_top1:.2f}"
            rows.append(row)
            print(f"{title}: top1 {row['top1']}, agreement {row['agreement']}, "
                  f"speed {row['speed']}", flush=True)
    print(f"\nINT8 vs fp32 on {len(scored.names)} images; speed: bare ONNX Runtime session, "
          f"1 thread, bs{args.batch_size}, median of {args.reps} alternated ratios")
    shown = [{**r, "top1": f"{r['top1']:.2f}", "agreement": f"{r['agreement']:.2f}"} for r in rows]
    common.print_table(shown, ["setting", "calibration", "top1", "agreement", "speed", "unseen"])
    common.write_json(args.json, {"model": args.model, "images": str(images),
                                  "batch_size": args.batch_size, "rows": rows})


if __name__ == "__main__":
    main()
