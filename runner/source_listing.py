"""The images of each kind of source, in order, with the labels the source itself carries.

A flat folder lists its image files by sorted name.  An ImageFolder tree lists them as
torchvision does, its class folders giving labels (ImageNet WNIDs their standard index,
other names their sorted position).  A tar or a set of shards lists WebDataset samples:
the members sharing a key, an image and optionally ``<key>.cls``; a sample without an
image, a member cut short by a truncated tar and a tar's unreadable rest are issues naming
the shard and key, and the shard's other samples are still listed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .classes import class_table, wnid_index
from .source_paths import IMAGE_SUFFIXES, is_image_name
from .source_tar import ShardListing, TarEntry, list_tars, split_key
from .sources import DatasetError, Location, Member

#: ImageNet's own file names (``ILSVRC2012_val_00000293.JPEG``, ``n01440764_10026.JPEG``)
#: are unique across the data set, so reports name such images by file name alone, and a
#: folder, an ImageFolder copy, a tar and shards of the same images give the same rows.
_IMAGENET_NAME = re.compile(r"(ILSVRC20\d\d_(val|test)_\d{8}|n\d{8}_\d+)\.[A-Za-z]+")
IMAGE_EXTS = {s[1:] for s in IMAGE_SUFFIXES}
_CLASS_INDEX = re.compile(r"\s*[+-]?[0-9]+\s*")


@dataclass(frozen=True)
class ImageIssue:
    """One image that was not scored, and why."""

    image: str
    reason: str
    index: int = -1  # -1: never got an index (missing file, sample without an image)


@dataclass
class Listing:
    """Images as a source lists them, before labels from ``--labels`` are attached."""

    names: list[str] = field(default_factory=list)
    locations: list[Location] = field(default_factory=list)
    own_labels: list[int | None] = field(default_factory=list)  # folder names, .cls
    own_rule: str = ""  # how the source's own labels were read ("" when it has none)
    label_problems: dict[int, str] = field(default_factory=dict)  # index -> why no label
    issues: list[ImageIssue] = field(default_factory=list)
    shard_of: list[int] | None = None
    shards: list[str] = field(default_factory=list)
    shard_ids: list[str] = field(default_factory=list)

    def add(self, name: str, loc: Location, label: int | None = None, shard: int = -1) -> None:
        self.names.append(name)
        self.locations.append(loc)
        self.own_labels.append(label)
        if self.shard_of is not None:
            self.shard_of.append(shard)

    def full(self, limit: int | None) -> bool:
        return limit is not None and len(self.names) >= limit


def report_name(relative: str) -> str:
    """An image's name in reports: an ImageNet file name alone, anything else by its path
    within the source (unique there)."""
    relative = relative.removeprefix("./")
    base = relative.rsplit("/", 1)[-1]
    return base if _IMAGENET_NAME.fullmatch(base) else relative


def list_folder(root: Path, limit: int | None) -> Listing:
    listing = Listing()
    names = sorted(e.name for e in os.scandir(root) if e.is_file() and is_image_name(e.name))
    for name in names[:limit]:
        listing.add(name, os.path.abspath(root / name))
    return listing


def class_rule(root: Path, classes: list[str]) -> tuple[dict[str, int], str]:
    """The class index of each class folder, and the rule that gave it."""
    wnids = wnid_index()
    known = [c for c in classes if c in wnids]
    if len(known) == len(classes):
        return ({c: wnids[c] for c in classes},
                f"ImageNet WNID folder names -> standard class indices ({len(classes)} of "
                f"{len(class_table())} classes)")
    if known:
        other = [c for c in classes if c not in wnids]
        raise DatasetError(
            f"--images: {root} mixes ImageNet WNID class folders ({', '.join(known[:3])}) "
            f"with other names ({', '.join(other[:3])}): rename or remove the others, or "
            "give --labels")
    shown = [f"{i} = {c}" for i, c in enumerate(classes)]
    if len(shown) > 6:
        shown = [*shown[:4], "...", shown[-1]]
    return ({c: i for i, c in enumerate(classes)},
            f"sorted folder names (torchvision ImageFolder order): {', '.join(shown)}")


def list_imagefolder(root: Path, limit: int | None, own_labels: bool) -> Listing:
    """torchvision's ImageFolder walk (datasets/folder.py find_classes, make_dataset):
    class folders in sorted order, each walked recursively with links followed, file names
    sorted; hidden files are skipped (``._x.JPEG`` is not an image)."""
    listing = Listing()
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    index: dict[str, int] = {}
    if own_labels:
        index, listing.own_rule = class_rule(root, classes)
    for cls in classes:
        for folder, _, files in sorted(os.walk(root / cls, followlinks=True)):
            for name in sorted(files):
                if listing.full(limit):
                    return listing
                if is_image_name(name):
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, root).replace(os.sep, "/")
                    listing.add(report_name(rel), os.path.abspath(path), index.get(cls))
    return listing


def list_shards(urls: tuple[str, ...], limit: int | None) -> Listing:
    """The samples of each tar in order, stopping once ``limit`` images are listed."""
    listing = Listing(shard_of=[])
    for shard in list_tars(list(urls)):
        number = len(listing.shards)
        listing.shards.append(shard.url)
        listing.shard_ids.append(f"{shard.size}:{shard.version}")
        _add_samples(listing, shard, number, limit)
        if listing.full(limit):
            break
    if any(label is not None for label in listing.own_labels):
        listing.own_rule = "<key>.cls members"
    return listing


def _add_samples(listing: Listing, shard: ShardListing, number: int,
                 limit: int | None) -> None:
    """The samples of one tar (WebDataset: the members that share a key): its first image
    member, and its label from ``<key>.cls``."""
    url, tar = shard.url, shard.listing
    base = url.rstrip("/").rsplit("/", 1)[-1]
    samples: dict[str, dict[str, TarEntry]] = {}
    for entry in tar.entries:
        key, ext = split_key(entry.name)
        if key and ext and not key.rsplit("/", 1)[-1].startswith("."):
            samples.setdefault(key, {}).setdefault(ext, entry)
    for key, members in samples.items():
        if listing.full(limit):
            return
        image = next((e for x, e in members.items() if x.lower() in IMAGE_EXTS), None)
        cls = members.get("cls")
        if image is None:
            if cls is not None:
                listing.issues.append(ImageIssue(
                    key, f"sample {key} in shard {base} has no image (only {key}.cls)"))
            continue
        name = report_name(image.name)
        if image.end > shard.size:
            listing.issues.append(ImageIssue(
                name, f"truncated tar member: {base}:{image.name} runs to byte {image.end} "
                f"but the shard ends at byte {shard.size}"))
            continue
        label = None
        if cls is None:
            listing.label_problems[len(listing.names)] = (
                f"no label: sample {key} in shard {base} has no {key}.cls")
        else:
            text = tar.cls.get(cls.name, "")
            if _CLASS_INDEX.fullmatch(text):
                label = int(text)
            else:
                listing.label_problems[len(listing.names)] = (
                    f"{base}:{key}.cls holds {text[:20]!r}, not a class index")
        member = Member(url, image.offset, image.size, f"{base}:{image.name}")
        listing.add(name, member, label, number)
    for entry in tar.lost:
        if split_key(entry.name)[1].lower() in IMAGE_EXTS:
            listing.issues.append(ImageIssue(
                report_name(entry.name), f"lost: shard {base} ends at byte {shard.size}, "
                f"before this member (its index lists it at bytes {entry.offset}..{entry.end})"))
    if tar.problem:
        listing.issues.append(ImageIssue(base, f"shard {url}: {tar.problem}"))
