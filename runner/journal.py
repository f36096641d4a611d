"""What a run keeps on disk as it goes: the journal of finished batches and the logits.

Journal: append-only JSON lines.  The first line identifies the run (model, recipe, image
list, backend); every later line is one finished batch.  A driver killed mid-write leaves a
torn last line: it is cut off when the journal is reopened, so the batch it described is
simply run again.  ``--resume`` starts from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

import numpy as np


class JournalError(ValueError):
    """A journal that belongs to another run, or cannot be read."""


class Journal:
    def __init__(self, path: Path, header: dict[str, Any], resume: bool):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.appended = 0
        if resume and path.exists():
            self._reopen(header)
        else:
            with open(path, "w") as f:
                f.write(json.dumps({"run": header}) + "\n")
        self._file: IO[str] = open(path, "a")

    def _reopen(self, header: dict[str, Any]) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # torn last line from a crash: cut it before appending
            with open(self.path, "r+b") as f:
                f.truncate(end)
        lines = data[:end].decode().splitlines()
        if not lines:
            raise JournalError(f"--resume: {self.path} is empty")
        try:
            old = json.loads(lines[0])["run"]
        except (ValueError, KeyError):
            raise JournalError(f"--resume: {self.path} does not start with a run header") from None
        changed = sorted(k for k in header if old.get(k) != header[k])
        if changed:
            raise JournalError(
                f"--resume: {self.path} belongs to a different run ({', '.join(changed)} changed)"
            )
        try:
            self.records = [json.loads(line) for line in lines[1:]]
        except ValueError:
            raise JournalError(f"--resume: {self.path} has a corrupt line before its end") from None

    def append(self, *records: dict[str, Any]) -> None:
        """One line per record (a device call's batches), flushed together."""
        self._file.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self._file.flush()  # survives a driver crash; fsync would only add power-loss safety
        self.appended += len(records)

    def close(self) -> None:
        self._file.close()

    def discard_if_unused(self) -> None:
        """Remove a journal that holds only its header, so a run that failed before its first
        batch does not block the next run in the same folder."""
        self.close()
        if not self.records and not self.appended:
            self.path.unlink(missing_ok=True)


class LogitsFile:
    """``logits.npy`` ([images, classes] float32) filled in row by row as batches finish.

    Rows go in with positional writes, not through a memory map: a map's written pages
    stay in the driver's resident memory, which would then grow with the run (200 MB for
    50,000 images).  Rows never written read back as zeros.
    """

    def __init__(self, path: Path, rows: int, classes: int, resume: bool):
        if not (resume and path.exists()):
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, classes))
        existing = np.load(path, mmap_mode="r")
        if existing.shape != (rows, classes) or existing.dtype != np.float32:
            raise JournalError(f"--resume: {path} holds {existing.dtype} {existing.shape}, "
                               f"expected float32 {(rows, classes)}")
        self._offset, self._row_bytes = existing.offset, classes * 4
        del existing
        self._fd = os.open(path, os.O_WRONLY)

    def write(self, indices: np.ndarray, logits: np.ndarray) -> None:
        rows = np.ascontiguousarray(logits, dtype=np.float32)
        for i, row in zip(indices, rows, strict=True):
            if os.pwrite(self._fd, row.data, self._offset + int(i) * self._row_bytes) != row.nbytes:
                raise OSError(f"short write to logits.npy at row {int(i)} (disk full?)")

    def close(self) -> None:
        os.close(self._fd)
