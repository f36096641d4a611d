"""One writer per folder: an exclusive OS file lock held for the whole life of a run.

A run's ``--out``, a ``runner.prep`` output folder and a ``--cache`` entry being built each
have one writer at a time.  The writer locks a file (``FOLDER/.cardrunner.lock``; a cache
entry's is ``DIR/<key>.lock``) and writes its holder line into it (pid, host, start time,
command); a second writer finds the lock taken, reads the line and stops with one line that
names the holder.  The kernel drops the lock when the holder's process ends, however it ends,
so a crash never leaves a stale lock: the file stays, but only a held lock counts.

Which lock, as read in the Linux man pages fcntl(2) ("Open file description locks", "Record
locking and NFS") and flock(2) (NOTES), and in fs/locks.c ``fcntl_setlk``:

- Open file description locks (``F_OFD_SETLK``, Linux >= 3.15; the constant is in Python's
  ``fcntl`` since 3.9).  They belong to the open file, as flock() locks do: closing another
  descriptor of the same file (a library that reads it) does not drop them, whereas the
  process-owned POSIX locks of ``fcntl.lockf`` are dropped by *any* close of the file, and two
  opens in one process exclude each other.  They are byte-range locks that the kernel passes to
  the filesystem's own lock operation, so NFS takes them to the server (v3 through lockd, v4
  built in) and SMB as byte-range locks; flock() reaches an NFS server only by emulation
  (Linux >= 2.6.12) and an SMB server only since Linux 5.5, and stays on the client before.
- The locked byte lies far past the holder line: SMB byte-range locks are mandatory, and a
  lock over the line would stop the second run from reading who holds the folder.
- Where the platform has no OFD locks (macOS, BSD), ``flock()``.
- A lock that the filesystem refuses (ENOLCK: NFS without lockd; ENOSYS: Lustre without
  ``-o flock``; EOPNOTSUPP; EINVAL: a kernel without OFD locks) stops the run with one line:
  a run never goes on unlocked.
- Some mounts grant locks that other hosts never see: FUSE filesystems whose daemon does not
  implement locks (the kernel then locks on this host only: fs/fuse/file.c
  ``fuse_file_lock``), NFS mounted ``nolock`` or ``local_lock=posix|all`` (nfs(5)), SMB mounted
  ``nobrl``, Lustre mounted ``localflock``.  There the run goes on with a warning naming the
  mount: it keeps out runs of this host only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shlex
import socket
import struct
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from .config import ConfigError

LOCK_NAME = ".cardrunner.lock"
#: The locked byte: past any holder line, which others read while the lock is held.
LOCK_OFFSET = 1 << 20
MAX_COMMAND = 400
#: ``struct flock`` of 64-bit Linux (fcntl(2)): l_type, l_whence, l_start, l_len, l_pid
#: (0 for OFD locks), padded to 32 bytes.
FLOCK_STRUCT = "hhqqi4x"
#: Another open file holds the lock: fcntl(2) "EACCES or EAGAIN", flock(2) EWOULDBLOCK.
BUSY_ERRNOS = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK}
MOUNTINFO = Path("/proc/self/mountinfo")

_ofd_setlk: int | None = getattr(fcntl, "F_OFD_SETLK", None)
log = logging.getLogger("cardrunner")


class LockError(ConfigError):
    """A folder that cannot be locked; the message says why and what to do, in one line."""


class BusyError(LockError):
    """Another live process holds the lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what a second writer prints."""

    pid: int
    host: str
    started: str
    command: str

    @classmethod
    def this_process(cls) -> Holder:
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), started,
                   shlex.join(sys.orig_argv)[:MAX_COMMAND])

    def describe(self) -> str:
        command = " ".join(self.command.split())  # one line, whatever the arguments held
        return f"pid {self.pid} on {self.host}, started {self.started}: {command}"


def read_holder(path: Path) -> str:
    """The described holder line of a lock file, or why it cannot be told."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return f"holder unknown: cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
    if not text.strip():
        return "holder not recorded yet"
    try:
        return Holder(**json.loads(text)).describe()
    except (ValueError, TypeError):
        return f"holder unknown: {path} holds no holder line"


def _lock(fd: int) -> None:
    """Exclusive, non-blocking lock of the open file ``fd``; OSError when refused."""
    if _ofd_setlk is None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        fcntl.fcntl(fd, _ofd_setlk,
                    struct.pack(FLOCK_STRUCT, fcntl.F_WRLCK, os.SEEK_SET, LOCK_OFFSET, 1, 0))


class FileLock:
    """An exclusive lock on one file, held until ``release`` or the end of the process."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: Path, what: str, subject: str, advice: str = "") -> FileLock:
        """Lock ``path`` (created if missing) and write this process's holder line into it.

        Raises ``BusyError`` ("{what}: {subject} ({holder}){advice}") when another open file
        holds the lock, and ``LockError`` when the file cannot be opened or locked.
        """
        while True:
            fd = cls._open_and_lock(path, what, subject, advice)
            # A holder that removes its folder on release unlinks the file it locked: a lock
            # won on that unlinked file keeps nobody out, so it is taken again on the new one.
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            locked = os.fstat(fd)
            if current and (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
                break
            os.close(fd)
        lock = cls(path, fd)
        try:
            lock._record(Holder.this_process())
        except OSError as exc:
            lock.release()
            raise LockError(f"{what}: cannot write the lock file {path}: {exc.strerror}") from None
        scope = local_only(path)
        if scope:
            log.warning("%s: %s is on %s, so a run on another host would not be kept out",
                        what, path.parent, scope)
        return lock

    @staticmethod
    def _open_and_lock(path: Path, what: str, subject: str, advice: str) -> int:
        try:  # read-write: an exclusive lock needs write access (NFS checks it); the
            # descriptor is not inherited across exec (PEP 446), so no child process of
            # this one (Ray's) keeps the lock alive after it
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LockError(f"{what}: cannot open the lock file {path}: {exc.strerror}") from None
        try:
            _lock(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in BUSY_ERRNOS:
                raise BusyError(f"{what}: {subject} ({read_holder(path)}){advice}") from None
            name = errno.errorcode.get(exc.errno or 0, "?")
            raise LockError(
                f"{what}: cannot lock {path} ({name}: {exc.strerror}): this filesystem refuses "
                "file locks, so nothing would keep a second run out; use a local disk or a "
                "network filesystem with locking (NFS with lockd or v4, SMB)") from None
        return fd

    def _record(self, holder: Holder) -> None:
        data = (json.dumps(asdict(holder)) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)  # other NFS clients see the line once it is on the server

    def release(self) -> None:
        """Drop the lock (closing the last descriptor of the open file does it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold_run_folder(folder: str | Path, what: str = "--out") -> FileLock:
    """Create ``folder`` if needed and lock it for this process (``FOLDER/.cardrunner.lock``).

    ``what`` names the flag or argument in the one-line errors.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LockError(f"{what}: {folder} exists and is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LockError(f"{what}: cannot create {folder}: {exc.strerror}") from None
    return FileLock.acquire(folder / LOCK_NAME, what, f"{folder} is in use by another run",
                            f"; wait for it to end or choose another {what}")


class RunFolders:
    """The run folders one process writes: each locked once, all released together.

    A folder that the lock itself created, for a run that never started (``used`` was not
    called: a run refused by a late check), is removed again if it holds nothing but the
    lock file, so a refused run leaves no trace."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[FileLock, bool]] = {}

    def hold(self, folder: str | Path, what: str = "--out") -> None:
        key = os.path.realpath(folder)
        if key not in self._held:
            created = not os.path.exists(key)
            self._held[key] = hold_run_folder(folder, what), created

    def used(self, folder: str | Path) -> None:
        """A run started in ``folder``: it stays, whatever it holds."""
        key = os.path.realpath(folder)
        lock, _ = self._held[key]
        self._held[key] = lock, False

    def release(self) -> None:
        held, self._held = self._held, {}
        for folder, (lock, unused) in held.items():
            if unused and os.listdir(folder) == [LOCK_NAME]:
                lock.path.unlink()  # still locked: a waiting opener sees the file vanish
                os.rmdir(folder)
            lock.release()


# --------------------------------------------------------------------------- lock scope


def local_only(path: Path) -> str | None:
    """Why locks on ``path``'s mount would not reach other hosts; None when they do or when
    the mount cannot be told (no /proc/self/mountinfo: not Linux)."""
    try:
        mountinfo = MOUNTINFO.read_text()
    except OSError:
        return None
    mount = mount_of(path, mountinfo)
    return local_only_reason(*mount) if mount else None


def mount_of(path: Path, mountinfo: str) -> tuple[str, set[str]] | None:
    """(filesystem type, mount and superblock options) of the mount holding ``path``, from
    the text of /proc/self/mountinfo (proc(5)): the longest mount point above it, the last
    one mounted where several share a point."""
    target = os.path.realpath(path)
    best: tuple[int, str, set[str]] | None = None
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 6 or not rest:
            continue
        point = _unescape(fields[4])
        if target != point and not target.startswith(point.rstrip("/") + "/"):
            continue
        if best is None or len(point) >= best[0]:
            options = set(fields[5].split(",")) | set(rest[-1].split(","))
            best = (len(point), rest[0], options)
    return (best[1], best[2]) if best else None


def local_only_reason(fstype: str, options: set[str]) -> str | None:
    """Why a mount of this type and these options keeps locks on this host, or None."""
    if fstype == "fuse" or fstype.startswith("fuse."):
        return (f"{fstype}, a FUSE filesystem whose locks reach other hosts only if its daemon "
                "implements them")
    local = {"nfs": {"nolock", "local_lock=posix", "local_lock=all"},
             "nfs4": {"local_lock=posix", "local_lock=all"},
             "cifs": {"nobrl"}, "smb3": {"nobrl"}, "lustre": {"localflock"}}
    found = sorted(options & local.get(fstype, set()))
    return f"{fstype} mounted with {found[0]}, which keeps locks on this host" if found else None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
