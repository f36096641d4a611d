# ruff: noqa: E402 - the thread settings must come before numpy and OpenCV are imported
"""Decode time per image per core, by source: a folder vs one tar vs WebDataset shards.

    python benchmarks/sources.py [--images DIR] [--recipe tf-lite] [--reps 5]

What a preprocessing actor does for each batch of 16: ``read_images`` of the batch's
locations (files: one read each; tar members: one ranged read per run of members), then
``decode_crop`` of each image.  The tar and the shards (``runner.shard``, 1,000 images
each) are made from the folder in a temporary directory, all local and in the page cache
(the first pass reads everything), so the comparison is the sources' own cost, not the
disk's.  Every source's crops are checked bit-identical to the folder's before timing; the
sources take turns batch by batch (in a rotating order) on one pinned core, and the table
shows medians over repetitions.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import argparse
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import common  # first: puts the checkout on sys.path
import numpy as np

from runner.dataset import load_dataset
from runner.preprocess import decode_crop, get_recipe
from runner.shard import write_shards
from runner.sources import read_images

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared/data/imagenet-sample/val_227"
BATCH = 16
SHARD_SIZE = 1000


def make_sources(folder: str, tmp: Path) -> dict[str, str]:
    """--images of each source, all holding the folder's images."""
    dataset = load_dataset(folder, None)
    one_tar = tmp / "images.tar"
    with tarfile.open(one_tar, "w") as tar:
        for name, loc in zip(dataset.names, dataset.locations, strict=True):
            tar.add(loc, arcname=name)
    shards = tmp / "shards"
    shards.mkdir()
    write_shards(dataset, str(shards), SHARD_SIZE, "shard")
    return {"folder": folder, "tar": str(one_tar), "shards": str(shards)}


def run_batch(locations: list, recipe) -> tuple[float, float, list[np.ndarray]]:
    """Seconds reading and seconds decoding one batch, and its crops."""
    t0 = time.perf_counter()
    data = read_images(locations)
    t1 = time.perf_counter()
    crops = [decode_crop(d, recipe) for d in data]
    return t1 - t0, time.perf_counter() - t1, crops


def run_all(datasets: dict, recipe, turn: int) -> dict[str, tuple[float, float]]:
    """(read s, decode s) of every source over all images, interleaved batch by batch in
    an order that rotates with each batch, so that drift on a shared core hits all alike."""
    order = list(datasets)
    spent = {k: [0.0, 0.0] for k in order}
    n = len(next(iter(datasets.values())))
    for b, a in enumerate(range(0, n, BATCH)):
        shift = (b + turn) % len(order)
        for kind in order[shift:] + order[:shift]:
            read_s, decode_s, _ = run_batch(datasets[kind].locations[a : a + BATCH], recipe)
            spent[kind][0] += read_s
            spent[kind][1] += decode_s
    return {k: (r, d) for k, (r, d) in spent.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of images")
    ap.add_argument("--recipe", default="tf-lite", help="preprocessing recipe (tf-lite)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="benchmarks/results/sources.json")
    args = ap.parse_args(argv)

    core = common.pin_to_one_core()
    recipe = get_recipe(args.recipe)
    with tempfile.TemporaryDirectory() as tmp:
        sources = make_sources(args.images, Path(tmp))
        datasets = {k: load_dataset(v, None) for k, v in sources.items()}
        names = datasets["folder"].names
        for kind, ds in datasets.items():
            if ds.names != names:
                raise SystemExit(f"benchmark: {kind} lists other images than the folder")
        for a in range(0, len(names), BATCH):  # the same crops from every source; warm cache
            ref = run_batch(datasets["folder"].locations[a : a + BATCH], recipe)[2]
            for kind, ds in datasets.items():
                if kind == "folder":
                    continue
                crops = run_batch(ds.locations[a : a + BATCH], recipe)[2]
                if not all(np.array_equal(x, y) for x, y in zip(crops, ref, strict=True)):
                    raise SystemExit(f"benchmark: {kind} crops differ from the folder's")
        order = list(datasets)
        times: dict[str, dict[str, list[float]]] = {k: {"read": [], "decode": []} for k in order}
        for rep in range(args.reps):
            for kind, (read_s, decode_s) in run_all(datasets, recipe, rep).items():
                times[kind]["read"].append(read_s)
                times[kind]["decode"].append(decode_s)

    n = len(names)
    med = {k: {part: statistics.median(v) for part, v in t.items()} for k, t in times.items()}
    total = {k: m["read"] + m["decode"] for k, m in med.items()}
    rows = [{"source": k, "read_ms": 1e3 * med[k]["read"] / n,
             "decode_ms": 1e3 * med[k]["decode"] / n, "total_ms": 1e3 * total[k] / n,
             "img_per_s": n / total[k], "vs_folder": total[k] / total["folder"]} for k in order]
    print(f"{n} images from {args.images} ({len(datasets['shards'].shards)} shards of up to "
          f"{SHARD_SIZE}), {args.recipe} recipe, batches of {BATCH}, core {core}, median of "
          f"{args.reps} interleaved repetitions; time per image (ms, one core)")
    common.print_table(rows, ["source", "read_ms", "decode_ms", "total_ms", "img_per_s",
                              "vs_folder"])
    print(f"target: shards cost no more per image than the folder: shards/folder = "
          f"{total['shards'] / total['folder']:.3f}")
    common.write_json(args.json, {
        "benchmark": "sources",
        "images": str(args.images),
        "count": n,
        "recipe": args.recipe,
        "batch": BATCH,
        "shard_size": SHARD_SIZE,
        "reps": args.reps,
        "core": core,
        "seconds_per_rep": times,
        "per_image_ms": {r["source"]: {k: r[k] for k in ("read_ms", "decode_ms", "total_ms")}
                         for r in rows},
        "vs_folder": {r["source"]: r["vs_folder"] for r in rows},
        "target_shards_le_folder": total["shards"] <= total["folder"],
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
