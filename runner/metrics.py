"""Top-k scoring with the guide's exact rules (REFERENCE.md section 5), and the labels file
it scores against (the one reader every data source and ``runner.score`` share)."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOPK = 5


class LabelError(ValueError):
    """A labels file that cannot be trusted; the message names the file and line."""


def image_key(file_name: str) -> str:
    """The guide's key for an image or output file: the name before the first dot."""
    return Path(file_name).name.split(".", 1)[0]


# ASCII digits only: int() would also take other scripts' digits ("\u0663" is 3).
_CLASS_INDEX = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class LabelFile:
    """A labels file as read: each image's class and the line it came from, so that a check
    made later (the class range, once the model is known) can name the row at fault."""

    path: Path
    classes: dict[str, int]  # image key -> class index
    lines: dict[str, int]  # image key -> line number of its (first) row

    def check_range(self, num_classes: int) -> None:
        """Every class must be one the model can score, 0..N-1 with N = num_classes minus the
        background index; a label outside it would be counted as a silent wrong answer."""
        n = num_classes - label_offset(num_classes)
        bad = [(line, key) for key, line in self.lines.items() if not 0 <= self.classes[key] < n]
        if bad:
            line, key = min(bad)
            raise class_range_error(f"labels file {self.path}:{line}", self.classes[key],
                                    num_classes, self.classes.values())


def class_range_error(where: str, value: int, num_classes: int,
                      values: Iterable[int]) -> LabelError:
    """The one-line error for a label outside the model's classes, ``where`` naming its
    source (a labels file's line, a shard's ``.cls`` member), with a hint when every label
    of that source looks 1-based."""
    offset = label_offset(num_classes)
    n = num_classes - offset
    values = list(values)
    model = f"a {num_classes}-class model" + (" (index 0 is background)" if offset else "")
    hint = ""
    if min(values) >= 1 and max(values) <= n:
        hint = (f"; every label lies in 1..{n} and none is 0: the file looks 1-based (the "
                "ILSVRC devkit's ground truth is, and its class order differs too)")
    return LabelError(f"{where}: class {value} is outside 0..{n - 1}, the valid classes for "
                      f"{model}{hint}")


def read_labels(path: str | Path) -> LabelFile:
    """``val_label.txt`` (``ILSVRC2012_val_00000001.JPEG 65`` per line) -> its ``LabelFile``.

    UTF-8 with or without a byte-order mark (spreadsheet exports write one), any line ending;
    the class is the last field, so image names may contain spaces. An image listed twice
    with one class is one label; with two classes it is an error naming both lines.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LabelError(f"labels file {path} does not exist") from None
    except OSError as exc:
        raise LabelError(f"cannot read labels file {path}: {exc.strerror}") from None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise LabelError(f"labels file {path} is UTF-16; save it as UTF-8")
    body = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = body[: exc.start].count(b"\n") + 1
        raise LabelError(f"labels file {path}:{lineno}: not UTF-8 (byte "
                         f"{body[exc.start]:#04x}); save the file as UTF-8") from None
    classes: dict[str, int] = {}
    lines: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.rsplit(None, 1)
        if not fields:
            continue
        if len(fields) != 2 or not _CLASS_INDEX.fullmatch(fields[1]):
            raise LabelError(
                f"labels file {path}:{lineno}: expected '<image> <class index>', got {line!r}"
            )
        key, value = image_key(fields[0].strip()), int(fields[1])
        if key not in classes:
            classes[key], lines[key] = value, lineno
        elif classes[key] != value:
            raise LabelError(
                f"labels file {path}:{lineno}: {key} is class {value} here but class "
                f"{classes[key]} on line {lines[key]}"
            )
    if not classes:
        raise LabelError(f"labels file {path} holds no labels")
    return LabelFile(path, classes, lines)


def topk_indices(logits: np.ndarray, k: int = TOPK) -> np.ndarray:
    """[n, k] class indices by descending logit, equal logits by ascending class index.

    The guide's ``np.argsort(-logits)`` order, made stable: its default sort leaves equal
    logits in an order that depends on the array and on numpy's sort implementation, and
    INT8 models dequantize to few distinct values, so exact ties on top do occur (2 of the
    1,300 val_227 images with Lite0 INT8, one of them deciding that image's Top1).
    """
    return np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int32)


def label_offset(num_classes: int) -> int:
    """1001-way outputs put background at index 0, so ImageNet label ``c`` is ``c + 1``."""
    return 1 if num_classes == 1001 else 0


def hit_ranks(top: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Rank (0..k-1) of each image's label within its top-k, or -1 when absent."""
    target = labels.astype(np.int64) + label_offset(num_classes)
    match = top == target[:, None]
    return np.where(match.any(axis=1), match.argmax(axis=1), -1)


@dataclass(frozen=True)
class Accuracy:
    images: int
    num_classes: int
    topk: tuple[float, ...]  # cumulative share, Top1..TopK, in 0..1

    @classmethod
    def from_ranks(cls, ranks: np.ndarray, num_classes: int, k: int = TOPK) -> Accuracy:
        n = int(ranks.size)
        hits = np.array([np.count_nonzero(ranks == r) for r in range(k)], dtype=np.float64)
        acc = np.cumsum(hits) / n if n else np.zeros(k)
        return cls(n, num_classes, tuple(float(a) for a in acc))

    def percent(self, k: int) -> float:
        """TopK in percent rounded as the guide prints it."""
        return float(np.round(np.float64(self.topk[k - 1]) * 100, 2))

    def to_guide_json(self) -> str:
        """``result.json`` byte-compatible with the guide's ``imagenet_acc_eval.py``."""
        values = [
            {"key": "Number of images", "value": str(self.images)},
            {"key": "Number of classes", "value": str(self.num_classes)},
        ]
        values += [
            {"key": f"Top{k} accuracy", "value": f"{self.percent(k)}%"}
            for k in range(1, len(self.topk) + 1)
        ]
        return json.dumps({"title": "Overall statistical evaluation", "value": values})
