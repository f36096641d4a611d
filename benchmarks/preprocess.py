# ruff: noqa: E402 - the thread settings must come before numpy and OpenCV are imported
"""Single-core preprocessing throughput: guide ``.bin`` path vs streaming vs cache hit.

    python benchmarks/preprocess.py [--images DIR] [--decodes 100] [--reps 5]

(a) the guide's path, transcribed: PIL, float32 maths in numpy, one ``.bin`` written per image;
(b) our streaming path: ``load_crop`` to a uint8 crop (what preprocessing actors do), then
    the device actor's ``to_tensor`` timed separately and reported without and with it;
(c) a cache hit: ``CropCache.read`` of batches of 16 plus ``to_tensor``.
The three are interleaved (a, b, c, a, b, c, ...) so that drift on a shared machine hits all
of them alike; the table shows medians.  Everything runs pinned to one core.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common  # first: puts the checkout on sys.path
import cv2
import numpy as np
import PIL
from PIL import Image

from runner.cache import CropCache
from runner.dataset import load_dataset
from runner.preprocess import get_recipe, load_crop, to_tensor

RECIPE = get_recipe("huawei")
DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared/data/imagenet-sample/val_orig"
BATCH = 16
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def guide_tensor(path: str) -> np.ndarray:
    """The guide's ``imagenet_torch_preprocess.py efficientnetB3``, as REFERENCE.md 3 says.

    Returned C-contiguous: ``tofile`` of the strided BGR/CHW view costs ~3x more, and the
    comparison should not depend on that detail of the guide's script.
    """
    im = Image.open(path).convert("RGB")
    w, h = im.size
    if min(w, h) != 342:
        size = (342, int(342 * h / w)) if w < h else (int(342 * w / h), 342)
        im = im.resize(size, Image.BILINEAR)
    w, h = im.size
    left, top = int(round((w - 300) / 2.0)), int(round((h - 300) / 2.0))
    x = np.array(im.crop((left, top, left + 300, top + 300)), dtype=np.float32) / 255.0
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x[:, :, ::-1].transpose(2, 0, 1))


def run_guide(paths: list[str], out: Path) -> None:
    for p in paths:
        guide_tensor(p).tofile(out / f"{Path(p).stem}.bin")


def run_streaming(paths: list[str]) -> tuple[float, float]:
    """Seconds for decode+crop+stack (preprocessing actor) and for ``to_tensor`` (device)."""
    t0 = time.perf_counter()
    batches = [
        np.stack([load_crop(p, RECIPE) for p in paths[a : a + BATCH]])
        for a in range(0, len(paths), BATCH)
    ]
    t1 = time.perf_counter()
    for b in batches:
        to_tensor(b, RECIPE)
    return t1 - t0, time.perf_counter() - t1


def run_cache_hit(cache: CropCache, n: int) -> None:
    for a in range(0, n, BATCH):
        to_tensor(cache.read(range(a, min(a + BATCH, n))), RECIPE)


def build_cache(root: Path, paths: list[str]) -> CropCache:
    cache = CropCache.open(root, RECIPE, len(paths), "benchmark")
    w = cache.writer()
    for i, p in enumerate(paths):
        w.put(i, load_crop(p, RECIPE))
    w.close()
    if not cache.finalize():
        raise SystemExit("benchmark: cache build did not complete")
    return cache


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of images")
    ap.add_argument("--decodes", type=int, default=100, help="images per repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="benchmarks/results/preprocess.json")
    args = ap.parse_args(argv)

    core = common.pin_to_one_core()
    ds = load_dataset(args.images, None)
    unique = [ds.path(i) for i in range(len(ds))]
    paths = (unique * -(-args.decodes // len(unique)))[: args.decodes]
    for p in unique:  # the paths compare equal work only if they give the same bytes
        same = to_tensor(load_crop(p, RECIPE)[None], RECIPE)[0].tobytes()
        if guide_tensor(p).tobytes() != same:
            raise SystemExit(f"benchmark: {p}: streaming tensor differs from the guide's")

    times: dict[str, list[float]] = {"a": [], "b": [], "b_tensor": [], "c": []}
    with tempfile.TemporaryDirectory() as tmp:
        out, cache_root = Path(tmp) / "bins", Path(tmp) / "cache"
        out.mkdir()
        cache = build_cache(cache_root, paths)
        run_cache_hit(cache, len(paths))  # warm the page cache and the lookup table
        for _ in range(args.reps):
            t0 = time.perf_counter()
            run_guide(paths, out)
            times["a"].append(time.perf_counter() - t0)
            load_s, tensor_s = run_streaming(paths)
            times["b"].append(load_s)
            times["b_tensor"].append(tensor_s)
            t0 = time.perf_counter()
            run_cache_hit(cache, len(paths))
            times["c"].append(time.perf_counter() - t0)

    n = len(paths)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {
        "a_guide_bin": med["a"],
        "b_streaming_crop": med["b"],
        "b_streaming_with_to_tensor": med["b"] + med["b_tensor"],
        "c_cache_hit_with_to_tensor": med["c"],
    }
    rate = {k: n / s for k, s in rows.items()}
    ratio = {k: rate[k] / rate["a_guide_bin"] for k in rows}
    print(f"{n} decodes of {len(unique)} images from {args.images}, huawei recipe, core {core}, "
          f"median of {args.reps} interleaved repetitions")
    common.print_table(
        [{"path": k, "s_per_rep": s, "img_per_s": rate[k], "vs_guide": ratio[k]}
         for k, s in rows.items()],
        ["path", "s_per_rep", "img_per_s", "vs_guide"],
    )
    print(f"to_tensor alone: {n / med['b_tensor']:.0f} img/s; "
          f"targets: b/a >= 1.5 ({ratio['b_streaming_crop']:.2f}), "
          f"c/a >= 10 ({ratio['c_cache_hit_with_to_tensor']:.2f})")
    common.write_json(args.json, {
        "benchmark": "preprocess",
        "images": str(args.images),
        "unique_images": len(unique),
        "decodes": n,
        "reps": args.reps,
        "core": core,
        "versions": {"pillow": PIL.__version__, "numpy": np.__version__,
                     "opencv": cv2.__version__},
        "seconds_per_rep": times,
        "median_s": rows | {"b_to_tensor_only": med["b_tensor"]},
        "img_per_s": rate,
        "vs_guide": ratio,
        "targets": {
            "streaming_1.5x": ratio["b_streaming_crop"] >= 1.5,
            "cache_hit_10x": ratio["c_cache_hit_with_to_tensor"] >= 10,
        },
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
