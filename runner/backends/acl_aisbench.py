"""ais_bench's ``InferSession`` on one chip, for every ais_bench generation an Atlas host may have.

Written against, and faked in ``tests/fake_ais_bench.py`` from, Ascend/tools
``ais-bench_workload/tool/ais_bench`` (commit 9d6da90, 2023-06) and gitee ascend/ait as mirrored
by mjlovesz/sync-ait, ``ait/components/benchmark`` up to c432ed56 (2024-05).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import one_line
from . import BackendError
from .acl_devices import place
from .acl_om import Om, Tensor, add_model, describe
from .acl_pyacl import USERS, USERS_LOCK, Users

log = logging.getLogger("cardrunner")


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


class AisBench:
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
        self.models: dict[int, Om] = {}
        with USERS_LOCK:
            users = USERS.setdefault(session_cls, Users())
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
            info = describe(
                path,
                listed_batch,
                declared,
                Tensor(inp.name, list(inp.shape), int(inp.datatype), inp.size),
                Tensor(out.name, list(out.shape), int(out.datatype), out.size),
            )
            add_model(self.models, info)
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
            with USERS_LOCK:
                USERS[self._cls].finalized = True
            attempt("InferSession.finalize", *finalize)
        del finalize
        if errors:
            raise errors[0]

    def close(self) -> None:
        if self._thread is None:
            return
        with USERS_LOCK:
            users = USERS[self._cls]
            users.count -= 1
            last = users.count == 0
        try:
            self._on_thread(self._release, last)
        finally:
            self._thread.shutdown(wait=True)
            self._thread = None


def import_ais_bench() -> Any:
    try:
        from ais_bench.infer.interface import InferSession
    except ImportError:
        return None
    return InferSession
