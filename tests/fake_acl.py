"""A recording fake of CANN's pyACL ``acl`` module, and helpers for the tests that use it.

No Ascend chip is available to the tests, so ``runner.backends.acl`` is checked against this:
``monkeypatch.setitem(sys.modules, "acl", FakeAcl(models))``. ``FakeAcl`` keeps every call,
simulates device and host memory so ``memcpy`` really copies bytes, and "executes" a model as
``logits[i, k] = mean(image i) * (k + 1)``, so a test can tell which image fed which row. Any
call named in ``fail`` returns that error code instead of acting.

What it enforces follows the real sources and docs: return conventions (``ret``, ``(value,
ret)`` or a bare handle) and data-type calls as in Ascend/samples ``acl_net.py`` and
``acllite_model.py``; one ``acl.init`` per process (CANN 5.0.4 pyACL reference), a second one
returning ACL_ERROR_REPEAT_INITIALIZE, nothing working before it or after ``acl.finalize``; a
context current per thread (``set_device`` / ``create_context`` / ``set_context`` make one
current on the calling thread only); memcpy kinds by run mode (acllite: device-to-device when
``get_run_mode`` says ACL_DEVICE); and ASCEND_RT_VISIBLE_DEVICES as the CANN 8.x env reference
describes it (ids in ascending order up to the first other character or invalid id, renumbered
from 0), or ignored, as on runtimes that predate it (``reads_visible=False``).
"""

from __future__ import annotations

import math
import os
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ACL_ERROR_INVALID_PARAM = 100000
ACL_ERROR_UNINITIALIZE = 100001
ACL_ERROR_REPEAT_INITIALIZE = 100002
ACL_ERROR_REPEAT_FINALIZE = 100037
ACL_ERROR_RT_INVALID_DEVICEID = 107001
ACL_ERROR_RT_CONTEXT_NULL = 107002
H2D, D2H, D2D = 1, 2, 3
ACL_DEVICE, ACL_HOST = 0, 1
ACL_DTYPE = {"float32": 0, "float16": 1, "int8": 2, "int32": 3, "uint8": 4}  # acllite constants
NPY_DTYPES = {np.dtype(t).num: np.dtype(t) for t in ("uint8", "int32", "float16", "float32")}


@dataclass(frozen=True)
class FakeOm:
    """A fixed-batch .om as the fake runtime describes it."""

    batch: int
    image: tuple[int, ...] = (3, 4, 4)  # dims after the batch axis (NHWC for uint8)
    classes: int = 5
    dtype: str = "float32"
    name: str = "image"
    num_outputs: int = 1
    out_dtype: str = "float32"

    @property
    def input_dims(self) -> list[int]:
        return [self.batch, *self.image]

    @property
    def input_size(self) -> int:
        return math.prod(self.input_dims) * np.dtype(self.dtype).itemsize

    @property
    def output_dims(self) -> list[int]:
        return [self.batch, self.classes]

    @property
    def output_size(self) -> int:
        return self.batch * self.classes * np.dtype(self.out_dtype).itemsize


def fake_logits(images: np.ndarray, classes: int) -> np.ndarray:
    """What the fake model computes: row i is image i's mean times 1..classes."""
    means = images.reshape(len(images), -1).astype(np.float64).mean(axis=1)
    return (means[:, None] * np.arange(1, classes + 1)).astype(np.float32)


def om_files(tmp_path: Path, **oms: FakeOm) -> dict[str, FakeOm]:
    """Write a placeholder file per .om and return the fake's registry {path: FakeOm}."""
    registry = {}
    for stem, om in oms.items():
        path = tmp_path / f"{stem}.om"
        path.write_bytes(b"FAKE OM")
        registry[str(path)] = om
    return registry


def images(n: int, om: FakeOm) -> np.ndarray:
    """Image i is filled with i + 1, so its logits row is (i + 1) * (1..classes)."""
    batch = np.empty((n, *om.image), om.dtype)
    for i in range(n):
        batch[i] = i + 1
    return batch


def expected(n: int, classes: int) -> np.ndarray:
    return (np.arange(1, n + 1)[:, None] * np.arange(1, classes + 1)).astype(np.float32)


class FakeAcl:
    """The ``acl`` module: ``acl.init``, ``acl.rt.*``, ``acl.mdl.*``, ``acl.util.*``.

    ``util_api="bytes"`` offers newer CANN's ``bytes_to_ptr``/``ptr_to_bytes``,
    ``"numpy"`` older CANN's ``numpy_to_ptr``/``ptr_to_numpy``. ``chips``: physical chips on
    the host. ``initialised_elsewhere``: a co-resident library already called ``acl.init``.
    """

    def __init__(
        self,
        models: dict[str, FakeOm],
        util_api: str = "bytes",
        chips: int = 4,
        reads_visible: bool = True,
        run_mode: int = ACL_HOST,
        initialised_elsewhere: bool = False,
    ) -> None:
        self.models = {str(path): om for path, om in models.items()}
        self.chips, self.reads_visible, self.run_mode = chips, reads_visible, run_mode
        self.calls: list[tuple[str, tuple]] = []
        self.fail: dict[str, int] = {}
        self.memory: dict[int, Any] = {}  # ptr -> bytearray (device/host) or memoryview
        self.space: dict[int, str] = {}  # ptr -> "device" | "host"
        self.live: dict[Any, str] = {}  # every resource not yet released
        self.executed: list[tuple[str, np.ndarray]] = []  # (.om path, input batch)
        self.opened_chips: list[int] = []  # the physical chip of every set_device
        self.initialised = initialised_elsewhere
        self._visible = self.visible_chips() if initialised_elsewhere else []
        self._thread = threading.local()  # .context: what is current on the calling thread
        self._loaded: dict[int, str] = {}  # model id -> path
        self._desc: dict[int, int] = {}  # desc -> model id
        self._datasets: dict[int, list[int]] = {}
        self._buffers: dict[int, tuple[int, int]] = {}
        self._next = 0x1000
        self.init = self._api("acl.init", "plain", self._init)
        self.finalize = self._api("acl.finalize", "plain", self._finalize)
        self.create_data_buffer = self._api("acl.create_data_buffer", "handle", self._buffer)
        self.destroy_data_buffer = self._api(
            "acl.destroy_data_buffer", "ret", self._release("data_buffer")
        )
        self.rt = types.SimpleNamespace(
            get_device_count=self._api(
                "acl.rt.get_device_count", "pair", lambda: (len(self._visible), 0)
            ),
            get_run_mode=self._api("acl.rt.get_run_mode", "pair", lambda: (self.run_mode, 0)),
            set_device=self._api("acl.rt.set_device", "ret", self._set_device),
            reset_device=self._api("acl.rt.reset_device", "ret", self._reset_device),
            create_context=self._api("acl.rt.create_context", "pair", self._create_context),
            destroy_context=self._api("acl.rt.destroy_context", "ret", self._destroy_context),
            set_context=self._api("acl.rt.set_context", "ret", self._set_context),
            malloc=self._api("acl.rt.malloc", "pair", lambda size, policy: self._alloc(size)),
            malloc_host=self._api("acl.rt.malloc_host", "pair", self._alloc_host),
            free=self._api("acl.rt.free", "ret", self._free("device")),
            free_host=self._api("acl.rt.free_host", "ret", self._free("host")),
            memcpy=self._api("acl.rt.memcpy", "ret", self._memcpy),
        )
        self.mdl = types.SimpleNamespace(
            load_from_file=self._api("acl.mdl.load_from_file", "pair", self._load),
            unload=self._api("acl.mdl.unload", "ret", self._release("model")),
            create_desc=self._api("acl.mdl.create_desc", "handle", lambda: self._new("desc")),
            destroy_desc=self._api("acl.mdl.destroy_desc", "ret", self._release("desc")),
            get_desc=self._api("acl.mdl.get_desc", "ret", self._get_desc),
            get_num_inputs=self._api("acl.mdl.get_num_inputs", "plain", lambda desc: 1),
            get_num_outputs=self._api(
                "acl.mdl.get_num_outputs", "plain", lambda desc: self._om(desc).num_outputs
            ),
            get_input_size_by_index=self._api(
                "acl.mdl.get_input_size_by_index", "plain", lambda d, i: self._om(d).input_size
            ),
            get_output_size_by_index=self._api(
                "acl.mdl.get_output_size_by_index", "plain", lambda d, i: self._om(d).output_size
            ),
            get_input_data_type=self._api(
                "acl.mdl.get_input_data_type", "plain", lambda d, i: ACL_DTYPE[self._om(d).dtype]
            ),
            get_output_data_type=self._api(
                "acl.mdl.get_output_data_type",
                "plain",
                lambda d, i: ACL_DTYPE[self._om(d).out_dtype],
            ),
            get_input_dims=self._api("acl.mdl.get_input_dims", "pair", self._input_dims),
            get_output_dims=self._api("acl.mdl.get_output_dims", "pair", self._output_dims),
            create_dataset=self._api("acl.mdl.create_dataset", "handle", self._dataset),
            add_dataset_buffer=self._api("acl.mdl.add_dataset_buffer", "pair", self._add_buffer),
            destroy_dataset=self._api("acl.mdl.destroy_dataset", "ret", self._release("dataset")),
            execute=self._api("acl.mdl.execute", "ret", self._execute),
        )
        if util_api == "bytes":
            self.util = types.SimpleNamespace(
                bytes_to_ptr=self._api("acl.util.bytes_to_ptr", "plain", self._host_view),
                ptr_to_bytes=self._api(
                    "acl.util.ptr_to_bytes",
                    "plain",
                    lambda ptr, size: bytes(self.memory[ptr][:size]),
                ),
            )
        else:
            self.util = types.SimpleNamespace(
                numpy_to_ptr=self._api("acl.util.numpy_to_ptr", "plain", self._host_view),
                ptr_to_numpy=self._api("acl.util.ptr_to_numpy", "plain", self._ptr_to_numpy),
            )

    # -- recording, failure injection, initialisation -------------------------------------

    def _api(self, name: str, style: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.calls.append((name, args))
            code = self.fail.get(name)
            if code is None and style != "plain" and not self.initialised:
                code = ACL_ERROR_UNINITIALIZE
            if code is None:
                return fn(*args)
            return {"ret": code, "pair": (0, code), "handle": 0, "plain": code}[style]

        return call

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def args(self, name: str) -> list[tuple]:
        return [args for called, args in self.calls if called == name]

    def leaks(self) -> list[str]:
        return sorted(self.live.values())

    def visible_chips(self) -> list[int]:
        """The physical chips the runtime numbers 0, 1, ... (read at initialisation)."""
        value = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        if value is None or not self.reads_visible:
            return list(range(self.chips))
        chips, digits = [], ""
        for char in value + ",":
            if char.isdigit():
                digits += char
                continue
            if char != "," or not digits or int(digits) >= self.chips:
                break  # another character or an invalid id ends the list
            chips.append(int(digits))
            digits = ""
        return chips

    def chip(self, device: int) -> int | None:
        """The physical chip behind runtime id ``device``; None if there is none."""
        return self._visible[device] if 0 <= device < len(self._visible) else None

    def init_by_other_library(self) -> None:
        """What ais_bench's aclInit does to the process's one ACL."""
        self.initialised, self._visible = True, self.visible_chips()

    def finalize_by_other_library(self) -> None:
        self.initialised = False

    def _init(self) -> int:
        if self.initialised:
            return ACL_ERROR_REPEAT_INITIALIZE
        self.init_by_other_library()
        self.live["acl"] = "acl.init"
        return 0

    def _finalize(self) -> int:
        if not self.initialised:
            return ACL_ERROR_REPEAT_FINALIZE
        self.live.pop("acl", None)
        self.initialised = False
        return 0

    # -- devices and contexts --------------------------------------------------------------

    @property
    def current_context(self) -> Any:
        return getattr(self._thread, "context", None)

    def _set_device(self, device: int) -> int:
        chip = self.chip(device)
        if chip is None:
            return ACL_ERROR_RT_INVALID_DEVICEID
        self.opened_chips.append(chip)
        self.live[("device", device)] = f"device {device}"
        self._thread.context = ("default", device)  # aclrtSetDevice's default context
        return 0

    def _reset_device(self, device: int) -> int:
        del self.live[("device", device)]
        return 0

    def _create_context(self, device: int) -> tuple[int, int]:
        assert ("device", device) in self.live, "create_context before set_device"
        self._thread.context = self._new("context")
        return self._thread.context, 0

    def _destroy_context(self, ctx: int) -> int:
        if self.current_context == ctx:
            self._thread.context = None
        return self._release("context")(ctx)

    def _set_context(self, ctx: int) -> int:
        assert self.live.get(ctx) == "context", "set_context of an unknown context"
        self._thread.context = ctx
        return 0

    # -- memory ----------------------------------------------------------------------------

    def _new(self, what: str) -> int:
        self._next += 0x100
        self.live[self._next] = what
        return self._next

    def _release(self, what: str) -> Callable[[int], int]:
        def release(handle: int) -> int:
            assert self.live.get(handle) == what, f"release of {what} {handle:#x} not held"
            del self.live[handle]
            return 0

        return release

    def _alloc(self, size: int, space: str = "device") -> tuple[int, int]:
        if self.current_context is None:
            return 0, ACL_ERROR_RT_CONTEXT_NULL
        ptr = self._new(f"{space} memory")
        self.memory[ptr] = bytearray(size)
        self.space[ptr] = space
        return ptr, 0

    def _alloc_host(self, size: int) -> tuple[int, int]:
        return self._alloc(size, "host")

    def _free(self, space: str) -> Callable[[int], int]:
        def free(ptr: int) -> int:
            assert self.space.get(ptr) == space, f"freeing {ptr:#x} as {space} memory"
            del self.memory[ptr], self.space[ptr]
            return self._release(f"{space} memory")(ptr)

        return free

    def _host_view(self, data: Any) -> int:
        self._next += 0x100
        self.memory[self._next] = memoryview(data).cast("B")
        self.space[self._next] = "host"
        return self._next

    def _ptr_to_numpy(self, ptr: int, shape: tuple[int, ...], npy_type: int) -> np.ndarray:
        dtype = NPY_DTYPES[npy_type]
        return np.frombuffer(self.memory[ptr], dtype, math.prod(shape)).reshape(shape)

    def _memcpy(self, dst: int, dst_max: int, src: int, count: int, kind: int) -> int:
        if self.current_context is None:
            return ACL_ERROR_RT_CONTEXT_NULL
        if self.run_mode == ACL_DEVICE:  # all memory is the device's: only D2D applies
            ok = kind == D2D
        else:
            want = {H2D: ("device", "host"), D2H: ("host", "device"), D2D: ("device", "device")}
            ok = want.get(kind) == (self.space[dst], self.space[src])
        if not ok:
            return ACL_ERROR_INVALID_PARAM
        assert count <= dst_max <= len(self.memory[dst]) and count <= len(self.memory[src])
        self.memory[dst][:count] = self.memory[src][:count]
        return 0

    # -- models ----------------------------------------------------------------------------

    def _load(self, path: str) -> tuple[int, int]:
        if path not in self.models:
            return 0, ACL_ERROR_INVALID_PARAM
        if self.current_context is None:
            return 0, ACL_ERROR_RT_CONTEXT_NULL
        model_id = self._new("model")
        self._loaded[model_id] = path
        return model_id, 0

    def _get_desc(self, desc: int, model_id: int) -> int:
        self._desc[desc] = model_id
        return 0

    def _om(self, desc: int) -> FakeOm:
        return self.models[self._loaded[self._desc[desc]]]

    def _input_dims(self, desc: int, index: int) -> tuple[dict, int]:
        om = self._om(desc)
        return {"name": om.name, "dimCount": len(om.input_dims), "dims": om.input_dims}, 0

    def _output_dims(self, desc: int, index: int) -> tuple[dict, int]:
        om = self._om(desc)
        return {"name": "class", "dimCount": 2, "dims": om.output_dims}, 0

    def _dataset(self) -> int:
        dataset = self._new("dataset")
        self._datasets[dataset] = []
        return dataset

    def _buffer(self, ptr: int, size: int) -> int:
        buf = self._new("data_buffer")
        self._buffers[buf] = (ptr, size)
        return buf

    def _add_buffer(self, dataset: int, buf: int) -> tuple[int, int]:
        self._datasets[dataset].append(buf)
        return dataset, 0

    def _execute(self, model_id: int, in_ds: int, out_ds: int) -> int:
        if self.current_context is None:
            return ACL_ERROR_RT_CONTEXT_NULL
        path = self._loaded[model_id]
        om = self.models[path]
        (in_buf,) = self._datasets[in_ds]
        ptr, size = self._buffers[in_buf]
        assert size == om.input_size and self.space[ptr] == "device"
        images = np.frombuffer(bytes(self.memory[ptr]), om.dtype).reshape(om.input_dims)
        self.executed.append((path, images))
        out = [self._buffers[b] for b in self._datasets[out_ds]]
        assert len(out) == om.num_outputs and out[0][1] == om.output_size
        logits = fake_logits(images, om.classes).astype(om.out_dtype)
        self.memory[out[0][0]][:] = logits.tobytes()
        return 0
