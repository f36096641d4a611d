"""Where an image's bytes live, and how any node reads them.

A location is a file (a local path or an fsspec URL) or a ``Member`` of a tar: a shard, or
the official val tar, read in place by byte range and never extracted.  ``read_images`` is
what preprocessing actors call on whichever node they run: it needs no shared filesystem,
only the location, and opens ``s3://``, ``gs://`` and ``http(s)://`` through fsspec (the
``remote`` extra brings fsspec and the filesystem packages).  Remote endpoints and
credentials come from the environment of the process that reads (e.g. ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``FSSPEC_S3_ENDPOINT_URL``): see ``forwarded_env``.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import one_line
from .preprocess import ImageError, read_file

#: Consecutive members of one tar at most this far apart are fetched with one read: a
#: remote request costs far more than the few header and label bytes between images.
MAX_GAP = 1 << 20
#: Attempts of a remote read before its images are reported as unreadable.
RETRIES = 3
RETRY_WAIT_S = 0.5
#: Environment variables that decide how fsspec's filesystems reach a store.
ENV_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_", "GCSFS_", "S3FS_")
#: How s3fs/gcsfs translate a request the store refused (4xx): invalid (a range past the end),
#: absent, denied.
CLIENT_ERRNOS = {errno.EINVAL, errno.ENOENT, errno.EACCES, errno.EPERM}

T = TypeVar("T")


class DatasetError(ValueError):
    """A data set that cannot be used at all (one line, names the path or URL)."""


@dataclass(frozen=True)
class Member:
    """One file inside a tar (a shard, or the official val tar)."""

    url: str  # the tar: a local path or an fsspec URL
    offset: int  # byte offset of the member's data in the tar
    size: int  # bytes
    name: str  # "<tar file name>:<member name>", for messages

    @property
    def end(self) -> int:
        return self.offset + self.size


Location = str | Member


def is_url(location: str) -> bool:
    return "://" in location


def local_path(location: str) -> str | None:
    """The local path of a location, or None for a remote URL (``file://`` is local)."""
    if location.startswith("file://"):
        return location[len("file://"):]
    return None if is_url(location) else location


def filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` and the path within it; a missing package or an
    unknown protocol is a one-line ``DatasetError`` naming the extra to install."""
    try:
        import fsspec
    except ImportError:
        raise DatasetError(f"{url}: reading URLs needs fsspec: pip install "
                           "'cardrunner[remote]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:  # fsspec's own "Install s3fs to access S3"
        raise DatasetError(f"{url}: {exc} (pip install 'cardrunner[remote]')") from None
    except ValueError as exc:  # "Protocol not known: ..."
        raise DatasetError(f"{url}: {exc}") from None


def with_retries(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, tried again after a pause when a remote read fails for a
    reason that may pass (a dropped connection, a throttled request): an absent object or a
    refused credential fails at once."""
    for attempt in range(RETRIES - 1):
        try:
            return call(*args, **kwargs)
        except (FileNotFoundError, PermissionError, IsADirectoryError, DatasetError):
            raise
        # Network failures arrive as OSError (s3fs translates botocore's), aiohttp's
        # ClientError and botocore's own types, which share no base but Exception.
        except Exception as exc:  # noqa: BLE001
            status = getattr(exc, "status", None)  # aiohttp's ClientResponseError (http)
            if (isinstance(exc, OSError) and exc.errno in CLIENT_ERRNOS) or (
                    isinstance(status, int) and 400 <= status < 500):
                raise  # the store refused the request itself: asking again will not help
            time.sleep(RETRY_WAIT_S * 2**attempt)
    return call(*args, **kwargs)


def read_range(url: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of ``url``, fewer where the file ends earlier."""
    path = local_path(url)
    if path is not None:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(stop - start)
    fs, fs_path = filesystem(url)
    return with_retries(fs.cat_file, fs_path, start=start, end=stop)


def _read_one_file(location: str) -> bytes | ImageError:
    path = local_path(location)
    try:
        if path is not None:
            return read_file(path)
        fs, fs_path = filesystem(location)
        return with_retries(fs.cat_file, fs_path)
    except ImageError as exc:
        return exc
    except FileNotFoundError:
        return ImageError(f"file not found: {location}")
    except Exception as exc:  # noqa: BLE001 - remote failures: see with_retries
        return ImageError(f"cannot read {location}: {one_line(exc)}")


def _read_members(members: list[Member]) -> list[bytes | ImageError]:
    """Members of one tar in ascending order, fetched with a single ranged read."""
    first = members[0]
    start, stop = first.offset, max(m.end for m in members)
    try:
        data = read_range(first.url, start, stop)
    except FileNotFoundError:
        return [ImageError(f"{m.name}: shard not found: {m.url}") for m in members]
    except Exception as exc:  # noqa: BLE001 - remote failures: see with_retries
        return [ImageError(f"{m.name}: cannot read: {one_line(exc)}") for m in members]
    ends_at = start + len(data)
    out: list[bytes | ImageError] = []
    for m in members:
        if m.end > ends_at:
            out.append(ImageError(f"{m.name}: truncated tar member: its data runs to byte "
                                  f"{m.end} but the shard ends at byte {ends_at}"))
        else:
            out.append(data[m.offset - start : m.end - start])
    return out


def read_images(locations: list[Location]) -> list[bytes | ImageError]:
    """The bytes of each location, in order; an ``ImageError`` (one line naming the file,
    or shard and member) where it cannot be read.  Consecutive members of one tar, in
    ascending order and less than ``MAX_GAP`` apart, are read with one ranged read."""
    out: list[bytes | ImageError] = []
    i, n = 0, len(locations)
    while i < n:
        loc = locations[i]
        if not isinstance(loc, Member):
            out.append(_read_one_file(loc))
            i += 1
            continue
        j = i + 1
        while j < n:
            nxt, prev = locations[j], locations[j - 1]
            if not (isinstance(nxt, Member) and nxt.url == loc.url
                    and 0 <= nxt.offset - prev.end <= MAX_GAP):
                break
            j += 1
        out += _read_members(locations[i:j])  # type: ignore[arg-type]
        i = j
    return out


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables that tell fsspec/boto/gcsfs where a store is and who is asking, to
    hand to processes that do not inherit this one's environment (Ray workers on nodes
    started elsewhere)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIXES)}
