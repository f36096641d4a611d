"""``python -m runner.prep --format bin IMAGES OUT``: the guide's ``.bin`` files, done right.

Drop-in for the guide's ``imagenet_torch_preprocess.py`` (+ ``gen_dataset_info.py bin``) for
tools that need files on disk: the same bytes (``reference_tensor(...).tofile``, raw CHW
float32), but in parallel Ray tasks with a progress bar, and without swallowing errors:
every failed image is listed at the end and in ``OUT/prep_errors.csv``.  OUT has one writer
at a time (``runner.runlock``): a second prep into it exits 2 naming the first.

Exit codes: 0 all written, 2 bad arguments, 4 some images failed (the others are written).
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm

from .dataset import Dataset, DatasetError, load_dataset
from .devices import cpu_slots
from .preprocess import RECIPES, ImageError, decode_crop, get_recipe, to_tensor
from .runlock import hold_run_folder
from .sources import Location, read_images

ERRORS_CSV = "prep_errors.csv"
#: At most this many images per Ray task: small enough for a live progress bar.
MAX_CHUNK = 32


Job = tuple[str, Location, str]  # (image name, where its bytes are, OUT/<stem>.bin)


def write_bins(jobs: list[Job], recipe: str) -> list[tuple[str, str]]:
    """Write each job's ``.bin``; return ``(image, reason)`` for those that failed."""
    r = get_recipe(recipe)
    failed = []
    for (name, _, dst), data in zip(jobs, read_images([loc for _, loc, _ in jobs]),
                                    strict=True):
        try:
            if isinstance(data, ImageError):
                raise data
            tensor = to_tensor(decode_crop(data, r)[None], r)[0]  # = reference_tensor
        except ImageError as exc:
            failed.append((name, str(exc)))
            continue
        tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp")
        try:  # via a temporary name: a killed run never leaves a short .bin behind
            tensor.tofile(tmp)
            os.replace(tmp, dst)
        except OSError as exc:
            failed.append((name, f"cannot write {dst}: {exc.strerror or exc}"))
    return failed


def plan(images: list[tuple[str, Location]], out: Path) -> tuple[list[Job], list[tuple[str, str]]]:
    """Jobs for ``(name, location)`` images, and failures for images whose stem is taken."""
    jobs, clashes, owner = [], [], {}
    for name, location in images:
        stem = Path(name).stem
        if stem in owner:
            clashes.append((name, f"{stem}.bin is already written from {owner[stem]}"))
        else:
            owner[stem] = Path(name).name
            jobs.append((name, location, str(out / f"{stem}.bin")))
    return jobs, clashes


def run_jobs(jobs: list[Job], recipe: str, workers: int) -> list[tuple[str, str]]:
    """Run ``write_bins`` over chunks on Ray, ``workers`` tasks at a time; return failures."""
    import ray

    from .errors import one_line
    from .ray_start import start_ray

    start_ray(None, {})
    task = ray.remote(num_cpus=1)(write_bins)
    size = max(1, min(MAX_CHUNK, math.ceil(len(jobs) / (workers * 4))))
    chunks = [jobs[a : a + size] for a in range(0, len(jobs), size)]
    failed: list[tuple[str, str]] = []
    pending: dict = {}
    with tqdm(total=len(jobs), unit="img", desc="prep") as bar:
        while chunks or pending:
            while chunks and len(pending) < workers:
                chunk = chunks.pop(0)
                pending[task.remote(chunk, recipe)] = chunk
            [ref], _ = ray.wait(list(pending), num_returns=1)
            chunk = pending.pop(ref)
            try:
                failed += ray.get(ref)
            except ray.exceptions.RayError as exc:  # a crashed worker: its chunk is lost
                failed += [(name, one_line(exc)) for name, _, _ in chunk]
            bar.update(len(chunk))
    return failed


def write_info(out_arg: str, info: Path, size: int) -> int:
    """``gen_dataset_info.py bin``: every ``*.bin`` of OUT in glob order; return the count."""
    bins = glob.glob(os.path.join(glob.escape(out_arg), "*.bin"))
    with open(info, "w") as f:
        for index, path in enumerate(bins):
            f.write(f"{index} {path} {size} {size}\n")
    return len(bins)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runner.prep",
        description="Write the guide's float32 .bin input files (and its .info list) in "
        "parallel, listing every image that failed.",
    )
    p.add_argument("images", help="images: a folder, an ImageFolder tree, a .tar, WebDataset "
                   "shards, or any tar form at a URL (as evaluate's --images)")
    p.add_argument("out", help="folder for <stem>.bin (created if missing)")
    p.add_argument("--format", default="bin", choices=["bin"], help="output format (bin)")
    p.add_argument("--recipe", default="huawei", choices=list(RECIPES),
                   help="preprocessing recipe (default huawei: the guide's)")
    p.add_argument("--workers", type=int, default=cpu_slots(),
                   help="parallel tasks (default: one per core)")
    p.add_argument("--info", help="also write this gen_dataset_info.py-style .info file")
    p.add_argument("--limit", type=int, help="only the first N images (sorted by name)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if args.workers < 1:
            raise ValueError(f"--workers must be at least 1, not {args.workers}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be at least 1, not {args.limit}")
        dataset = load_dataset(args.images, None, args.limit)
        if args.info and Path(args.info).is_dir():
            raise ValueError(f"--info: {args.info} is a directory")
        lock = hold_run_folder(out, "OUT")  # one writer per folder, until everything is written
    except (ValueError, DatasetError, OSError) as exc:
        print(f"prep: error: {exc}", file=sys.stderr)
        return 2
    with lock:
        return write_all(args, dataset, out)


def write_all(args: argparse.Namespace, dataset: Dataset, out: Path) -> int:
    """The ``.bin`` files, ``prep_errors.csv`` and the ``.info`` list; the exit code."""
    jobs, failed = plan(list(zip(dataset.names, dataset.locations, strict=True)), out)
    failed += run_jobs(jobs, args.recipe, args.workers)
    failed.sort()
    with open(out / ERRORS_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "reason"])
        w.writerows(failed)
    written = len(dataset) - len(failed)
    print(f"prep: wrote {written} of {len(dataset)} .bin files to {out}")
    if args.info:
        listed = write_info(args.out, Path(args.info), get_recipe(args.recipe).crop)
        stale = f" ({listed - written} not written by this run)" if listed != written else ""
        print(f"prep: listed {listed} .bin files of {out} in {args.info}{stale}")
    if failed:
        for src, reason in failed:
            print(f"prep: FAILED {src}: {reason}", file=sys.stderr)
        print(f"prep: {len(failed)} images failed (listed in {out / ERRORS_CSV})",
              file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
