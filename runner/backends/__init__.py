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


def logical_device(device_id: int, visible: str | None, variable: str) -> int:
    """The id to hand the runtime for chip ``device_id`` when ``variable`` holds ``visible``.

    The runtime numbers the chips it sees from 0: the chip is its position in the list as the
    runtime reads it (CANN: ``acl_devices.cann_visible_ids``, which stops at the first space).
    The device actor narrows the variable to its one chip (runner.binding), which may be a GPU
    UUID: a single entry that is not a number is that chip. Any other miss is an error, never
    another chip.
    """
    if not visible or not visible.strip():
        return device_id
    if variable == "ASCEND_RT_VISIBLE_DEVICES":
        from .acl_devices import cann_visible_ids  # imports this module: not at the top

        ids = [str(i) for i in cann_visible_ids(visible)]
    else:
        ids = [part.strip() for part in visible.split(",")]
    if str(device_id) in ids:
        return ids.index(str(device_id))
    if len(ids) == 1 and not ids[0].isdecimal():
        return 0
    raise BackendError(
        f"{variable}={visible!r}: the runtime reads chips {ids}; chip {device_id} is not among them"
    )


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
