"""Ascend backend: fixed-batch ``.om`` models through ais_bench or CANN's pyACL.

ais_bench's ``InferSession`` is used when it imports (``acl_aisbench``); otherwise pyACL directly
(``acl_pyacl``). An ``.om`` has a fixed batch, so ``run`` feeds each slice of the batch to the
``.om`` of the same batch size, else to the smallest larger one (zero padding, whose outputs are
dropped), else in slices of the largest. ``acl_devices`` says which chip the runtime is given,
``acl_om`` checks what each loaded ``.om`` takes and gives.

Not run on hardware: written against, and faked in ``tests/fake_acl.py`` /
``tests/fake_ais_bench.py`` from, the real sources that ``acl_pyacl`` and ``acl_aisbench`` cite.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from . import BackendError, BackendOptions, InputSpec
from .acl_aisbench import AisBench, import_ais_bench
from .acl_om import Om
from .acl_pyacl import PyAcl, import_acl

DEFAULT_PRECISION = "set at ATC time (default force_fp16)"

ModelArg = str | Path | dict[int, str | Path] | None
log = logging.getLogger("cardrunner")


def read_manifest(path: str | Path) -> tuple[dict[int, Path], dict[str, Any], str]:
    """{batch size: .om path}, the ``input`` record and the ATC precision of a manifest.json.

    Relative .om paths are resolved against the manifest's folder, so the folder can move.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        models = {int(bs): path.parent / name for bs, name in data["models"].items()}
        declared = dict(data.get("input") or {})
        precision = str(data.get("precision") or "")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackendError(f"{path}: not a convert.onnx2om manifest ({exc!r})") from None
    if not models:
        raise BackendError(f"{path}: the manifest lists no .om models")
    return models, declared, precision


def plan_slices(n: int, batch_sizes: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(start, stop, .om batch size) slices that cover ``n`` images."""
    largest = max(batch_sizes)
    plan, start = [], 0
    while start < n:
        left = n - start
        bs = min((b for b in batch_sizes if b >= left), default=largest)
        plan.append((start, start + min(left, bs), bs))
        start += min(left, bs)
    return plan


def _model_files(model: ModelArg) -> tuple[list[tuple[int | None, Path]], dict[str, Any], str]:
    """(listed batch size or None, path) per .om, the manifest's input record and precision."""
    if model is None:
        raise BackendError(
            "acl backend needs a .om file, a {batch size: .om} dict "
            "or a convert.onnx2om manifest.json"
        )
    if isinstance(model, dict):
        files, declared, precision = {int(bs): Path(p) for bs, p in model.items()}, {}, ""
    elif Path(model).suffix == ".json":
        files, declared, precision = read_manifest(model)
    else:
        return [(None, Path(model))], {}, ""
    return sorted(files.items()), declared, precision


class AclBackend:
    """Fixed-batch .om models on one Ascend chip (see the module docstring)."""

    name = "acl"
    emulated = False

    def __init__(self, model: ModelArg, device_id: int, options: BackendOptions) -> None:
        # No option applies: precision and layout were fixed when ATC compiled the .om.
        files, declared, precision = _model_files(model)
        for _, path in files:
            if not path.is_file():
                raise BackendError(f"acl backend: model file {path} not found")
        self.precision = f"{precision} (ATC)" if precision else DEFAULT_PRECISION
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        session_cls = import_ais_bench()
        if session_cls is not None:
            self.provider = "ais_bench"
            self._rt: PyAcl | AisBench | None = AisBench(
                session_cls, device_id, visible, files, declared
            )
        else:
            self.provider = "pyacl"
            self._rt = PyAcl(import_acl(), device_id, visible, files, declared)
        self.placement = self._rt.placement
        self.physical_id, self.logical_id = device_id, self.placement.runtime_id
        if self.placement.note:
            log.warning("acl backend: %s", self.placement.note)
        self._lock = threading.Lock()
        try:
            self.input, self.num_classes = _common_spec(self._rt.models)
        except BackendError:
            with contextlib.suppress(Exception):
                self._rt.close()
            raise
        self.batch_sizes = tuple(sorted(self._rt.models))

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, float]:
        """Logits for ``batch`` and the seconds spent inside the runtime's execute calls."""
        want = self.input
        if (
            not isinstance(batch, np.ndarray)
            or batch.dtype != np.dtype(want.dtype)
            or batch.shape[1:] != want.shape[1:]
        ):
            got = f"{batch.dtype} {batch.shape}" if isinstance(batch, np.ndarray) else type(batch)
            raise BackendError(
                f"acl backend: expected a {want.dtype} {want.layout} batch of shape "
                f"(n, {', '.join(map(str, want.shape[1:]))}), got {got}"
            )
        parts, seconds = [], 0.0
        with self._lock:
            if self._rt is None:
                raise BackendError("acl backend: run() after close()")
            for start, stop, bs in plan_slices(len(batch), self.batch_sizes):
                part = batch[start:stop]
                if stop - start < bs:
                    pad = np.zeros((bs - len(part), *part.shape[1:]), part.dtype)
                    part = np.concatenate([part, pad])
                logits, spent = self._rt.execute(bs, np.ascontiguousarray(part))
                parts.append(logits[: stop - start])
                seconds += spent
        if not parts:
            return np.empty((0, self.num_classes), np.float32), 0.0
        return np.concatenate(parts), seconds

    def close(self) -> None:
        with self._lock:
            rt, self._rt = self._rt, None
        if rt is not None:
            rt.close()


def _common_spec(models: dict[int, Om]) -> tuple[InputSpec, int]:
    """The one input every .om takes (batch axis -1: ``run`` takes any n) and the classes."""
    ref = models[min(models)]
    for om in models.values():
        if (om.input_dims[1:], om.dtype, om.num_classes) != (
            ref.input_dims[1:],
            ref.dtype,
            ref.num_classes,
        ):
            raise BackendError(
                f"{om.path.name} takes {om.dtype} {om.input_dims[1:]} -> {om.num_classes} "
                f"classes but {ref.path.name} takes {ref.dtype} {ref.input_dims[1:]} -> "
                f"{ref.num_classes}; all .om files must come from one model"
            )
    return InputSpec(ref.input_name, (-1, *ref.input_dims[1:]), ref.dtype), ref.num_classes
