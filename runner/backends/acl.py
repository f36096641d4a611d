"""Ascend backend: fixed-batch ``.om`` models through ais_bench or CANN's pyACL.

Written against the documented pyACL and ais_bench Python APIs (CANN application
development guide; ait benchmark API guide). It is tested only against a recording fake
(``tests/fake_acl.py``) and is UNVERIFIED on real Ascend hardware.

ais_bench's ``InferSession`` is used when it imports; otherwise pyACL directly. An ``.om`` has
a fixed batch, so ``run`` feeds each slice of the batch to the ``.om`` of the same batch size,
else to the smallest larger one (zero padding, whose outputs are dropped), else in chunks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import one_line
from . import BackendError, BackendOptions, InputSpec, logical_device

ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2
NPY_FLOAT32 = 11  # numpy type number that acl.util.ptr_to_numpy takes

MISSING_ACL = (
    "acl backend needs CANN's pyACL (`import acl` failed): "
    "source /usr/local/Ascend/ascend-toolkit/set_env.sh"
)

ModelArg = str | Path | dict[int, str | Path] | None


def read_manifest(path: str | Path) -> tuple[dict[int, Path], dict[str, Any]]:
    """{batch size: .om path} and the ``input`` record of a convert.onnx2om manifest.json.

    Relative .om paths are resolved against the manifest's folder, so the folder can move.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        models = {int(bs): path.parent / name for bs, name in data["models"].items()}
        declared = dict(data.get("input") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackendError(f"{path}: not a convert.onnx2om manifest ({exc!r})") from None
    if not models:
        raise BackendError(f"{path}: the manifest lists no .om models")
    return models, declared


def plan_chunks(n: int, batch_sizes: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(start, stop, .om batch size) slices that cover ``n`` images."""
    largest = max(batch_sizes)
    plan, start = [], 0
    while start < n:
        left = n - start
        bs = min((b for b in batch_sizes if b >= left), default=largest)
        plan.append((start, start + min(left, bs), bs))
        start += min(left, bs)
    return plan


@dataclass(frozen=True)
class _Om:
    """What one loaded .om takes and gives, as the runtime reported it."""

    path: Path
    batch: int
    input_name: str
    input_dims: tuple[int, ...]
    dtype: str
    num_classes: int


def _describe(
    path: Path,
    listed_batch: int | None,
    declared: dict[str, Any],
    input_name: str,
    input_dims: list[int],
    input_size: int,
    output_dims: list[int],
    output_size: int,
) -> _Om:
    """Check a loaded .om against what cardrunner feeds it; the dtype follows from the sizes."""
    om = path.name
    dims = tuple(int(d) for d in input_dims)
    if len(dims) != 4 or min(dims) <= 0:
        raise BackendError(
            f"{om}: input {input_name!r} has dims {list(dims)}; the acl backend needs one "
            "fixed-batch image input per .om (convert one .om per batch size)"
        )
    batch = dims[0]
    if listed_batch is not None and listed_batch != batch:
        raise BackendError(f"{om}: listed for batch size {listed_batch}, its input has {batch}")
    itemsize, rest = divmod(int(input_size), math.prod(dims))
    dtype = {4: "float32", 1: "uint8"}.get(itemsize) if rest == 0 else None
    if dtype is None:
        raise BackendError(
            f"{om}: input {input_name!r} is {input_size} bytes for dims {list(dims)}; "
            "the acl backend feeds float32 or uint8"
        )
    if declared.get("dtype", dtype) != dtype:
        raise BackendError(
            f"{om}: the manifest says input dtype {declared['dtype']}, the model takes {dtype}"
        )
    if tuple(declared.get("shape", [-1, *dims[1:]])[1:]) != dims[1:]:
        raise BackendError(
            f"{om}: the manifest says input shape {declared['shape']}, the model takes {list(dims)}"
        )
    classes = math.prod(output_dims[1:]) if len(output_dims) >= 2 else 0
    if classes <= 0 or output_dims[0] != batch or output_size != batch * classes * 4:
        raise BackendError(
            f"{om}: output 0 has dims {list(output_dims)} and {output_size} bytes; "
            f"expected float32 logits [{batch}, classes]"
        )
    return _Om(path, batch, input_name, dims, dtype, classes)


def _add(models: dict[int, _Om], om: _Om) -> None:
    if om.batch in models:
        raise BackendError(
            f"{om.path.name} and {models[om.batch].path.name} both have batch size {om.batch}"
        )
    models[om.batch] = om


class _PyAcl:
    """Every pyACL resource of one device, released in reverse order of acquisition."""

    def __init__(
        self,
        acl: Any,
        device: int,
        files: list[tuple[int | None, Path]],
        declared: dict[str, Any],
        where: str,
    ) -> None:
        self._acl = acl
        self._where = where
        self._undo: list[tuple[str, Callable[..., int], tuple, str]] = []
        self._context = None
        self._loaded: dict[int, dict[str, Any]] = {}
        self.models: dict[int, _Om] = {}
        try:
            self._ret("acl.init", acl.init())
            self._undo.append(("acl.finalize", acl.finalize, (), ""))
            self._ret("acl.rt.set_device", acl.rt.set_device(device))
            self._undo.append(("acl.rt.reset_device", acl.rt.reset_device, (device,), ""))
            self._context = self._value("acl.rt.create_context", acl.rt.create_context(device))
            self._undo.append(
                ("acl.rt.destroy_context", acl.rt.destroy_context, (self._context,), "")
            )
            for listed_batch, path in files:
                self._load(path, listed_batch, declared)
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                self.close()
            raise

    def _fail(self, name: str, ret: object, om: str) -> BackendError:
        model = f", model {om}" if om else ""
        return BackendError(f"{name} returned {ret} ({self._where}{model})")

    def _ret(self, name: str, ret: int, om: str = "") -> None:
        if ret != 0:
            raise self._fail(name, ret, om)

    def _value(self, name: str, result: tuple[Any, int], om: str = "") -> Any:
        value, ret = result
        self._ret(name, ret, om)
        return value

    def _handle(self, name: str, handle: Any, om: str) -> Any:
        if not handle:
            raise self._fail(name, "a null handle", om)
        return handle

    def _acquired(self, release: str, fn: Callable[..., int], handle: Any, om: str) -> Any:
        self._undo.append((release, fn, (handle,), om))
        return handle

    def _load(self, path: Path, listed_batch: int | None, declared: dict[str, Any]) -> None:
        acl, om = self._acl, path.name
        model_id = self._value("acl.mdl.load_from_file", acl.mdl.load_from_file(str(path)), om)
        self._acquired("acl.mdl.unload", acl.mdl.unload, model_id, om)
        desc = self._handle("acl.mdl.create_desc", acl.mdl.create_desc(), om)
        self._acquired("acl.mdl.destroy_desc", acl.mdl.destroy_desc, desc, om)
        self._ret("acl.mdl.get_desc", acl.mdl.get_desc(desc, model_id), om)
        num_inputs = acl.mdl.get_num_inputs(desc)
        num_outputs = acl.mdl.get_num_outputs(desc)
        if num_inputs != 1 or num_outputs < 1:
            raise BackendError(
                f"{om}: {num_inputs} inputs and {num_outputs} outputs; the acl backend "
                "needs one image input and logits as output 0"
            )
        in_size = acl.mdl.get_input_size_by_index(desc, 0)
        in_dims = self._value("acl.mdl.get_input_dims", acl.mdl.get_input_dims(desc, 0), om)
        out_sizes = [acl.mdl.get_output_size_by_index(desc, i) for i in range(num_outputs)]
        out_dims = self._value("acl.mdl.get_output_dims", acl.mdl.get_output_dims(desc, 0), om)
        info = _describe(
            path,
            listed_batch,
            declared,
            in_dims["name"],
            in_dims["dims"],
            in_size,
            out_dims["dims"],
            out_sizes[0],
        )
        _add(self.models, info)

        def device_buffer(size: int) -> int:
            ptr = self._value("acl.rt.malloc", acl.rt.malloc(size, ACL_MEM_MALLOC_HUGE_FIRST), om)
            return self._acquired("acl.rt.free", acl.rt.free, ptr, om)

        in_ptr = device_buffer(in_size)
        out_ptrs = [device_buffer(size) for size in out_sizes]
        host_out = self._value("acl.rt.malloc_host", acl.rt.malloc_host(out_sizes[0]), om)
        self._acquired("acl.rt.free_host", acl.rt.free_host, host_out, om)
        self._loaded[info.batch] = {
            "om": om,
            "model_id": model_id,
            "in": (in_ptr, in_size),
            "out": (out_ptrs[0], out_sizes[0]),
            "host_out": host_out,
            "in_ds": self._dataset([(in_ptr, in_size)], om),
            "out_ds": self._dataset(list(zip(out_ptrs, out_sizes, strict=True)), om),
        }

    def _dataset(self, buffers: list[tuple[int, int]], om: str) -> Any:
        """The buffers are fixed per .om, so their dataset is built once, at load."""
        acl = self._acl
        dataset = self._handle("acl.mdl.create_dataset", acl.mdl.create_dataset(), om)
        self._acquired("acl.mdl.destroy_dataset", acl.mdl.destroy_dataset, dataset, om)
        for ptr, size in buffers:
            buf = self._handle("acl.create_data_buffer", acl.create_data_buffer(ptr, size), om)
            self._acquired("acl.destroy_data_buffer", acl.destroy_data_buffer, buf, om)
            self._value("acl.mdl.add_dataset_buffer", acl.mdl.add_dataset_buffer(dataset, buf), om)
        return dataset

    def execute(self, batch_size: int, data: np.ndarray) -> tuple[np.ndarray, float]:
        acl, m = self._acl, self._loaded[batch_size]
        om, (in_ptr, in_size), (out_ptr, out_size) = m["om"], m["in"], m["out"]
        # A context is current per thread; Ray may call from more than one.
        self._ret("acl.rt.set_context", acl.rt.set_context(self._context), om)
        util = acl.util
        if hasattr(util, "bytes_to_ptr"):  # newer CANN
            host = data.tobytes()  # must outlive the memcpy
            host_ptr = util.bytes_to_ptr(host)
        else:
            host_ptr = util.numpy_to_ptr(data)
        self._ret(
            "acl.rt.memcpy",
            acl.rt.memcpy(in_ptr, in_size, host_ptr, in_size, ACL_MEMCPY_HOST_TO_DEVICE),
            om,
        )
        start = time.perf_counter()
        ret = acl.mdl.execute(m["model_id"], m["in_ds"], m["out_ds"])
        seconds = time.perf_counter() - start
        self._ret("acl.mdl.execute", ret, om)
        self._ret(
            "acl.rt.memcpy",
            acl.rt.memcpy(m["host_out"], out_size, out_ptr, out_size, ACL_MEMCPY_DEVICE_TO_HOST),
            om,
        )
        if hasattr(util, "ptr_to_bytes"):  # newer CANN
            logits = np.frombuffer(util.ptr_to_bytes(m["host_out"], out_size), np.float32)
        else:
            logits = util.ptr_to_numpy(m["host_out"], (out_size // 4,), NPY_FLOAT32).copy()
        return logits.reshape(batch_size, -1), seconds

    def close(self) -> None:
        """Release everything, even after a failure; raise the first failure at the end."""
        steps = self._undo[::-1]
        self._undo = []
        if self._context is not None and steps:
            steps.insert(0, ("acl.rt.set_context", self._acl.rt.set_context, (self._context,), ""))
        first: BaseException | None = None
        for name, release, args, om in steps:
            try:
                self._ret(name, release(*args), om)
            except Exception as exc:  # keep releasing the rest
                first = first or exc
        if first is not None:
            raise first


class _AisBench:
    """One ais_bench ``InferSession`` per .om; ais_bench owns the pyACL resources."""

    def __init__(
        self,
        session_cls: Any,
        device: int,
        files: list[tuple[int | None, Path]],
        declared: dict[str, Any],
        where: str,
    ) -> None:
        self._where = where
        self._open: list[tuple[Any, str]] = []
        self._sessions: dict[int, Any] = {}
        self.models: dict[int, _Om] = {}
        try:
            for listed_batch, path in files:
                session = self._call("InferSession", path.name, session_cls, device, str(path))
                self._open.append((session, path.name))
                inputs, outputs = session.get_inputs(), session.get_outputs()
                if len(inputs) != 1 or not outputs:
                    raise BackendError(
                        f"{path.name}: {len(inputs)} inputs and {len(outputs)} "
                        "outputs; the acl backend needs one image input"
                    )
                info = _describe(
                    path,
                    listed_batch,
                    declared,
                    inputs[0].name,
                    list(inputs[0].shape),
                    inputs[0].size,
                    list(outputs[0].shape),
                    outputs[0].size,
                )
                _add(self.models, info)
                self._sessions[info.batch] = session
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    def _call(self, name: str, om: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            raise BackendError(
                f"ais_bench {name} failed: {one_line(exc)} ({self._where}, model {om})"
            ) from exc

    def execute(self, batch_size: int, data: np.ndarray) -> tuple[np.ndarray, float]:
        session, om = self._sessions[batch_size], self.models[batch_size].path.name
        outputs = self._call("InferSession.infer", om, session.infer, [data])
        # Older ais_bench spells these `sumary` / `reset_sumaryinfo`.
        summary = getattr(session, "summary", None) or session.sumary
        reset = getattr(session, "reset_summaryinfo", None) or session.reset_sumaryinfo
        times_ms = self._call("InferSession.summary", om, summary).exec_time_list
        if not times_ms:
            raise BackendError(f"ais_bench recorded no execute time ({self._where}, model {om})")
        seconds = float(times_ms[-1]) / 1000.0
        self._call("InferSession.reset_summaryinfo", om, reset)  # else the list grows per batch
        return np.asarray(outputs[0], dtype=np.float32).reshape(batch_size, -1), seconds

    def close(self) -> None:
        first: BaseException | None = None
        while self._open:
            session, om = self._open.pop()
            try:
                self._call("InferSession.free_resource", om, session.free_resource)
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first


def _ais_bench_session() -> Any:
    try:
        from ais_bench.infer.interface import InferSession
    except ImportError:
        return None
    return InferSession


def _import_acl() -> Any:
    try:
        import acl
    except ImportError:
        raise BackendError(MISSING_ACL) from None
    return acl


def _model_files(model: ModelArg) -> tuple[list[tuple[int | None, Path]], dict[str, Any]]:
    """(listed batch size or None, path) per .om, and the manifest's input record."""
    if model is None:
        raise BackendError(
            "acl backend needs a .om file, a {batch size: .om} dict "
            "or a convert.onnx2om manifest.json"
        )
    if isinstance(model, dict):
        files, declared = {int(bs): Path(p) for bs, p in model.items()}, {}
    elif Path(model).suffix == ".json":
        files, declared = read_manifest(model)
    else:
        return [(None, Path(model))], {}
    return sorted(files.items()), declared


class AclBackend:
    """Fixed-batch .om models on one Ascend chip (see the module docstring)."""

    name = "acl"
    emulated = False

    def __init__(self, model: ModelArg, device_id: int, options: BackendOptions) -> None:
        # No option applies: precision and layout were fixed when ATC compiled the .om.
        files, declared = _model_files(model)
        for _, path in files:
            if not path.is_file():
                raise BackendError(f"acl backend: model file {path} not found")
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        self.physical_id = device_id
        self.logical_id = logical_device(device_id, visible)
        where = f"device {self.logical_id}"
        if visible:
            where += f" of ASCEND_RT_VISIBLE_DEVICES={visible}"
        session_cls = _ais_bench_session()
        if session_cls is not None:
            self.provider = "ais_bench"
            self._rt: _PyAcl | _AisBench | None = _AisBench(
                session_cls, self.logical_id, files, declared, where
            )
        else:
            self.provider = "pyacl"
            self._rt = _PyAcl(_import_acl(), self.logical_id, files, declared, where)
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
            for start, stop, bs in plan_chunks(len(batch), self.batch_sizes):
                chunk = batch[start:stop]
                if stop - start < bs:
                    chunk = np.concatenate(
                        [chunk, np.zeros((bs - len(chunk), *chunk.shape[1:]), chunk.dtype)]
                    )
                logits, spent = self._rt.execute(bs, np.ascontiguousarray(chunk))
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


def _common_spec(models: dict[int, _Om]) -> tuple[InputSpec, int]:
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
