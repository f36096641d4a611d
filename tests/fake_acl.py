"""Recording fakes of CANN's pyACL ``acl`` module and of ais_bench's ``InferSession``.

No Ascend chip is available to the tests, so ``runner.backends.acl`` is checked against these:
``monkeypatch.setitem(sys.modules, "acl", FakeAcl(models))``. ``FakeAcl`` keeps every call,
simulates device and host memory so ``memcpy`` really copies bytes, and "executes" a model as
``logits[i, k] = mean(image i) * (k + 1)``, so a test can tell which image fed which row. Any
call named in ``fail`` returns that error code instead of acting. The return conventions
(``ret``, ``(value, ret)`` or a bare handle) follow the pyACL documentation.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

ACL_ERROR_INVALID_PARAM = 100000
H2D, D2H = 1, 2


@dataclass(frozen=True)
class FakeOm:
    """A fixed-batch .om as the fake runtime describes it."""

    batch: int
    image: tuple[int, ...] = (3, 4, 4)  # dims after the batch axis (NHWC for uint8)
    classes: int = 5
    dtype: str = "float32"
    name: str = "image"
    num_outputs: int = 1

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
        return self.batch * self.classes * 4


def fake_logits(images: np.ndarray, classes: int) -> np.ndarray:
    """What the fake model computes: row i is image i's mean times 1..classes."""
    means = images.reshape(len(images), -1).astype(np.float64).mean(axis=1)
    return (means[:, None] * np.arange(1, classes + 1)).astype(np.float32)


class FakeAcl:
    """The ``acl`` module: ``acl.init``, ``acl.rt.*``, ``acl.mdl.*``, ``acl.util.*``.

    ``util_api="bytes"`` offers newer CANN's ``bytes_to_ptr``/``ptr_to_bytes``,
    ``"numpy"`` older CANN's ``numpy_to_ptr``/``ptr_to_numpy``.
    """

    def __init__(self, models: dict[str, FakeOm], util_api: str = "bytes") -> None:
        self.models = {str(path): om for path, om in models.items()}
        self.calls: list[tuple[str, tuple]] = []
        self.fail: dict[str, int] = {}
        self.memory: dict[int, Any] = {}  # ptr -> bytearray (device/host) or memoryview
        self.space: dict[int, str] = {}  # ptr -> "device" | "host"
        self.live: dict[Any, str] = {}  # every resource not yet released
        self.executed: list[tuple[str, np.ndarray]] = []  # (.om path, input batch)
        self.current_context: int | None = None
        self._loaded: dict[int, str] = {}  # model id -> path
        self._desc: dict[int, int] = {}  # desc -> model id
        self._datasets: dict[int, list[int]] = {}
        self._buffers: dict[int, tuple[int, int]] = {}
        self._next = 0x1000
        self.init = self._api("acl.init", "ret", self._init)
        self.finalize = self._api("acl.finalize", "ret", self._finalize)
        self.create_data_buffer = self._api("acl.create_data_buffer", "handle", self._buffer)
        self.destroy_data_buffer = self._api(
            "acl.destroy_data_buffer", "ret", self._release("data_buffer")
        )
        self.rt = types.SimpleNamespace(
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

    # -- recording and failure injection --------------------------------------------------

    def _api(self, name: str, style: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.calls.append((name, args))
            code = self.fail.get(name)
            if code is None:
                return fn(*args)
            return {"ret": code, "pair": (0, code), "handle": 0}[style]

        return call

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def args(self, name: str) -> list[tuple]:
        return [args for called, args in self.calls if called == name]

    def leaks(self) -> list[str]:
        return sorted(self.live.values())

    # -- resources -------------------------------------------------------------------------

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

    def _init(self) -> int:
        assert "acl" not in self.live, "acl.init called twice"
        self.live["acl"] = "acl.init"
        return 0

    def _finalize(self) -> int:
        del self.live["acl"]
        return 0

    def _set_device(self, device: int) -> int:
        self.live[("device", device)] = f"device {device}"
        return 0

    def _reset_device(self, device: int) -> int:
        del self.live[("device", device)]
        return 0

    def _create_context(self, device: int) -> tuple[int, int]:
        assert ("device", device) in self.live, "create_context before set_device"
        self.current_context = self._new("context")
        return self.current_context, 0

    def _destroy_context(self, ctx: int) -> int:
        self.current_context = None
        return self._release("context")(ctx)

    def _set_context(self, ctx: int) -> int:
        assert self.live.get(ctx) == "context", "set_context of an unknown context"
        self.current_context = ctx
        return 0

    def _alloc(self, size: int, space: str = "device") -> tuple[int, int]:
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
        assert npy_type == 11, "only NPY_FLOAT32 is expected"
        return np.frombuffer(self.memory[ptr], np.float32, math.prod(shape)).reshape(shape)

    def _memcpy(self, dst: int, dst_max: int, src: int, count: int, kind: int) -> int:
        want = {H2D: ("device", "host"), D2H: ("host", "device")}[kind]
        assert (self.space[dst], self.space[src]) == want, f"memcpy kind {kind} misdirected"
        assert count <= dst_max <= len(self.memory[dst]) and count <= len(self.memory[src])
        self.memory[dst][:count] = self.memory[src][:count]
        return 0

    # -- models ----------------------------------------------------------------------------

    def _load(self, path: str) -> tuple[int, int]:
        if path not in self.models:
            return 0, ACL_ERROR_INVALID_PARAM
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
        assert self.current_context is not None, "execute without a current context"
        path = self._loaded[model_id]
        om = self.models[path]
        (in_buf,) = self._datasets[in_ds]
        ptr, size = self._buffers[in_buf]
        assert size == om.input_size and self.space[ptr] == "device"
        images = np.frombuffer(bytes(self.memory[ptr]), om.dtype).reshape(om.input_dims)
        self.executed.append((path, images))
        out = [self._buffers[b] for b in self._datasets[out_ds]]
        assert len(out) == om.num_outputs and out[0][1] == om.output_size
        self.memory[out[0][0]][:] = fake_logits(images, om.classes).tobytes()
        return 0


def fake_ais_bench(
    models: dict[str, FakeOm], calls: list, spelling: str = "summary"
) -> types.ModuleType:
    """A stand-in for ``ais_bench.infer.interface`` whose sessions run the fake model.

    ``spelling="sumary"`` mimics older ais_bench (``sumary``/``reset_sumaryinfo``).
    """
    models = {str(path): om for path, om in models.items()}

    class InferSession:
        def __init__(self, device_id: int, model_path: str) -> None:
            calls.append(("InferSession", (device_id, model_path)))
            if model_path not in models:
                raise RuntimeError(f"load model failed:\n{model_path}")
            self.om = models[model_path]
            self.times: list[float] = []

        def get_inputs(self) -> list[types.SimpleNamespace]:
            om = self.om
            return [
                types.SimpleNamespace(
                    name=om.name, shape=om.input_dims, size=om.input_size, realsize=om.input_size
                )
            ]

        def get_outputs(self) -> list[types.SimpleNamespace]:
            om = self.om
            return [
                types.SimpleNamespace(
                    name="class", shape=om.output_dims, size=om.output_size, realsize=om.output_size
                )
            ]

        def infer(self, feeds: list[np.ndarray], mode: str = "static") -> list[np.ndarray]:
            calls.append(("infer", (feeds[0].copy(),)))
            (batch,) = feeds
            assert batch.dtype == self.om.dtype and list(batch.shape) == self.om.input_dims
            self.times.append(2.5 * self.om.batch)
            return [fake_logits(batch, self.om.classes)]

        def _summary(self) -> types.SimpleNamespace:
            return types.SimpleNamespace(exec_time_list=list(self.times))

        def _reset(self) -> None:
            calls.append(("reset", ()))
            self.times.clear()

        def free_resource(self) -> None:
            calls.append(("free_resource", (self.om.batch,)))

    setattr(InferSession, spelling, InferSession._summary)
    setattr(InferSession, f"reset_{spelling}info", InferSession._reset)
    module = types.ModuleType("ais_bench.infer.interface")
    module.InferSession = InferSession
    return module
