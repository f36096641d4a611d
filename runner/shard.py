"""``python -m runner.shard IMAGES OUT [--labels L] [--shard-size 1000]``: WebDataset shards.

Reads any source ``--images`` takes (a folder, an ImageFolder tree, a tar, shards, local or
remote) and writes ``OUT/<prefix>-000000.tar``, ... : each sample ``<key>.<ext>`` holds the
image's bytes unchanged and ``<key>.cls`` its class index as ASCII digits, and each shard
gets its index beside it (``<shard>.index.json``, see ``runner.source_tar``), so that
listing remote shards costs one small read per shard.  The key is the image's report name
without its extension, dots turned to ``_`` (WebDataset splits a key at its first dot), so
ImageNet files keep their names: ``ILSVRC2012_val_00000293.JPEG`` stays that member.  OUT is
a local folder or an fsspec URL (``s3://bucket/val``).  Shards are written whole: a local
shard appears under its name only once complete.

Exit codes: 0 all written, 2 bad arguments or source, 4 some images could not be read (the
others are written and the summary names them).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
from dataclasses import dataclass, field
from typing import IO

from .dataset import Dataset, DatasetError, load_dataset
from .metrics import LabelError
from .source_tar import INDEX_SUFFIX, TarEntry, TarListing, encode_index
from .sources import filesystem, local_path, read_images

#: Images read at a time: one ranged read per run of tar members, bounded memory.
READ_BATCH = 64
#: Problems printed one per line before the summary; the rest are counted.
SHOWN = 20


@dataclass
class ShardStats:
    shards: list[str] = field(default_factory=list)
    images: int = 0
    labelled: int = 0
    bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)


def sample_key(name: str) -> str:
    """``ILSVRC2012_val_00000293.JPEG`` -> ``ILSVRC2012_val_00000293``; ``cats/a.b.jpg`` ->
    ``cats/a_b``."""
    folder, _, base = name.rpartition("/")
    stem = os.path.splitext(base)[0].replace(".", "_")
    return f"{folder}/{stem}" if folder else stem


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A reproducible header: same bytes in, same shard out."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o444, 0
    return info


class _ShardWriter:
    """One tar being written, and the index of what went in."""

    def __init__(self, f: IO[bytes]):
        self.file = f
        self.tar = tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT)
        self.listing = TarListing([])

    def add(self, name: str, data: bytes) -> None:
        self.tar.addfile(_member(name, len(data)), io.BytesIO(data))
        # tarfile pads each member's data to whole 512-byte blocks, after its header.
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        self.listing.entries.append(TarEntry(name, self.tar.offset - padded, len(data)))

    def close(self) -> int:
        self.tar.close()  # end-of-archive blocks; the file object stays open
        size = self.file.tell()
        self.file.close()
        return size


def _open_out(out: str, name: str) -> tuple[IO[bytes], str]:
    """A writable file for shard ``name`` and the temporary path to rename (local only)."""
    path = local_path(out)
    if path is not None:
        tmp = os.path.join(path, f".{name}.tmp")
        return open(tmp, "wb"), tmp
    fs, fs_path = filesystem(out)
    return fs.open(f"{fs_path.rstrip('/')}/{name}", "wb"), ""


def _write_bytes(out: str, name: str, data: bytes) -> None:
    f, tmp = _open_out(out, name)
    with f:
        f.write(data)
    if tmp:
        os.replace(tmp, os.path.join(local_path(out) or "", name))


def write_shards(dataset: Dataset, out: str, shard_size: int, prefix: str) -> ShardStats:
    stats = ShardStats()
    for first in range(0, len(dataset), shard_size):
        name = f"{prefix}-{len(stats.shards):06d}.tar"
        f, tmp = _open_out(out, name)
        writer = _ShardWriter(f)
        last = min(first + shard_size, len(dataset))
        for start in range(first, last, READ_BATCH):
            stop = min(start + READ_BATCH, last)
            for i, data in zip(range(start, stop), read_images(dataset.locations[start:stop]),
                               strict=True):
                image = dataset.names[i]
                if not isinstance(data, bytes):
                    stats.failed.append((image, str(data)))
                    continue
                key = sample_key(image)
                writer.add(f"{key}{os.path.splitext(image)[1]}", data)
                stats.images, stats.bytes = stats.images + 1, stats.bytes + len(data)
                if dataset.labels is not None:
                    label = str(dataset.labels[i]).encode()
                    writer.add(f"{key}.cls", label)
                    writer.listing.cls[f"{key}.cls"] = label.decode()
                    stats.labelled += 1
        size = writer.close()
        if tmp:
            os.replace(tmp, os.path.join(local_path(out) or "", name))
        _write_bytes(out, name + INDEX_SUFFIX, encode_index(writer.listing, size))
        stats.shards.append(name)
    return stats


def _existing_shards(out: str, prefix: str) -> list[str]:
    path = local_path(out)
    if path is not None:
        os.makedirs(path, exist_ok=True)
        return sorted(n for n in os.listdir(path) if n.startswith(f"{prefix}-"))
    fs, fs_path = filesystem(out)
    return sorted(fs.glob(f"{fs_path.rstrip('/')}/{prefix}-*"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runner.shard", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="any --images source: folder, ImageFolder, tar, shards")
    p.add_argument("out", help="folder or URL to write the shards to")
    p.add_argument("--labels", help="val_label.txt or imagenet-val (else the source's own)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (1000)")
    p.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar")
    p.add_argument("--limit", type=int, help="only the first N images")
    args = p.parse_args(argv)
    try:
        if args.shard_size < 1:
            raise DatasetError(f"--shard-size must be at least 1, got {args.shard_size}")
        dataset = load_dataset(args.images, args.labels, args.limit)
        taken = _existing_shards(args.out, args.prefix)
        if taken:
            raise DatasetError(f"{args.out} already holds {taken[0]}: remove the old shards "
                               "or write to another folder")
        stats = write_shards(dataset, args.out, args.shard_size, args.prefix)
    except (DatasetError, LabelError, OSError) as exc:
        print(f"shard: error: {exc}", file=sys.stderr)
        return 2
    problems = [(i.image, i.reason) for i in dataset.issues] + stats.failed
    for image, reason in problems[:SHOWN]:
        print(f"  not written: {image}: {reason}")
    if len(problems) > SHOWN:
        print(f"  ... and {len(problems) - SHOWN} more")
    print(f"shard: {stats.images} images ({stats.labelled} labelled, {dataset.label_rule}) in "
          f"{len(stats.shards)} shards of up to {args.shard_size} in {args.out}, "
          f"{stats.bytes / 1e6:.1f} MB of image bytes; {len(problems)} not written")
    return 4 if stats.failed else 0


if __name__ == "__main__":
    sys.exit(main())
