"""Device runtimes behind one small interface.

A backend is opened once per device by that device's actor (nothing else opens a runtime),
describes the input it wants, runs one batch at a time and is closed at the end::

    backend = open_backend("onnxruntime", "model.onnx", device_id=0, options=BackendOptions())
    logits, seconds = backend.run(batch)   # seconds = time inside the runtime call only
    backend.close()

One file per runtime: ``ort`` (ONNX Runtime CPU/CUDA/CANN), ``acl`` (Ascend pyACL or
ais_bench), ``emulated`` (a latency model of an Ascend 310 chip).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

BACKENDS = ("onnxruntime", "acl", "emulated")


class BackendError(RuntimeError):
    """A runtime failed; the message names the call and is one line."""


@dataclass(frozen=True)
class InputSpec:
    """What one runtime call takes: ``shape[0]`` is -1 for a dynamic batch."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" (NCHW, normalised) or "uint8" (NHWC raw crops, e.g. AIPP)

    @property
    def layout(self) -> str:
        return "NHWC" if self.dtype == "uint8" else "NCHW"


@dataclass(frozen=True)
class BackendOptions:
    """Per-run settings; each backend reads the ones that concern it."""

    threads: int = 1  # onnxruntime CPU: intra-op threads of this device's session
    cores: tuple[int, ...] = ()  # onnxruntime CPU: pin the session's threads to these cores
    provider: str = "cpu"  # onnxruntime: "cpu" | "cuda" | "cann"
    precision: str = ""  # CANN precision_mode (--precision); refused for cpu/cuda
    emulated_latency_ms: float | None = None  # emulated: fixed ms per batch (else the table)
    extra: dict = field(default_factory=dict)


class Backend(Protocol):
    name: str  # "onnxruntime" | "acl" | "emulated"
    provider: str  # what really runs the model, e.g. "CPUExecutionProvider"
    emulated: bool  # True only for the latency model; reports label its figures
    precision: str  # the arithmetic it really runs, as far as the host can tell
    input: InputSpec
    num_classes: int

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, float]:
        """Logits [n, num_classes] float32 for ``batch`` and the seconds spent in the runtime."""
        ...

    def close(self) -> None: ...


def logical_device(device_id: int, visible: str | None) -> int:
    """The id to hand the runtime for physical chip ``device_id``.

    Under ``ASCEND_RT_VISIBLE_DEVICES`` (Ray sets it for an actor holding an NPU) the runtime
    numbers the visible chips from 0; the chip is ``device_id``'s position in the list when
    listed there, else the first visible chip.
    """
    if not visible or not visible.strip():
        return device_id
    ids = [part.strip() for part in visible.split(",")]
    return ids.index(str(device_id)) if str(device_id) in ids else 0


def open_backend(
    kind: str, model: str | Path | dict[int, Path] | None, device_id: int, options: BackendOptions
) -> Backend:
    """Open ``kind`` on ``device_id``; ``model`` may map batch size -> file (fixed-batch .om)."""
    if kind == "onnxruntime":
        from .ort import OrtBackend

        return OrtBackend(model, device_id, options)
    if kind == "acl":
        from .acl import AclBackend

        return AclBackend(model, device_id, options)
    if kind == "emulated":
        from .emulated import EmulatedBackend

        return EmulatedBackend(model, device_id, options)
    raise ValueError(f"--backend: unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
