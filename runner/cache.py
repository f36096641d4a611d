"""Decoded crop cache (``--cache DIR``): decode a dataset once, then read crops at memory speed.

One cache holds the recipe's crops (its wire dtype, ``[N, crop, crop, 3]``) for one image list
in a single raw file under ``DIR/<key>/``, read through a read-only ``np.memmap``.  The key
hashes everything that determines the bytes: the recipe's fields, the dataset fingerprint
(root, names, sizes, modification times), the image count, the decoder library versions and
the cache format.
So a different recipe or file list lives under a different key; nothing is ever overwritten
by a run that would produce other bytes.

Building: the driver ``open``s the cache (which takes an exclusive build lock), preprocessing
actors each get a ``writer()`` for their disjoint shard and append what they stored or failed
on to their own record file as they go, and the driver calls ``finalize()`` at the end.
Only ``finalize`` writes ``manifest.json`` (atomically), after checking that every index is
stored or a recorded error.  A cache without a valid manifest (a crashed or resumed run) is
never read: the next ``open`` rebuilds it from scratch.  Caches of other keys are never
touched (delete old ``DIR/<key>`` folders by hand); ``DIR/<key>.lock`` is the build lock
(``runner.runlock``'s, with the builder's holder line), released when the building driver
finalizes, closes or dies.

The directory must be the same path on every node that runs a preprocessing actor (one
host, or a shared filesystem).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import PIL

from .preprocess import Recipe
from .runlock import BusyError, FileLock, LockError

#: Bump when the file layout or the meaning of its bytes changes.
FORMAT_VERSION = 1
CROPS = "crops.raw"
MANIFEST = "manifest.json"
RECORDS = "records"


class CacheError(RuntimeError):
    """A cache that cannot be used; the message says why in one line."""


class CacheBusyError(CacheError):
    """Another run holds the build lock of this cache."""


def cache_key(recipe: Recipe, count: int, fingerprint: str) -> str:
    """Identity of the cache's bytes (see the module docstring for what goes in)."""
    ident = {
        "format": FORMAT_VERSION,
        "recipe": dataclasses.asdict(recipe),
        "images": fingerprint,
        "count": count,
        "pillow": PIL.__version__,
        "opencv": cv2.__version__,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


class CropCache:
    """One dataset's crops for one recipe; picklable, so actors receive it as an argument."""

    def __init__(self, directory: Path, recipe: Recipe, count: int, key: str):
        self.directory = directory
        self.recipe = recipe
        self.count = count
        self.key = key
        self.complete = False
        self.errors: dict[int, str] = {}  # index -> reason, filled once complete
        self._lock: FileLock | None = None  # build lock, held by the driver only
        self._crops: np.memmap | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, root: str | Path, recipe: Recipe, count: int, fingerprint: str) -> CropCache:
        """A complete cache to read, or an empty one (partial data erased) to build.

        Raises ``CacheBusyError`` (naming the builder) when another live run is building the
        same cache, and ``CacheError`` when the disk cannot hold it or its filesystem refuses
        locks.
        """
        if count < 1:
            raise ValueError("a crop cache needs at least one image")
        key = cache_key(recipe, count, fingerprint)
        root = Path(root)
        cache = cls(root / key, recipe, count, key)
        if cache._load_manifest():
            return cache
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"--cache: cannot create {root}: {exc.strerror}") from None
        try:
            cache._lock = FileLock.acquire(root / f"{key}.lock", "--cache",
                                           f"{cache.directory} is being built by another run")
        except BusyError as exc:
            raise CacheBusyError(str(exc)) from None
        except LockError as exc:
            raise CacheError(str(exc)) from None
        try:
            if cache._load_manifest():  # another run finished it since our first look
                cache.close()
                return cache
            cache._create()
        except BaseException:
            cache.close()
            raise
        return cache

    @property
    def shape(self) -> tuple[int, int, int, int]:
        c = self.recipe.crop
        return (self.count, c, c, 3)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.recipe.wire_dtype).itemsize

    def _load_manifest(self) -> bool:
        """Accept the manifest only if it describes exactly this cache's file."""
        try:
            m = json.loads((self.directory / MANIFEST).read_text())
            ok = (
                m["format"] == FORMAT_VERSION
                and m["key"] == self.key
                and m["count"] == self.count
                and m["bytes"] == self.nbytes
                and (self.directory / CROPS).stat().st_size == self.nbytes
            )
            errors = {int(i): str(r) for i, r in m["errors"].items()} if ok else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        if ok:
            self.errors, self.complete = errors, True
        return ok

    def _create(self) -> None:
        """Erase whatever a previous run left and make a sparse file of the full size."""
        shutil.rmtree(self.directory, ignore_errors=True)
        (self.directory / RECORDS).mkdir(parents=True)
        free = shutil.disk_usage(self.directory).free
        if free < self.nbytes:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise CacheError(
                f"--cache: {self.directory} needs {self.nbytes / 1e9:.1f} GB, "
                f"only {free / 1e9:.1f} GB free"
            )
        with open(self.directory / CROPS, "wb") as f:
            f.truncate(self.nbytes)  # sparse: no data written until a writer puts it

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_lock"] = state["_crops"] = None  # the lock stays with the driver
        return state

    # ------------------------------------------------------------------ reading

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Crops of ``indices`` (stored ones only): a zero-copy view for a contiguous run."""
        if not self.complete:
            raise CacheError(f"cache {self.directory} is not complete")
        if self._crops is None:
            self._crops = np.memmap(
                self.directory / CROPS, self.recipe.wire_dtype, "r", shape=self.shape
            )
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
            return self._crops[idx[0] : idx[0] + len(idx)].view(np.ndarray)
        return np.asarray(self._crops[idx])

    def batch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """What a preprocessing actor returns for ``indices``: crops, their indices, errors."""
        wanted = [int(i) for i in indices]
        kept = np.asarray([i for i in wanted if i not in self.errors], dtype=np.int64)
        errors = [(i, self.errors[i]) for i in wanted if i in self.errors]
        return self.read(kept), kept, errors

    # ------------------------------------------------------------------ building

    def writer(self) -> CacheWriter:
        """A writer for one process's share of the indices (any process, any time)."""
        if self.complete:
            raise CacheError(f"cache {self.directory} is complete: nothing to write")
        return CacheWriter(self)

    def finalize(self) -> bool:
        """Mark the cache complete if every index is stored or an error; False if not.

        Call it once all writers are done (their records are read from disk, so writers
        that were killed without ``close`` still count for what they recorded).
        """
        if self.complete:
            return True
        if self._lock is None:
            raise CacheError("finalize() belongs to the run that opened the cache for building")
        stored = np.zeros(self.count, dtype=bool)
        errors: dict[int, str] = {}
        for path in (self.directory / RECORDS).glob("*.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # torn last line of a killed writer
                    continue
                if len(rec) == 1:
                    stored[rec[0]] = True
                else:
                    errors[rec[0]] = rec[1]
        errors = {i: r for i, r in errors.items() if not stored[i]}
        if int(stored.sum()) + len(errors) < self.count:
            return False
        fd = os.open(self.directory / CROPS, os.O_RDONLY)
        try:
            os.fsync(fd)  # every writer's pages, before the manifest vouches for them
        finally:
            os.close(fd)
        manifest = {
            "format": FORMAT_VERSION,
            "key": self.key,
            "count": self.count,
            "bytes": self.nbytes,
            "dtype": self.recipe.wire_dtype,
            "shape": list(self.shape),
            "recipe": dataclasses.asdict(self.recipe),
            "errors": {str(i): errors[i] for i in sorted(errors)},
        }
        tmp = self.directory / f".{MANIFEST}.tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / MANIFEST)
        shutil.rmtree(self.directory / RECORDS, ignore_errors=True)
        self.errors, self.complete = errors, True
        self.close()
        return True

    def close(self) -> None:
        """Release the build lock (a crashed driver releases it by exiting)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class CacheWriter:
    """Puts crops into the shared file and records each one in its own record file.

    The crop is copied into the mapping before its record is appended, so a record never
    names a crop that is not in the file, even if the process is killed right after.
    """

    def __init__(self, cache: CropCache):
        self.count = cache.count
        self._crops = np.memmap(
            cache.directory / CROPS, cache.recipe.wire_dtype, "r+", shape=cache.shape
        )
        name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._fd = os.open(
            cache.directory / RECORDS / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )

    def put(self, index: int, crop: np.ndarray) -> None:
        self._check(index)
        if crop.shape != self._crops.shape[1:] or crop.dtype != self._crops.dtype:
            raise ValueError(
                f"crop {crop.dtype}{list(crop.shape)} does not fit the cache "
                f"({self._crops.dtype}{list(self._crops.shape[1:])})"
            )
        self._crops[index] = crop
        os.write(self._fd, b"[%d]\n" % index)

    def put_error(self, index: int, reason: str) -> None:
        self._check(index)
        os.write(self._fd, (json.dumps([int(index), reason]) + "\n").encode())

    def _check(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} outside the cache's 0..{self.count - 1}")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            del self._crops
