"""An *emulated* Ascend 310 chip: real timing model, no real computation.

Each batch takes the latency the guide measured on a 310 (REFERENCE.md section 6),
interpolated between the measured batch sizes, spent in ``time.sleep`` so the host core
stays free.  The logits are a deterministic function of each image's own bytes, so a test
can recompute them and prove that no image was swapped, dropped or scored twice.
Every figure produced with this backend is emulated and reports say so.
"""

from __future__ import annotations

import os
import time
import zlib
from itertools import pairwise
from pathlib import Path

import numpy as np

from . import BackendError, BackendOptions, InputSpec

#: Ascend 310, EfficientNet-B3, ms per batch implied by the guide's figures.
LATENCY_MS_310 = {1: 8.29, 4: 25.5, 8: 48.4, 16: 95.2, 32: 186.9}
NUM_CLASSES = 1000


def batch_latency_ms(batch: int, table: dict[int, float] = LATENCY_MS_310) -> float:
    """Linear interpolation in the table; linear extrapolation beyond its ends."""
    sizes = sorted(table)
    if batch <= sizes[0]:
        return table[sizes[0]] * batch / sizes[0]
    for lo, hi in pairwise(sizes):
        if batch <= hi:
            return table[lo] + (table[hi] - table[lo]) * (batch - lo) / (hi - lo)
    lo, hi = sizes[-2], sizes[-1]
    return table[hi] + (table[hi] - table[lo]) * (batch - hi) / (hi - lo)


def emulated_logits(image: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """The logits the emulated chip returns for one image: seeded by a CRC of its bytes."""
    seed = zlib.crc32(np.ascontiguousarray(image).data)
    return np.random.default_rng(seed).standard_normal(num_classes, dtype=np.float32)


class EmulatedBackend:
    """Takes what an AIPP ``.om`` takes: uint8 NHWC crops (no host-side float conversion)."""

    name = "emulated"
    provider = "emulated Ascend 310 (latency model, no real chip)"
    emulated = True
    precision = "emulated"

    def __init__(self, model: str | Path | dict | None, device_id: int, options: BackendOptions):
        size = int(options.extra.get("image_size", 300))
        self.input = InputSpec("image", (-1, size, size, 3), "uint8")
        self.num_classes = NUM_CLASSES
        self.device_id = device_id
        self._fixed_ms = options.emulated_latency_ms
        # Test-only fault hook (no CLI flag): {"after": n, "mode": "raise" | "exit" | "hang"}
        # makes this chip fail on its (n+1)-th batch: it raises, kills its actor process, or
        # never returns; {"mode": "close"} makes its teardown raise.
        self._fault = options.extra.get("fault")
        self._batches = 0

    def latency_s(self, batch: int) -> float:
        ms = self._fixed_ms if self._fixed_ms is not None else batch_latency_ms(batch)
        return ms / 1000.0

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, float]:
        if self._fault and self._fault["mode"] != "close" and self._batches >= self._fault["after"]:
            if self._fault["mode"] == "exit":
                os._exit(1)
            if self._fault["mode"] == "hang":
                time.sleep(24 * 3600)
            raise BackendError(f"emulated chip {self.device_id}: injected fault")
        self._batches += 1
        t0 = time.perf_counter()
        logits = np.stack([emulated_logits(img, self.num_classes) for img in batch])
        deadline = t0 + self.latency_s(len(batch))
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return logits, time.perf_counter() - t0

    def close(self) -> None:
        if self._fault and self._fault["mode"] == "close":
            raise BackendError(f"emulated chip {self.device_id}: injected teardown fault")
