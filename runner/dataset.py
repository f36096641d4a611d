"""The image list of a run: which files, in which order, with which labels.

Images are the files of ``--images`` with an image extension, sorted by name; an image's
index is its position in that order.  Problems are collected, never raised one by one:
an image without a label and a labelled image whose file is missing are recorded as
per-image errors and the run goes on.  A labels file that cannot be trusted (a malformed or
conflicting row, a class the model does not have) stops the run instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import LabelFile, image_key, read_labels

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class DatasetError(ValueError):
    """An image folder that cannot be used at all (one line, names the path)."""


@dataclass(frozen=True)
class ImageIssue:
    """One image that was not scored, and why."""

    image: str
    reason: str
    index: int = -1  # -1: never got an index (missing file)


@dataclass
class Dataset:
    root: Path
    names: list[str]  # file names, index = position
    labels: list[int] | None  # per index, None when no labels file
    issues: list[ImageIssue] = field(default_factory=list)
    label_file: LabelFile | None = None

    def __len__(self) -> int:
        return len(self.names)

    def path(self, index: int) -> str:
        return str(self.root / self.names[index])

    def fingerprint(self) -> str:
        """Identity of the file list (names, sizes, modification times), for caches and resume
        checks: an image rewritten in place, even at the same size, changes it."""
        h = hashlib.sha256(str(self.root.resolve()).encode())
        for name in self.names:
            h.update(name.encode() + b"\0")
            try:
                st = (self.root / name).stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode() + b"\0")
            except OSError:
                h.update(b"?\0")
        return h.hexdigest()[:16]

    def check_label_range(self, num_classes: int) -> None:
        """Raise ``LabelError`` if any row of the labels file names a class outside the
        model's range: only the devices know the class count, so this runs once they are up.
        The whole file is checked, not only this run's images: one such row means the file
        does not belong to this model (1-based, another class order)."""
        if self.label_file is not None:
            self.label_file.check_range(num_classes)


def load_dataset(
    images: str | Path, labels: str | Path | None, limit: int | None = None
) -> Dataset:
    """List ``images`` and attach labels; unlabelled and missing images become issues."""
    root = Path(images)
    if not root.is_dir():
        raise DatasetError(f"--images: {root} is not a directory")
    names = sorted(
        p.name
        for p in root.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and not p.is_dir()
    )
    if limit is not None:
        names = names[:limit]
    if not names:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DatasetError(f"--images: {root} holds no image files ({kinds})")
    if labels is None:
        return Dataset(root, names, None)

    label_file = read_labels(labels)
    table = label_file.classes
    issues: list[ImageIssue] = []
    kept: list[str] = []
    kept_labels: list[int] = []
    for name in names:
        label = table.get(image_key(name))
        if label is None:
            issues.append(ImageIssue(name, f"no label in {Path(labels).name}"))
        else:
            kept.append(name)
            kept_labels.append(label)
    if limit is None:
        present = {image_key(n) for n in names}
        issues += [
            ImageIssue(key, f"labelled in {Path(labels).name} but no file in {root}")
            for key in sorted(set(table) - present)
        ]
    if not kept:
        raise DatasetError(f"--images: no image in {root} has a label in {labels}")
    return Dataset(root, kept, kept_labels, issues, label_file)
