"""Score output files that the Huawei ``benchmark`` tool or ais_bench wrote into ``result.json``.

The guide's ``imagenet_acc_eval.py`` crashes on any stray file in the output folder; this scores
the same files by the same rules (``runner.metrics``, REFERENCE.md sections 5 and 6) but lists
and skips what is not an output instead.

    python -m runner.score result/dumpOutput_device0 val_label.txt result.json
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from runner.metrics import (
    Accuracy,
    LabelError,
    LabelFile,
    hit_ranks,
    image_key,
    read_labels,
    topk_indices,
)

DEVICE_DIRS = "dumpOutput_device*"
# benchmark writes <stem>_1.txt|bin, ais_bench <stem>_0.bin|npy|txt.
OUTPUT_INDEXES = ("0", "1")
OUTPUT_EXTS = ("txt", "bin", "npy")


class ScoreError(ValueError):
    """Nothing to score (missing folder, no usable output): the CLI's exit-2 case."""


def _read_logits(path: Path, ext: str) -> np.ndarray:
    """One image's logits as float32, as the guide loads them; ValueError says why not."""
    if ext == "bin":
        size = path.stat().st_size
        if size == 0 or size % 4:
            raise ValueError(f"{size} bytes is not a float32 vector")
        return np.fromfile(path, dtype=np.float32)
    if ext == "npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as exc:
            raise ValueError(f"not a .npy array: {exc}") from None
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"dtype {arr.dtype} is not numeric")
    else:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if len(lines) != 1:
            raise ValueError(f"{len(lines)} lines, expected one line of numbers")
        arr = np.array(lines[0].split(), dtype=np.float32)
    if arr.size == 0 or arr.size != arr.shape[-1]:
        raise ValueError(f"shape {arr.shape} is not one image's logits")
    return arr.reshape(-1).astype(np.float32)


def _candidate_files(root: Path) -> list[Path]:
    """Files in DIR and in each of its ``dumpOutput_device*`` folders, in a stable order."""
    folders = [root, *(p for p in root.glob(DEVICE_DIRS) if p.is_dir())]
    return sorted(p for folder in folders for p in folder.iterdir() if p.is_file())


def score_outputs(
    dir: str | Path, label_file: str | Path | LabelFile
) -> tuple[Accuracy, list[tuple[str, str]]]:
    """Accuracy over the outputs under ``dir`` plus (file, reason) for every file skipped.

    ``label_file`` is a ``val_label.txt`` path or what ``read_labels`` gives. Files whose class
    count differs from the most common one are skipped, as is a second output for one image.
    That count is the model's: a label outside its range raises ``LabelError``.
    """
    root = Path(dir)
    if not root.is_dir():
        raise ScoreError(f"{root} is not a directory")
    if not isinstance(label_file, LabelFile):
        label_file = read_labels(label_file)
    labels = label_file.classes
    skipped: list[tuple[str, str]] = []
    found: list[tuple[str, str, int, np.ndarray]] = []  # name, key, classes, top-k row
    for path in _candidate_files(root):
        name = path.relative_to(root).as_posix()
        stem = image_key(path.name)
        key, _, index = stem.rpartition("_")
        ext = path.name[len(stem) + 1 :]
        if not key or index not in OUTPUT_INDEXES or ext not in OUTPUT_EXTS:
            skipped.append((name, "not a benchmark/ais_bench output name"))
            continue
        if key not in labels:
            skipped.append((name, f"no label for {key}"))
            continue
        try:
            logits = _read_logits(path, ext)
        except (OSError, ValueError) as exc:
            skipped.append((name, str(exc)))
            continue
        found.append((name, key, logits.size, topk_indices(logits[None])[0]))

    num_classes = Counter(n for _, _, n, _ in found).most_common(1)[0][0] if found else 0
    scored: dict[str, str] = {}  # image key -> file it was scored from
    tops = []
    for name, key, n, top in found:
        if n != num_classes:
            skipped.append((name, f"{n} classes, the other outputs have {num_classes}"))
        elif key in scored:
            skipped.append((name, f"duplicate: {key} already scored from {scored[key]}"))
        else:
            scored[key] = name
            tops.append(top)
    if not tops:
        raise ScoreError(
            f"no output file could be scored in {root} (expected <image>_1.txt|bin or "
            f"<image>_0.bin|npy|txt, or {DEVICE_DIRS} folders holding them)"
        )
    label_file.check_range(num_classes)
    truth = np.array([labels[key] for key in scored])
    ranks = hit_ranks(np.stack(tops), truth, num_classes)
    return Accuracy.from_ranks(ranks, num_classes), sorted(skipped)


def _error(message: str) -> int:
    """One line, no traceback: the caller is a person at a shell or a job script."""
    print(f"score: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="score", description="Score benchmark/ais_bench outputs into the guide's result.json."
    )
    parser.add_argument("dir", type=Path, help="a dumpOutput_device* folder or its parent")
    parser.add_argument("labels", type=Path, help="val_label.txt")
    parser.add_argument("out", type=Path, help="result.json to write")
    args = parser.parse_args(argv)
    try:
        acc, skipped = score_outputs(args.dir, args.labels)
    except (ScoreError, LabelError, OSError) as exc:
        return _error(str(exc))
    try:
        args.out.write_text(acc.to_guide_json())
    except OSError as exc:
        return _error(f"cannot write {args.out}: {exc.strerror}")
    for name, reason in skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    print(
        f"scored {acc.images} outputs ({acc.num_classes} classes), "
        f"skipped {len(skipped)}; wrote {args.out}"
    )
    for k in range(1, len(acc.topk) + 1):
        print(f"  Top{k}  {acc.percent(k):>6}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
