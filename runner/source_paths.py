"""What ``--images`` names: a flat folder, an ImageFolder tree, one tar, or a set of shards.

Shards are given as a directory holding ``.tar`` files, a brace pattern
(``val-{000000..000049}.tar``, as WebDataset and bash expand it) or a list file (one shard
per line, ``#`` comments; relative paths are relative to the list file).  Any tar form may
be an fsspec URL (``s3://``, ``gs://``, ``http(s)://``); image folders are local.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .sources import DatasetError, filesystem, is_url, local_path

#: torchvision's ImageFolder extensions (datasets/folder.py IMG_EXTENSIONS), compared
#: lower-case as its has_file_allowed_extension does.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
TAR_SUFFIX = ".tar"

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # folder | imagefolder | tar | shards
    root: str  # --images as given
    shards: tuple[str, ...] = ()  # the tars, in order (tar and shards only)


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def expand_braces(pattern: str) -> list[str]:
    """``{a..b}`` (zero-padded when a bound is: ``{000..010}``) and ``{x,y}`` groups, each
    expanded in turn, left to right, like bash and the braceexpand package."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    numbers = _RANGE.fullmatch(body)
    if numbers:
        a, b = numbers.groups()
        padded = any(s.lstrip("-").startswith("0") and len(s.lstrip("-")) > 1 for s in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if int(b) >= int(a) else -1
        items = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DatasetError(f"--images: cannot expand {{{body}}} in {pattern}: use a range "
                           "such as {000000..000049} or a list such as {a,b}")
    return [head + item + rest for item in items for rest in expand_braces(tail)]


def _check_tars(shards: list[str], where: str) -> tuple[str, ...]:
    for shard in shards:
        if not shard.endswith(TAR_SUFFIX):
            raise DatasetError(f"--images: {where} names {shard}, which is not a .tar shard")
    if not shards:
        raise DatasetError(f"--images: {where} names no shards")
    return tuple(shards)


def read_list_file(path: str) -> tuple[str, ...]:
    """The shards of a list file: one path or URL per line."""
    local = local_path(path)
    try:
        if local is not None:
            text = Path(local).read_text(encoding="utf-8-sig")
        else:
            fs, fs_path = filesystem(path)
            text = fs.cat_file(fs_path).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"--images: cannot read the shard list {path}: {exc}") from None
    base = os.path.dirname(local) if local is not None else path.rsplit("/", 1)[0]
    shards = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.endswith(TAR_SUFFIX):
            raise DatasetError(f"--images: {path}:{lineno}: {line!r} is not a .tar shard "
                               "(a shard list holds one .tar path or URL per line)")
        if is_url(line) or os.path.isabs(line):
            shards.append(line)
        else:
            shards.append(os.path.join(base, line) if local is not None else f"{base}/{line}")
    return _check_tars(shards, path)


def _remote_folder(url: str) -> SourceSpec:
    if url.startswith(("http://", "https://")):
        raise DatasetError(f"--images: {url}: a web server's folder cannot be listed; name the "
                           "shards with a brace pattern or a list file")
    fs, fs_path = filesystem(url)
    try:
        names = fs.ls(fs_path, detail=False)
    except FileNotFoundError:
        raise DatasetError(f"--images: {url} does not exist") from None
    tars = sorted(fs.unstrip_protocol(n) for n in names if n.endswith(TAR_SUFFIX))
    if not tars:
        raise DatasetError(f"--images: {url} holds no .tar shards (image folders and "
                           "ImageFolder trees must be local)")
    return SourceSpec("shards", url, tuple(tars))


def _local_folder(root: Path) -> SourceSpec:
    entries = list(os.scandir(root))
    if any(e.is_file() and is_image_name(e.name) for e in entries):
        return SourceSpec("folder", str(root))
    tars = sorted(os.path.abspath(e.path) for e in entries
                  if e.is_file() and e.name.endswith(TAR_SUFFIX) and not e.name.startswith("."))
    if tars:
        return SourceSpec("shards", str(root), tuple(tars))
    if any(e.is_dir() for e in entries):
        return SourceSpec("imagefolder", str(root))
    kinds = ", ".join(sorted(IMAGE_SUFFIXES))
    raise DatasetError(f"--images: {root} holds no image files ({kinds}), class folders "
                       "or .tar shards")


def resolve_source(images: str | Path) -> SourceSpec:
    """Which kind of source ``images`` is, and its shards where it has any."""
    text = str(images)
    if _BRACE.search(text):
        shards = [s if is_url(s) else os.path.abspath(s) for s in expand_braces(text)]
        return SourceSpec("shards", text, _check_tars(shards, text))
    local = local_path(text)
    if local is None:
        if text.endswith(TAR_SUFFIX):
            return SourceSpec("tar", text, (text,))
        if text.endswith((".txt", ".list")):
            return SourceSpec("shards", text, read_list_file(text))
        return _remote_folder(text)
    path = Path(local)
    if path.is_dir():
        return _local_folder(path)
    if path.is_file():
        if path.name.endswith(TAR_SUFFIX):
            return SourceSpec("tar", text, (os.path.abspath(path),))
        return SourceSpec("shards", text, read_list_file(str(path)))
    raise DatasetError(f"--images: {text} does not exist")
