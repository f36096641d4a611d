"""CANN's pyACL on one chip: ``acl.init`` shared by the backends of a process, and every
resource of one device (context, models, buffers, datasets), released in reverse order.

Written against Ascend/samples (commit fc2aea93) ``python/level2_simple_inference/
1_classification/resnet50_imagenet_classification/src/acl_net.py`` and ``python/common/acllite/
acllite_model.py``, and the CANN 5.0.4 / 6.0.1 / 8.x pyACL references.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import one_line
from . import BackendError
from .acl_devices import Placement, place
from .acl_om import Om, Tensor, add_model, describe

ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST, ACL_MEMCPY_DEVICE_TO_DEVICE = 1, 2, 3
ACL_DEVICE = 0  # acl.rt.get_run_mode(): the program runs on the chip's own CPU (Atlas 200 DK)
ACL_ERROR_REPEAT_INITIALIZE = 100002
#: The first CANN whose install guide lists Python 3.10, setup.cfg's minimum (canncommercial
#: 62RC2 instg_000025; 5.x/6.0 list 3.7-3.9). Its numpy range: <= 1.24 up to 8.0.0, < 2 later.
MIN_CANN = "6.2.RC2"


def missing_acl(exc: ImportError) -> str:
    """Why ``import acl`` failed, with the version limits that most often cause it."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (
        f"acl backend needs CANN's pyACL and `import acl` failed ({one_line(exc)}): source "
        f"/usr/local/Ascend/ascend-toolkit/set_env.sh and use a CANN that lists Python {python} "
        f"(3.10: CANN {MIN_CANN} or newer; 5.x/6.0 ship pyACL for 3.7-3.9) with numpy < 2 "
        f"(here {np.__version__})"
    )


def import_acl() -> Any:
    try:
        import acl
    except ImportError as exc:
        raise BackendError(missing_acl(exc)) from None
    return acl


@dataclass
class Users:
    """The backends of this process that use one runtime library (pyACL's ``acl`` module or
    ais_bench's ``InferSession``)."""

    count: int = 0
    owned: bool = False  # pyACL: our acl.init succeeded, so the last close finalizes
    finalized: bool = False  # ais_bench: its finalize ran; its ACL cannot be initialised again


USERS: weakref.WeakKeyDictionary[Any, Users] = weakref.WeakKeyDictionary()
USERS_LOCK = threading.Lock()


def _acl_acquire(acl: Any) -> int:
    """``acl.init`` once per process (CANN 5.0.4: "一个进程内只能调用一次acl.init接口").

    ACL_ERROR_REPEAT_INITIALIZE means a co-resident library initialised ACL: use it, and leave
    its finalize to it (as mmdeploy's ascend wrapper does).
    """
    with USERS_LOCK:
        users = USERS.setdefault(acl, Users())
        if users.count == 0:
            ret = acl.init()
            if ret not in (0, ACL_ERROR_REPEAT_INITIALIZE):
                return ret
            users.owned = ret == 0
        users.count += 1
        return 0


def _acl_release(acl: Any) -> int:
    """``acl.finalize`` when the process's last pyACL backend closes, if we initialised ACL."""
    with USERS_LOCK:
        users = USERS[acl]
        users.count -= 1
        if users.count or not users.owned:
            return 0
        users.owned = False
        return acl.finalize()



class PyAcl:
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
        self.models: dict[int, Om] = {}
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
        inp = Tensor(
            in_dims["name"], in_dims["dims"], acl.mdl.get_input_data_type(desc, 0), in_size
        )
        out = Tensor("", out_dims["dims"], acl.mdl.get_output_data_type(desc, 0), out_sizes[0])
        info = describe(path, listed_batch, declared, inp, out)
        add_model(self.models, info)

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
