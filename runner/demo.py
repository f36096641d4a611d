"""A self-contained demo: synthetic ImageNet-like JPEGs and a random-init EfficientNet-B3.

The weights are untrained, so accuracy is chance; only throughput means anything.
Both are cached (seeded, so every machine makes the same files).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

#: (width, height) of common ImageNet validation images, most frequent first.
SIZES = [(500, 375), (500, 333), (375, 500), (500, 500), (333, 500), (500, 400),
         (640, 480), (500, 334), (800, 600), (1024, 768), (400, 300), (500, 281)]
GRAYSCALE_SHARE = 0.03


def cache_dir() -> Path:
    return Path(os.environ.get("CARDRUNNER_CACHE", Path.home() / ".cache" / "cardrunner"))


def synthetic_image(rng: np.random.Generator, width: int, height: int, gray: bool) -> Image.Image:
    """Smooth colour fields plus fine noise: JPEG sizes and decode cost like real photos."""
    grid = (int(rng.integers(3, 12)), int(rng.integers(3, 12)), 3)
    coarse = rng.integers(0, 256, size=grid, dtype=np.uint8)
    base = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    noise = rng.normal(0, 18, size=(height, width, 1)).astype(np.int16)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels)
    return im.convert("L") if gray else im


def make_images(folder: Path, count: int, seed: int = 0) -> Path:
    """At least ``count`` JPEGs plus a ``val_label.txt`` that labels every one of them.

    The set only grows: files made for a larger demo are kept and stay labelled.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    total = max(count, len(list(folder.glob("ILSVRC2012_val_*.JPEG"))))
    for i in range(1, total + 1):
        # Draw every value even for files that exist, so file i is the same for any count.
        w, h = SIZES[min(int(rng.exponential(3.0)), len(SIZES) - 1)]
        gray = rng.random() < GRAYSCALE_SHARE
        label = int(rng.integers(0, 1000))
        img_seed = int(rng.integers(0, 2**31))
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        lines.append(f"{name} {label}\n")
        path = folder / name
        if not path.exists():
            img = synthetic_image(np.random.default_rng(img_seed), w, h, gray)
            tmp = path.with_suffix(".tmp")
            img.save(tmp, format="JPEG", quality=90)
            tmp.replace(path)
    (folder / "val_label.txt").write_text("".join(lines))
    return folder / "val_label.txt"


def make_model(path: Path, seed: int = 0) -> Path:
    """Random-init EN-B3 ONNX through the converter (a subprocess: the runner has no torch)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.onnx")
    cmd = [sys.executable, "-m", "convert.pth2onnx", "--arch", "EN-B3", "--random-init",
           "--seed", str(seed), str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(
            f"--demo: building the random-init EN-B3 failed ({msg}); the demo needs the "
            "converter's extra: pip install -e '.[convert]'"
        )
    tmp.replace(path)
    return path


def prepare(count: int) -> tuple[Path, Path, Path]:
    """(images folder, labels file, model) for a demo of ``count`` images."""
    root = cache_dir() / "demo"
    images = root / "images"
    labels = make_images(images, count)
    model = make_model(root / "efficientnet_b3_random_seed0.onnx")
    return images, labels, model
