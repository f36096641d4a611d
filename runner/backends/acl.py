"""Ascend backend: fixed-batch ``.om`` models through ais_bench or CANN's pyACL.

ais_bench's ``InferSession`` is used when it imports; otherwise pyACL directly. An ``.om`` has
a fixed batch, so ``run`` feeds each slice of the batch to the ``.om`` of the same batch size,
else to the smallest larger one (zero padding, whose outputs are dropped), else in slices of
the largest.

Not run on hardware. Written against, and faked in ``tests/fake_acl.py`` /
``tests/fake_ais_bench.py`` from, the real sources:

* pyACL: Ascend/samples (commit fc2aea93) ``python/level2_simple_inference/1_classification/
  resnet50_imagenet_classification/src/acl_net.py`` and ``python/common/acllite/
  acllite_model.py``; the CANN 5.0.4 / 6.0.1 / 8.x pyACL and environment-variable references.
* ais_bench: Ascend/tools ``ais-bench_workload/tool/ais_bench`` (commit 9d6da90, 2023-06) and
  gitee ascend/ait as mirrored by mjlovesz/sync-ait, ``ait/components/benchmark`` up to
  c432ed56 (2024-05).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import one_line
from . import BackendError, BackendOptions, InputSpec

ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST, ACL_MEMCPY_DEVICE_TO_DEVICE = 1, 2, 3
ACL_DEVICE = 0  # acl.rt.get_run_mode(): the program runs on the chip's own CPU (Atlas 200 DK)
ACL_ERROR_REPEAT_INITIALIZE = 100002
#: aclDataType (acl_base.h); ais_bench's TensorDataType uses the same numbers (TensorBase.h).
ACL_DTYPES = {0: "float32", 1: "float16", 2: "int8", 3: "int32", 4: "uint8", 6: "int16",
              7: "uint16", 8: "uint32", 9: "int64", 10: "uint64", 11: "float64", 12: "bool"}
INPUT_DTYPES = ("float32", "uint8")  # normalised NCHW, or raw NHWC crops for an AIPP .om
LOGIT_DTYPES = ("float32", "float16")  # float16 when ATC was given --output_type=FP16
#: The first CANN whose install guide lists Python 3.10, setup.cfg's minimum (canncommercial
#: 62RC2 instg_000025; 5.x/6.0 list 3.7-3.9). Its numpy range: <= 1.24 up to 8.0.0, < 2 later.
MIN_CANN = "6.2.RC2"
DEFAULT_PRECISION = "set at ATC time (default force_fp16)"

ModelArg = str | Path | dict[int, str | Path] | None
log = logging.getLogger("cardrunner")


def missing_acl(exc: ImportError) -> str:
    """Why ``import acl`` failed, with the version limits that most often cause it."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (
        f"acl backend needs CANN's pyACL and `import acl` failed ({one_line(exc)}): source "
        f"/usr/local/Ascend/ascend-toolkit/set_env.sh and use a CANN that lists Python {python} "
        f"(3.10: CANN {MIN_CANN} or newer; 5.x/6.0 ship pyACL for 3.7-3.9) with numpy < 2 "
        f"(here {np.__version__})"
    )


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


# --------------------------------------------------------------------------- which chip


def cann_visible_ids(value: str) -> list[int]:
    """The ids CANN reads from ASCEND_RT_VISIBLE_DEVICES: comma-separated digits from the start,
    up to the first other character (CANN 8.x env reference: ``"1, 2,3"`` means only 1)."""
    match = re.match(r"[0-9]+(?:,[0-9]+)*", value)
    return [int(i) for i in match.group(0).split(",")] if match else []


@dataclass(frozen=True)
class Placement:
    """The id the runtime is given for the chip cardrunner means, and its name in messages."""

    physical: int
    runtime_id: int
    where: str
    note: str = ""  # set when the runtime ignored ASCEND_RT_VISIBLE_DEVICES


def place(physical: int, visible: str | None, count: int | None) -> Placement:
    """Where chip ``physical`` is, given ASCEND_RT_VISIBLE_DEVICES and the chip count the runtime
    reports (None: not known yet; assume the runtime reads the variable).

    The variable is a "trial" one in the CANN 8.x env reference (ascending ids only) and no
    5.x/6.0 page documents it. Reading it can only shrink the count to the ids CANN parsed, so a
    larger count means this runtime ignored it and numbers chips physically. A chip that is
    listed but not first in the list (Ray's choice) stays the chip asked for.
    """
    if not visible:
        runtime, where, note = physical, f"device {physical}", ""
    else:
        listed = [int(p) for p in (s.strip() for s in visible.split(",")) if p.isdecimal()]
        target = physical if physical in listed or not listed else listed[0]
        ids = cann_visible_ids(visible)
        if count is not None and count > len(ids):
            runtime, where = target, f"device {target}"
            note = f"this CANN ignores ASCEND_RT_VISIBLE_DEVICES={visible}; chip {target} used"
        elif target in ids[: len(ids) if count is None else count]:
            runtime, note = ids.index(target), ""
            where = f"device {runtime} of ASCEND_RT_VISIBLE_DEVICES={visible}"
        else:
            sees = "" if count is None else f" and the runtime sees {count} chip(s)"
            raise BackendError(
                f"ASCEND_RT_VISIBLE_DEVICES={visible!r}: CANN reads {ids} (ascending ids up to "
                f"the first character that is not a digit or comma){sees}; chip {target} is "
                "not among them"
            )
    if count is not None and runtime >= count:
        raise BackendError(f"{where}: the runtime sees {count} Ascend chip(s)")
    return Placement(physical, runtime, where, note)


# --------------------------------------------------------------------------- what an .om takes


@dataclass(frozen=True)
class _Tensor:
    """One model input or output as the runtime describes it."""

    name: str
    dims: list[int]
    dtype_code: int  # aclDataType
    size: int  # bytes


@dataclass(frozen=True)
class _Om:
    """What one loaded .om takes and gives, as the runtime reported it."""

    path: Path
    batch: int
    input_name: str
    input_dims: tuple[int, ...]
    dtype: str
    num_classes: int
    out_dtype: str


def _dtype_name(code: int) -> str:
    return ACL_DTYPES.get(code, f"aclDataType {code}")


def _describe(
    path: Path, listed_batch: int | None, declared: dict[str, Any], inp: _Tensor, out: _Tensor
) -> _Om:
    """Check a loaded .om against what cardrunner feeds it and reads from it.

    Data types come from the runtime (as acllite_model.py reads them), not from byte sizes: a
    4-byte INT32 output would otherwise pass for float32 logits.
    """
    om, dims = path.name, tuple(int(d) for d in inp.dims)
    if len(dims) != 4 or min(dims) <= 0:
        raise BackendError(
            f"{om}: input {inp.name!r} has dims {list(dims)}; the acl backend needs one "
            "fixed-batch image input per .om (convert one .om per batch size)"
        )
    batch = dims[0]
    if listed_batch is not None and listed_batch != batch:
        raise BackendError(f"{om}: listed for batch size {listed_batch}, its input has {batch}")
    dtype = _dtype_name(int(inp.dtype_code))
    if dtype not in INPUT_DTYPES or inp.size != math.prod(dims) * np.dtype(dtype).itemsize:
        raise BackendError(
            f"{om}: input {inp.name!r} is {dtype}, {inp.size} bytes for dims {list(dims)}; "
            "the acl backend feeds float32 (NCHW) or uint8 (NHWC, AIPP)"
        )
    if declared.get("dtype", dtype) != dtype:
        raise BackendError(
            f"{om}: the manifest says input dtype {declared['dtype']}, the model takes {dtype}"
        )
    if tuple(declared.get("shape", [-1, *dims[1:]])[1:]) != dims[1:]:
        raise BackendError(
            f"{om}: the manifest says input shape {declared['shape']}, the model takes {list(dims)}"
        )
    out_dtype = _dtype_name(int(out.dtype_code))
    classes = math.prod(out.dims[1:]) if len(out.dims) >= 2 else 0
    if out_dtype not in LOGIT_DTYPES:
        raise BackendError(f"{om}: output 0 is {out_dtype}; expected float32 or float16 logits")
    if classes <= 0 or out.dims[0] != batch or out.size != batch * classes * np.dtype(
        out_dtype
    ).itemsize:
        raise BackendError(
            f"{om}: output 0 has dims {list(out.dims)} and {out.size} bytes; "
            f"expected {out_dtype} logits [{batch}, classes]"
        )
    return _Om(path, batch, inp.name, dims, dtype, classes, out_dtype)


def _add(models: dict[int, _Om], om: _Om) -> None:
    if om.batch in models:
        raise BackendError(
            f"{om.path.name} and {models[om.batch].path.name} both have batch size {om.batch}"
        )
    models[om.batch] = om


# --------------------------------------------------------------------------- one ACL per process


@dataclass
class _Users:
    """The backends of this process that use one runtime library (pyACL's ``acl`` module or
    ais_bench's ``InferSession``)."""

    count: int = 0
    owned: bool = False  # pyACL: our acl.init succeeded, so the last close finalizes
    finalized: bool = False  # ais_bench: its finalize ran; its ACL cannot be initialised again


_USERS: weakref.WeakKeyDictionary[Any, _Users] = weakref.WeakKeyDictionary()
_USERS_LOCK = threading.Lock()


def _acl_acquire(acl: Any) -> int:
    """``acl.init`` once per process (CANN 5.0.4: "一个进程内只能调用一次acl.init接口").

    ACL_ERROR_REPEAT_INITIALIZE means a co-resident library initialised ACL: use it, and leave
    its finalize to it (as mmdeploy's ascend wrapper does).
    """
    with _USERS_LOCK:
        users = _USERS.setdefault(acl, _Users())
        if users.count == 0:
            ret = acl.init()
            if ret not in (0, ACL_ERROR_REPEAT_INITIALIZE):
                return ret
            users.owned = ret == 0
        users.count += 1
        return 0


def _acl_release(acl: Any) -> int:
    """``acl.finalize`` when the process's last pyACL backend closes, if we initialised ACL."""
    with _USERS_LOCK:
        users = _USERS[acl]
        users.count -= 1
        if users.count or not users.owned:
            return 0
        users.owned = False
        return acl.finalize()


class _PyAcl:
    """Every pyACL resource of one device, released in reverse order of acquisition."""

    def __init__(
        self,
        acl: Any,
        physical: int,
        visible: str | None,
        files: list[tuple[int | None, Path]],
        declared: dict[str, Any],
    ) -> None:
        self._acl = acl
        self.placement = Placement(physical, physical, f"device {physical}")  # until counted
        self._undo: list[tuple[str, Callable[..., int], tuple, str]] = []
        self._context = None
        self._loaded: dict[int, dict[str, Any]] = {}
        self.models: dict[int, _Om] = {}
        try:
            self._ret("acl.init", _acl_acquire(acl))
            self._undo.append(("acl.finalize", _acl_release, (acl,), ""))
            # Before set_device, so that a runtime which ignored ASCEND_RT_VISIBLE_DEVICES
            # never opens physical chip 0 by mistake (ais_bench's DeviceManager::InitDevices
            # also asks for the count straight after aclInit).
            count = self._value("acl.rt.get_device_count", acl.rt.get_device_count())
            self.placement = place(physical, visible, count)
            device = self.placement.runtime_id
            self._ret("acl.rt.set_device", acl.rt.set_device(device))
            self._undo.append(("acl.rt.reset_device", acl.rt.reset_device, (device,), ""))
            self._context = self._value("acl.rt.create_context", acl.rt.create_context(device))
            self._undo.append(
                ("acl.rt.destroy_context", acl.rt.destroy_context, (self._context,), "")
            )
            # acllite_model.py: when the program runs on the device (ACL_DEVICE), "host" memory
            # is device memory and every copy is device-to-device.
            mode = self._value("acl.rt.get_run_mode", acl.rt.get_run_mode())
            self._kinds = (
                (ACL_MEMCPY_DEVICE_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_DEVICE)
                if mode == ACL_DEVICE
                else (ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST)
            )
            for listed_batch, path in files:
                self._load(path, listed_batch, declared)
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                self.close()
            raise

    def _fail(self, name: str, ret: object, om: str) -> BackendError:
        model = f", model {om}" if om else ""
        return BackendError(f"{name} returned {ret} ({self.placement.where}{model})")

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
        inp = _Tensor(
            in_dims["name"], in_dims["dims"], acl.mdl.get_input_data_type(desc, 0), in_size
        )
        out = _Tensor("", out_dims["dims"], acl.mdl.get_output_data_type(desc, 0), out_sizes[0])
        info = _describe(path, listed_batch, declared, inp, out)
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
            "out_dtype": np.dtype(info.out_dtype),
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
        to_device, to_host = self._kinds
        # A context is current per thread; Ray may call from more than one.
        self._ret("acl.rt.set_context", acl.rt.set_context(self._context), om)
        util = acl.util
        if hasattr(util, "bytes_to_ptr"):  # newer CANN
            host = data.tobytes()  # must outlive the memcpy
            host_ptr = util.bytes_to_ptr(host)
        else:
            host_ptr = util.numpy_to_ptr(data)
        self._ret("acl.rt.memcpy", acl.rt.memcpy(in_ptr, in_size, host_ptr, in_size, to_device), om)
        start = time.perf_counter()
        ret = acl.mdl.execute(m["model_id"], m["in_ds"], m["out_ds"])
        seconds = time.perf_counter() - start
        self._ret("acl.mdl.execute", ret, om)
        self._ret(
            "acl.rt.memcpy", acl.rt.memcpy(m["host_out"], out_size, out_ptr, out_size, to_host), om
        )
        dtype = m["out_dtype"]
        if hasattr(util, "ptr_to_bytes"):  # newer CANN
            logits = np.frombuffer(util.ptr_to_bytes(m["host_out"], out_size), dtype)
        else:
            logits = util.ptr_to_numpy(m["host_out"], (out_size // dtype.itemsize,), dtype.num)
        return logits.reshape(batch_size, -1).astype(np.float32), seconds  # a copy

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


def _exec_ms(entry: Any) -> float:
    """One ``exec_time_list`` entry in ms.

    A float until ait 8c67f6f51 (2023-10-09); since then a ``(start_ms, end_ms)`` pair of
    float32 offsets from the session's creation (ModelInferenceProcessor::Execute), of which
    ais_bench's own benchmark_process.py takes ``end - start``; float32 offsets resolve about
    0.25 ms an hour into a session.
    """
    if isinstance(entry, (tuple, list)) and len(entry) == 2:
        return float(entry[1]) - float(entry[0])
    return float(entry)


def _runtime_chip_count() -> int | None:
    """The chip count through pyACL (ais_bench offers no call for it), once ais_bench has
    initialised ACL; None without pyACL."""
    try:
        import acl
    except ImportError:
        return None
    count, ret = acl.rt.get_device_count()
    return int(count) if ret == 0 else None


class _AisBench:
    """One ais_bench ``InferSession`` per .om; every ais_bench call runs on one thread of its own.

    Ascend/tools' PyInferenceSession.cpp (2023-06) makes its context current only in ``Init``
    and ``Destroy``; per-call ``SetContext`` came with ait 68d6db94b ("add multithreaded
    compute", 2023-09-11). The device actor calls from a pool of threads, so the sessions stay
    on the thread that created them. ACL is ais_bench's: it calls aclInit in its TensorContext
    singleton, and this class finalizes it when the process's last ais_bench backend closes.
    """

    def __init__(
        self,
        session_cls: Any,
        physical: int,
        visible: str | None,
        files: list[tuple[int | None, Path]],
        declared: dict[str, Any],
    ) -> None:
        self._cls = session_cls
        self.placement = place(physical, visible, None)
        self._open: list[tuple[Any, str]] = []
        self._sessions: dict[int, Any] = {}
        self.models: dict[int, _Om] = {}
        with _USERS_LOCK:
            users = _USERS.setdefault(session_cls, _Users())
            if users.finalized:
                raise BackendError(
                    "ais_bench: an earlier acl backend of this process finalized ACL, which "
                    "ais_bench cannot initialise again in the same process"
                )
            users.count += 1
        self._thread: ThreadPoolExecutor | None = ThreadPoolExecutor(1, "ais_bench")
        try:
            self._on_thread(self._open_all, files, declared)
            count = self._on_thread(_runtime_chip_count)
            if count is None and visible:
                log.warning("acl backend: no chip count from pyACL; cannot check whether this "
                            "CANN reads ASCEND_RT_VISIBLE_DEVICES=%s", visible)
            final = self.placement if count is None else place(physical, visible, count)
            if final.runtime_id != self.placement.runtime_id:
                self._on_thread(self._release, False)
                self.placement = final
                self._on_thread(self._open_all, files, declared)
            self.placement = final
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    def _on_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._thread is not None, "ais_bench used after close"
        return self._thread.submit(fn, *args).result()

    def _call(self, name: str, om: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            model = f", model {om}" if om else ""
            raise BackendError(
                f"ais_bench {name} failed: {one_line(exc)} ({self.placement.where}{model})"
            ) from exc

    def _open_all(self, files: list[tuple[int | None, Path]], declared: dict[str, Any]) -> None:
        self.models = {}
        device = self.placement.runtime_id
        for listed_batch, path in files:
            session = self._call("InferSession", path.name, self._cls, device, str(path))
            self._open.append((session, path.name))
            inputs, outputs = session.get_inputs(), session.get_outputs()
            if len(inputs) != 1 or not outputs:
                raise BackendError(
                    f"{path.name}: {len(inputs)} inputs and {len(outputs)} outputs; "
                    "the acl backend needs one image input"
                )
            inp, out = inputs[0], outputs[0]
            info = _describe(
                path,
                listed_batch,
                declared,
                _Tensor(inp.name, list(inp.shape), int(inp.datatype), inp.size),
                _Tensor(out.name, list(out.shape), int(out.datatype), out.size),
            )
            _add(self.models, info)
            self._sessions[info.batch] = session

    def execute(self, batch_size: int, data: np.ndarray) -> tuple[np.ndarray, float]:
        return self._on_thread(self._execute, batch_size, data)

    def _execute(self, batch_size: int, data: np.ndarray) -> tuple[np.ndarray, float]:
        session, om = self._sessions[batch_size], self.models[batch_size].path.name
        outputs = self._call("InferSession.infer", om, session.infer, [data])
        # ais_bench spelled these `sumary` / `reset_sumaryinfo` until 2023-10.
        summary = getattr(session, "summary", None) or session.sumary
        reset = getattr(session, "reset_summaryinfo", None) or session.reset_sumaryinfo
        times = self._call("InferSession.summary", om, summary).exec_time_list
        if not times:
            raise BackendError(f"ais_bench recorded no execute time ({self.placement.where})")
        seconds = self._call("exec_time_list", om, lambda: sum(map(_exec_ms, times)) / 1000)
        self._call("InferSession.reset_summaryinfo", om, reset)  # else the list grows per batch
        return np.asarray(outputs[0]).reshape(batch_size, -1).astype(np.float32), seconds

    def _release(self, last: bool) -> None:
        """Free every session (on the ais_bench thread); ``last``: also finalize ais_bench.

        Since ait 68d6db94b: ``free_resource`` per session, then the static ``finalize``.
        Before it (Ascend/tools 2023) there is no ``free_resource``: a session's destructor
        frees its model, and its ``finalize()`` also destroys every context and device of the
        process and calls aclFinalize, so it runs once, through the last session.
        """
        errors: list[BackendError] = []

        def attempt(name: str, om: str, fn: Callable[[], Any]) -> None:
            try:
                self._call(name, om, fn)
            except BackendError as exc:
                errors.append(exc)

        sessions, self._open, self._sessions = self._open, [], {}
        finalize = None
        if hasattr(self._cls, "free_resource"):
            for session, om in reversed(sessions):
                attempt("InferSession.free_resource", om, session.free_resource)
            finalize = ("", self._cls.finalize) if last else None
        elif last and sessions:
            keeper, om = sessions.pop()
            finalize = (om, keeper.finalize)
            del keeper
        sessions.clear()  # old ais_bench: ~PyInferenceSession() frees each model, on this thread
        if finalize is not None:
            with _USERS_LOCK:
                _USERS[self._cls].finalized = True
            attempt("InferSession.finalize", *finalize)
        del finalize
        if errors:
            raise errors[0]

    def close(self) -> None:
        if self._thread is None:
            return
        with _USERS_LOCK:
            users = _USERS[self._cls]
            users.count -= 1
            last = users.count == 0
        try:
            self._on_thread(self._release, last)
        finally:
            self._thread.shutdown(wait=True)
            self._thread = None


def _ais_bench_session() -> Any:
    try:
        from ais_bench.infer.interface import InferSession
    except ImportError:
        return None
    return InferSession


def _import_acl() -> Any:
    try:
        import acl
    except ImportError as exc:
        raise BackendError(missing_acl(exc)) from None
    return acl


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
        session_cls = _ais_bench_session()
        if session_cls is not None:
            self.provider = "ais_bench"
            self._rt: _PyAcl | _AisBench | None = _AisBench(
                session_cls, device_id, visible, files, declared
            )
        else:
            self.provider = "pyacl"
            self._rt = _PyAcl(_import_acl(), device_id, visible, files, declared)
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
