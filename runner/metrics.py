"""Top-k scoring with the guide's exact rules (REFERENCE.md section 5)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOPK = 5


class LabelError(ValueError):
    """A labels file that cannot be read; the message names the file and line."""


def image_key(file_name: str) -> str:
    """The guide's key for an image or output file: the name before the first dot."""
    return Path(file_name).name.split(".", 1)[0]


def read_labels(path: str | Path) -> dict[str, int]:
    """``val_label.txt`` (``ILSVRC2012_val_00000001.JPEG 65``) -> {image key: class index}."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LabelError(f"labels file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"cannot read labels file {path}: {exc}") from None
    labels: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise LabelError(
                f"labels file {path}:{lineno}: expected '<image> <class>', got {line!r}"
            )
        labels[image_key(parts[0])] = int(parts[1])
    if not labels:
        raise LabelError(f"labels file {path} holds no labels")
    return labels


def topk_indices(logits: np.ndarray, k: int = TOPK) -> np.ndarray:
    """[n, k] class indices by descending logit, as ``np.argsort(-logits)`` orders them."""
    return np.argsort(-logits, axis=1)[:, :k].astype(np.int32)


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
