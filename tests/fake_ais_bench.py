"""Fakes of ais_bench's ``ais_bench.infer.interface``, one per generation a host may have.

Each follows the real source, read for this fake:

* ``OLD``: Ascend/tools ``ais-bench_workload/tool/ais_bench`` at 9d6da90 (2023-06):
  ``sumary`` / ``reset_sumaryinfo``; ``exec_time_list`` of ms floats; no ``free_resource``; an
  instance ``finalize()`` whose TensorContext::Finalize destroys every context and device of
  the process and calls aclFinalize; the context is made current only by the constructor
  (PyInferenceSession::Init), so ``infer`` on another thread has none; ``run()`` passes the
  array's data pointer as is (a non-contiguous array is read wrongly).
* ``THREADED``: mjlovesz/sync-ait 68d6db94b (2023-09-11, "add multithreaded compute"):
  ``free_resource``, a static ``finalize()``, SetContext at the start of every inference.
* ``PAIRS``: sync-ait 8c67f6f51 (2023-10-09): ``exec_time_list`` holds ``(start_ms, end_ms)``
  float32 offsets from the session's creation.
* ``NEW``: sync-ait c432ed56 (2024-05): the wrapper spells ``summary`` / ``reset_summaryinfo``.

ACL is one per process: the first session initialises it (TensorContext singleton ->
DeviceManager::InitDevices -> aclInit), which a ``FakeAcl`` passed as ``acl`` then sees; after
finalize no session opens again (the singleton does not initialise twice). A session's
compute takes 2.5 ms per image of its batch on a fake clock, 1 ms apart.
"""

from __future__ import annotations

import enum
import threading
import types
from dataclasses import dataclass, field

import numpy as np

from tests.fake_acl import FakeAcl, FakeOm, fake_logits

#: aclruntime.dtype (backend/python/src/PyTensor/PyTensor.cpp), valued as aclDataType.
dtype = enum.IntEnum("dtype", {"float32": 0, "float16": 1, "int8": 2, "int32": 3, "uint8": 4})


@dataclass(frozen=True)
class Generation:
    name: str
    spelling: str  # "sumary" | "summary"
    pairs: bool  # exec_time_list entries are (start_ms, end_ms)
    free_resource: bool  # and a static finalize(); else finalize() is per instance
    context_per_call: bool  # infer makes the session's context current itself


OLD = Generation("Ascend/tools 2023-06", "sumary", False, False, False)
THREADED = Generation("ait 68d6db94b 2023-09", "sumary", False, True, True)
PAIRS = Generation("ait 8c67f6f51 2023-10", "sumary", True, True, True)
NEW = Generation("ait c432ed56 2024-05", "summary", True, True, True)
GENERATIONS = (OLD, THREADED, PAIRS, NEW)


@dataclass
class AisProcess:
    """What ais_bench holds for the whole process, and what a test may check."""

    acl: FakeAcl | None
    events: list[tuple] = field(default_factory=list)
    initialised: bool = False
    finalized: bool = False
    live: set[int] = field(default_factory=set)  # ids of sessions whose model is loaded
    thread: threading.local = field(default_factory=threading.local)  # .device: current ctx

    def names(self) -> list[str]:
        return [event[0] for event in self.events]


def fake_ais_bench(
    models: dict[str, FakeOm], generation: Generation = NEW, acl: FakeAcl | None = None
) -> types.ModuleType:
    """A stand-in for ``ais_bench.infer.interface``; ``module.process`` is its AisProcess."""
    models = {str(path): om for path, om in models.items()}
    process = AisProcess(acl)

    def desc(name: str, shape: list[int], kind: str, size: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(
            name=name, shape=shape, datatype=dtype[kind], size=size, realsize=size
        )

    class InferSession:
        def __init__(
            self, device_id: int, model_path: str, acl_json_path: str | None = None,
            debug: bool = False, loop: int = 1,
        ) -> None:
            process.events.append(("InferSession", device_id, model_path))
            if process.finalized:
                raise RuntimeError("acl open device failed: ACL was finalized in this process")
            if not process.initialised:
                process.initialised = True
                if acl is not None:
                    acl.init_by_other_library()
            self.device = device_id
            self.chip = acl.chip(device_id) if acl is not None else device_id
            if self.chip is None:
                raise RuntimeError(f"acl open device {device_id} failed")
            process.thread.device = device_id  # Init: the context is current on this thread
            if model_path not in models:
                raise RuntimeError(f"load model failed:\n{model_path}")
            self.om = models[model_path]
            self.times: list = []
            self.clock = 0.0  # ms since the session was created
            process.live.add(id(self))

        def get_inputs(self) -> list[types.SimpleNamespace]:
            om = self.om
            return [desc(om.name, om.input_dims, om.dtype, om.input_size)]

        def get_outputs(self) -> list[types.SimpleNamespace]:
            om = self.om
            return [desc("class", om.output_dims, om.out_dtype, om.output_size)]

        def infer(self, feeds: list, mode: str = "static", custom_sizes: int = 100000,
                  out_array: bool = True) -> list[np.ndarray]:
            if process.finalized or id(self) not in process.live:
                raise RuntimeError("acl execute failed: the model or ACL was released")
            if generation.context_per_call:
                process.thread.device = self.device
            if getattr(process.thread, "device", None) != self.device:
                raise RuntimeError("aclrtMemcpy failed, ret 107002: context is null")
            (batch,) = feeds
            # Until 5e6519892 (2023-10-08, just before PAIRS) run() read the array's pointer.
            assert batch.flags.c_contiguous or generation.pairs, "a strided array read wrongly"
            assert batch.dtype == self.om.dtype and list(batch.shape) == self.om.input_dims
            process.events.append(("infer", batch.copy(), threading.current_thread().name))
            start = self.clock + 1.0
            self.clock = end = start + 2.5 * self.om.batch
            if generation.pairs:  # float32 in C++, handed to Python as floats
                self.times.append((float(np.float32(start)), float(np.float32(end))))
            else:
                self.times.append(2.5 * self.om.batch)
            return [fake_logits(batch, self.om.classes).astype(self.om.out_dtype)]

        def _summary(self) -> types.SimpleNamespace:
            return types.SimpleNamespace(exec_time_list=list(self.times))

        def _reset(self) -> None:
            process.events.append(("reset",))
            self.times.clear()

        def _free(self) -> None:
            process.events.append(("free_resource", self.om.batch))
            process.live.discard(id(self))

        def _finalize_process(self: InferSession | None = None) -> None:
            others = len(process.live - {id(self)})
            process.events.append(("finalize", others))
            process.live.clear()  # every context and device of the process is gone
            process.finalized = True
            if acl is not None:
                acl.finalize_by_other_library()

        def __del__(self) -> None:  # ~PyInferenceSession(): Destroy() frees the model
            if id(self) in process.live:
                process.live.discard(id(self))
                process.events.append(("del", self.om.batch))

    setattr(InferSession, generation.spelling, InferSession._summary)
    setattr(InferSession, f"reset_{generation.spelling}info", InferSession._reset)
    if generation.free_resource:
        InferSession.free_resource = InferSession._free
        InferSession.finalize = staticmethod(InferSession._finalize_process)
    else:
        InferSession.finalize = InferSession._finalize_process
    module = types.ModuleType("ais_bench.infer.interface")
    module.InferSession = InferSession
    module.process = process
    return module
