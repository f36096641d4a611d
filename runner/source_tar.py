"""The members of a tar, found without extracting it: from its index, or from its headers.

A shard written by ``runner.shard`` has a small index beside it, ``<shard>.index.json``::

    {"format": "cardrunner-tar-index", "version": 1, "tar_size": 10854400,
     "members": [["ILSVRC2012_val_00000293.JPEG", 1536, 110234], ...],
     "cls": {"ILSVRC2012_val_00000293.cls": "65", ...}}

``members`` holds each regular file's name, the byte offset of its data and its size, in tar
order; ``cls`` the text of each ``<key>.cls`` member, so that listing a remote shard costs
one small read instead of a request per label.  An index whose ``tar_size`` differs from
the tar's (a truncated or rewritten shard) is not trusted: the tar's headers are read
instead, through ranged reads where it is remote (one request per member).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import one_line
from .sources import DatasetError, filesystem, local_path, with_retries

INDEX_SUFFIX = ".index.json"
INDEX_FORMAT = "cardrunner-tar-index"
INDEX_VERSION = 1
#: ``.cls`` members longer than this are not labels (a class index is a few digits).
MAX_CLS_BYTES = 64
#: Bytes fetched per header when a remote tar is read without an index: a header (512
#: bytes) and, usually, the small ``.cls`` member that follows it.
SCAN_BLOCK = 1 << 14
#: Shards whose sizes and indexes are fetched together (concurrently where fsspec can).
CHUNK = 32
#: fs.info keys that identify an object's version, in order of preference.
VERSION_KEYS = ("ETag", "etag", "generation", "VersionId", "mtime", "LastModified",
                "last_modified", "updated", "created")


@dataclass(frozen=True)
class TarEntry:
    name: str
    offset: int  # of the data
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass
class TarListing:
    """What a tar holds: its regular files, the text of its ``.cls`` members, the reason
    listing stopped early (an unreadable or truncated header), if it did, and the members
    that its index lists but that the tar no longer holds."""

    entries: list[TarEntry]
    cls: dict[str, str] = field(default_factory=dict)
    problem: str | None = None
    lost: list[TarEntry] = field(default_factory=list)


@dataclass
class ShardListing:
    url: str
    size: int
    version: str  # ETag, generation or mtime: with url and size, the shard's identity
    listing: TarListing


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's sample key and extension: the path up to the first dot of the file
    name, and the rest (``a/b.seg.png`` -> ``a/b``, ``seg.png``); webdataset's
    ``tariterators.base_plus_ext`` splits the same way."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def index_url(tar_url: str) -> str:
    return tar_url + INDEX_SUFFIX


def encode_index(listing: TarListing, tar_size: int) -> bytes:
    return json.dumps({
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "tar_size": tar_size,
        "members": [[e.name, e.offset, e.size] for e in listing.entries],
        "cls": listing.cls,
    }, separators=(",", ":")).encode()


def decode_index(data: bytes, where: str) -> tuple[int, TarListing]:
    """(tar size the index was written for, the listing it holds); a malformed index is a
    ``DatasetError`` naming it."""
    try:
        obj = json.loads(data)
        if obj.get("format") != INDEX_FORMAT or obj.get("version") != INDEX_VERSION:
            raise ValueError(f"not {INDEX_FORMAT} version {INDEX_VERSION}")
        entries = [TarEntry(str(n), int(o), int(s)) for n, o, s in obj["members"]]
        cls = {str(k): str(v) for k, v in obj["cls"].items()}
        return int(obj["tar_size"]), TarListing(entries, cls)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DatasetError(f"--images: {where} is not a usable shard index ({exc}); delete "
                           "it and the shard is listed from its headers") from None


def _open_for_scan(url: str) -> IO[bytes]:
    path = local_path(url)
    if path is not None:
        return open(path, "rb")
    fs, fs_path = filesystem(url)
    # Read-ahead of one small block per seek: each header costs one ranged request, and
    # the image data between headers is never fetched.
    return fs.open(fs_path, "rb", block_size=SCAN_BLOCK, cache_type="readahead")


def scan_tar(url: str, size: int) -> TarListing:
    """Every regular member of the tar at ``url`` (``size`` bytes), from its headers:
    ``tarfile`` seeks from header to header, so only headers and ``.cls`` members are read."""
    listing = TarListing([])
    try:
        with _open_for_scan(url) as f:
            try:
                tar = tarfile.open(fileobj=f, mode="r:")
            except tarfile.ReadError as exc:
                listing.problem = f"not an uncompressed tar file ({exc})"
                return listing
            try:
                for info in tar:
                    if not info.isfile():
                        continue
                    listing.entries.append(TarEntry(info.name, info.offset_data, info.size))
                    if split_key(info.name)[1] == "cls" and info.size <= MAX_CLS_BYTES:
                        listing.cls[info.name] = _read_text(tar, info)
            except (tarfile.TarError, OSError, EOFError) as exc:
                listing.problem = f"unreadable after {len(listing.entries)} members ({exc})"
            else:
                # tarfile ends quietly at a header cut short or missing; a whole tar has at
                # least one zero block (POSIX: two) after its last member.
                if tar.offset + tarfile.BLOCKSIZE > size:
                    listing.problem = (f"ends after {len(listing.entries)} members without the "
                                       "end-of-archive blocks: the shard looks truncated")
    except FileNotFoundError:
        raise DatasetError(f"--images: shard {url} does not exist") from None
    return listing


def _read_text(tar: tarfile.TarFile, info: tarfile.TarInfo) -> str:
    member = tar.extractfile(info)
    assert member is not None  # a regular file always has data
    return member.read().decode("utf-8", errors="replace")


def _version(info: dict[str, Any]) -> str:
    for key in VERSION_KEYS:
        if info.get(key) is not None:
            return f"{key}={info[key]}"
    return ""


def _stat(urls: list[str], folders: dict[str, dict[str, dict]]) -> dict[str, tuple[int, str]]:
    """(size, version) of each tar: os.stat locally; remotely one listing per folder of an
    object store (cached in ``folders``), and ``info`` for what a listing does not give."""
    out = {}
    for url in urls:
        path = local_path(url)
        if path is not None:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise DatasetError(f"--images: shard {url} does not exist") from None
            out[url] = (st.st_size, f"mtime={st.st_mtime_ns}")
            continue
        fs, fs_path = filesystem(url)
        parent = url.rsplit("/", 1)[0]
        if parent not in folders:
            folders[parent] = {}
            if not url.startswith(("http://", "https://")):
                folder = fs_path.rsplit("/", 1)[0]
                fs.invalidate_cache(folder)  # s3fs/gcsfs keep listings: a shard may be new
                try:
                    listed = with_retries(fs.ls, folder, detail=True)
                    folders[parent] = {e["name"]: e for e in listed}
                except FileNotFoundError:
                    pass
        info = folders[parent].get(fs_path)
        if info is None or info.get("size") is None:
            try:
                info = with_retries(fs.info, fs_path)
            except FileNotFoundError:
                raise DatasetError(f"--images: shard {url} does not exist") from None
        if info.get("size") is None:
            raise DatasetError(f"--images: {url}: the server does not say the shard's size")
        out[url] = (int(info["size"]), _version(info))
    return out


def _read_indexes(urls: list[str]) -> dict[str, bytes | None]:
    """Each tar's index, or None where it has none; remote ones fetched together."""
    out: dict[str, bytes | None] = {}
    remote: dict[str, str] = {}
    for url in urls:
        path = local_path(url)
        if path is None:
            remote[url] = filesystem(index_url(url))[1]
            continue
        try:
            with open(path + INDEX_SUFFIX, "rb") as f:
                out[url] = f.read()
        except FileNotFoundError:
            out[url] = None
    if remote:
        fs = filesystem(index_url(next(iter(remote))))[0]
        got = fs.cat(list(remote.values()), on_error="return")
        for url, path in remote.items():
            data = got.get(path, FileNotFoundError())
            if isinstance(data, FileNotFoundError):
                out[url] = None
            elif isinstance(data, BaseException):
                try:
                    out[url] = with_retries(fs.cat_file, path)
                except FileNotFoundError:
                    out[url] = None
                except Exception as exc:  # noqa: BLE001 - see sources.with_retries
                    raise DatasetError(f"--images: cannot read {index_url(url)}: "
                                       f"{one_line(exc)}") from None
            else:
                out[url] = data
    return out


def list_shard(url: str, size: int, version: str, index: bytes | None) -> ShardListing:
    """One tar's members: from its index when the index was written for a tar of this
    size, else from its headers (naming what the index listed that the tar lost)."""
    stale = None
    if index is not None:
        indexed_size, listing = decode_index(index, index_url(url))
        if indexed_size == size:
            return ShardListing(url, size, version, listing)
        stale = listing
    listing = scan_tar(url, size)
    if stale is not None:
        found = {e.name for e in listing.entries}
        listing.lost = [e for e in stale.entries if e.name not in found]
    return ShardListing(url, size, version, listing)


def list_tars(urls: list[str]) -> Iterator[ShardListing]:
    """Each tar's listing, in order; lazily, so that a ``--limit`` run stops early."""
    folders: dict[str, dict[str, dict]] = {}
    for start in range(0, len(urls), CHUNK):
        chunk = urls[start : start + CHUNK]
        stats = _stat(chunk, folders)
        indexes = _read_indexes(chunk)
        for url in chunk:
            yield list_shard(url, *stats[url], indexes[url])
