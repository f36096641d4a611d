"""Ray actors and the driver loop.

Data flows one way::

    driver: split the image list into shards, plan batches
      -> Preprocessor actor (one per shard): decode + crop -> uint8 crops in the object store
      -> DeviceWorker actor (one per chip): normalise, run the runtime, top-k
      -> driver: journal, score, report

The driver passes the preprocessor's ObjectRef straight to a device actor, so pixels never
travel through the driver.  It keeps ``in_flight`` batches queued per device and each
device actor runs two calls concurrently (``max_concurrency=2``): while one batch is in the
runtime, the next one's pixels are already being fetched and converted.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from .backends import BackendOptions, open_backend
from .cache import CropCache
from .devices import DeviceRef
from .metrics import TOPK, topk_indices
from .preprocess import ImageError, get_recipe, load_crop, to_tensor

#: Custom Ray resource that counts emulated chips (one per emulated device actor).
EMULATED_RESOURCE = "emulated_npu"
#: A batch that failed on this many devices is given up and its images recorded as errors.
MAX_BATCH_ATTEMPTS = 3
#: A device whose runtime raised this many times is dropped from the run.
MAX_DEVICE_FAILURES = 2


# --------------------------------------------------------------------------- actors


class Preprocessor:
    """Owns one shard of the image list and turns batches of it into crops."""

    def __init__(self, shard: list[tuple[int, str]], recipe: str, cache: CropCache | None = None):
        self.shard = shard
        self.recipe = get_recipe(recipe)
        self.host = socket.gethostname()
        self.cache = cache
        self.writer = cache.writer() if cache is not None and not cache.complete else None

    def ready(self) -> bool:
        return True

    def load(self, start: int, stop: int) -> dict[str, Any]:
        """Positions [start, stop) of this shard -> stacked crops plus per-image errors."""
        t0 = time.time()
        part = self.shard[start:stop]
        if self.cache is not None and self.cache.complete:
            pixels, idx, errs = self.cache.batch([i for i, _ in part])
            return {"pixels": pixels, "indices": idx, "errors": errs, "decode_s": time.time() - t0,
                    "ready_at": time.time()}
        crops, indices, errors = [], [], []
        for index, path in part:
            try:
                crop = load_crop(path, self.recipe)
            except ImageError as exc:
                errors.append((index, str(exc)))
                if self.writer:
                    self.writer.put_error(index, str(exc))
                continue
            crops.append(crop)
            indices.append(index)
            if self.writer:
                self.writer.put(index, crop)
        shape = (0, self.recipe.crop, self.recipe.crop, 3)
        pixels = np.stack(crops) if crops else np.zeros(shape, self.recipe.wire_dtype)
        return {
            "pixels": pixels,
            "indices": np.asarray(indices, dtype=np.int64),
            "errors": errors,
            "decode_s": time.time() - t0,
            "ready_at": time.time(),
        }


class DeviceWorker:
    """The only owner of a runtime: one per device."""

    def __init__(
        self,
        backend: str,
        model: Any,
        device: str,
        device_id: int,
        options: BackendOptions,
        recipe: str,
        keep_logits: bool,
        visible_env: str | None = None,
    ):
        assigned = os.environ.get(visible_env) if visible_env else None
        if visible_env:
            # Bind the chip the user named; Ray's resource only counts and places.
            os.environ[visible_env] = str(device_id)
        self.device = device
        self.recipe = get_recipe(recipe)
        self.keep_logits = keep_logits
        self.backend = open_backend(backend, model, device_id, options)
        self.lock = threading.Lock()
        self.info = {
            "device": device,
            "device_id": device_id,
            "ray_assigned": assigned,
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "backend": self.backend.name,
            "provider": self.backend.provider,
            "emulated": self.backend.emulated,
            "input": {
                "name": self.backend.input.name,
                "shape": list(self.backend.input.shape),
                "dtype": self.backend.input.dtype,
            },
            "num_classes": self.backend.num_classes,
        }

    def describe(self) -> dict[str, Any]:
        return self.info

    def infer(self, payload: dict[str, Any], batch_id: int) -> dict[str, Any]:
        start = time.time()
        pixels = payload["pixels"]
        n = len(pixels)
        convert_s = infer_s = 0.0
        logits = np.zeros((0, self.backend.num_classes), np.float32)
        run_start = run_end = start
        if n:
            t0 = time.perf_counter()
            if payload.get("tensor") or str(pixels.dtype) == self.backend.input.dtype == "uint8":
                x = pixels
            else:
                x = to_tensor(pixels, self.recipe)
            convert_s = time.perf_counter() - t0
            with self.lock:
                run_start = time.time()
                logits, infer_s = self.backend.run(x)
                run_end = time.time()
        return {
            "batch": batch_id,
            "device": self.device,
            "indices": payload["indices"],
            "top": topk_indices(logits, TOPK),
            "logits": logits if self.keep_logits else None,
            "errors": payload.get("errors", []),
            "decode_s": payload.get("decode_s", 0.0),
            "handoff_s": max(0.0, start - payload.get("ready_at", start)),
            "convert_s": convert_s,
            "infer_s": infer_s,
            "start": start,
            "run_start": run_start,
            "run_end": run_end,
            "n": n,
        }

    def close(self) -> None:
        self.backend.close()


def device_actor_options(backend: str, provider: str) -> dict[str, Any]:
    """Ray placement for one device actor: exactly one chip, no CPU reservation."""
    opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 2}
    if backend == "acl" or (backend == "onnxruntime" and provider == "cann"):
        opts["resources"] = {"NPU": 1}
    elif backend == "onnxruntime" and provider == "cuda":
        opts["num_gpus"] = 1
    elif backend == "emulated":
        opts["resources"] = {EMULATED_RESOURCE: 1}
    return opts


def visible_devices_env(backend: str, provider: str) -> str | None:
    if backend == "acl" or (backend == "onnxruntime" and provider == "cann"):
        return "ASCEND_RT_VISIBLE_DEVICES"
    if backend == "onnxruntime" and provider == "cuda":
        return "CUDA_VISIBLE_DEVICES"
    return None


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class Batch:
    id: int
    shard: int
    start: int  # position range within the shard
    stop: int
    node: str = ""  # the node whose preprocessor owns the shard


def plan_batches(
    shard_sizes: list[int], batch_size: int, shard_nodes: list[str] | None = None
) -> list[Batch]:
    """Batches of each shard, interleaved across shards so all preprocessors stay busy."""
    nodes = shard_nodes or [""] * len(shard_sizes)
    per_shard = [
        [(s, a, min(a + batch_size, size)) for a in range(0, size, batch_size)]
        for s, size in enumerate(shard_sizes)
    ]
    order = []
    for row in range(max((len(p) for p in per_shard), default=0)):
        order += [p[row] for p in per_shard if row < len(p)]
    return [Batch(i, s, a, b, nodes[s]) for i, (s, a, b) in enumerate(order)]


@dataclass
class DeviceState:
    ref: DeviceRef
    actor: Any
    info: dict[str, Any]
    node: str = ""  # name of the node it runs on: it takes that node's batches first
    in_flight: int = 0
    failures: int = 0
    failed_at: float | None = None
    failure: str = ""
    moved_batches: int = 0

    @property
    def alive(self) -> bool:
        return self.failed_at is None


@dataclass
class DriveOutcome:
    """What ``drive`` observed; scoring and reporting happen elsewhere."""

    wall_s: float
    started: float
    devices: list[DeviceState]
    given_up: list[tuple[int, str]] = field(default_factory=list)  # (batch id, reason)


def drive(
    devices: list[DeviceState],
    batches: list[Batch],
    submit_prep: Callable[[Batch], Any],
    on_result: Callable[[dict[str, Any]], None],
    in_flight: int = 2,
    on_give_up: Callable[[Batch, str], None] | None = None,
) -> DriveOutcome:
    """Feed ``batches`` to ``devices`` keeping ``in_flight`` per device; re-queue on failure.

    ``submit_prep(batch)`` returns an ObjectRef of the batch payload (or a payload); the same
    ref is reused when a batch moves to another device after its device failed.  Each node
    has its own queue (the batches its preprocessors own); a device takes from its node's
    queue and, once that is empty, from the fullest other one.
    """
    queues: dict[str, deque[tuple[Batch, Any, int]]] = {}
    for b in batches:
        queues.setdefault(b.node, deque()).append((b, None, 0))
    pending: dict[Any, tuple[Batch, Any, int, DeviceState]] = {}
    given_up: list[tuple[int, str]] = []
    started = time.time()

    def next_queue(dev: DeviceState) -> deque | None:
        own = queues.get(dev.node)
        if own:
            return own
        return max((q for q in queues.values() if q), key=len, default=None)

    def fill(dev: DeviceState) -> None:
        while dev.alive and dev.in_flight < in_flight and (queue := next_queue(dev)):
            batch, payload, attempts = queue.popleft()
            if payload is None:
                payload = submit_prep(batch)
            ref = dev.actor.infer.remote(payload, batch.id)
            pending[ref] = (batch, payload, attempts, dev)
            dev.in_flight += 1

    def fail(dev: DeviceState, reason: str, fatal: bool) -> None:
        dev.failures += 1
        if fatal or dev.failures >= MAX_DEVICE_FAILURES:
            if dev.alive:
                dev.failed_at = time.time() - started
                dev.failure = reason
                logging.getLogger("cardrunner").warning("device %s dropped: %s", dev.ref, reason)

    for dev in devices:
        fill(dev)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        ref = done[0]
        batch, payload, attempts, dev = pending.pop(ref)
        dev.in_flight -= 1
        try:
            result = ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            reason = one_line(exc)
            fail(dev, reason, fatal=isinstance(exc, RayActorError))
            if attempts + 1 >= MAX_BATCH_ATTEMPTS or not any(d.alive for d in devices):
                given_up.append((batch.id, reason))
                if on_give_up:
                    on_give_up(batch, reason)
            else:
                dev.moved_batches += 1
                queues[batch.node].appendleft((batch, payload, attempts + 1))
            for d in devices:
                fill(d)
            continue
        on_result(result)
        fill(dev)
        if not dev.alive:
            for d in devices:
                fill(d)
    # Batches still queued when every device has died are given up too.
    for queue in queues.values():
        while queue:
            batch, _, _ = queue.popleft()
            given_up.append((batch.id, "no device left"))
            if on_give_up:
                on_give_up(batch, "no device left")
    return DriveOutcome(time.time() - started, started, devices, given_up)


def one_line(exc: BaseException) -> str:
    """The innermost error message of a Ray exception, on one line."""
    cause = getattr(exc, "cause", None)
    if cause is not None and not isinstance(cause, RayTaskError):
        exc = cause
    text = str(exc).strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {last.strip()}"[:300]


def bind_ray_to_loopback() -> None:
    """Keep every socket of Ray processes started from here on 127.0.0.1.

    On Linux Ray resolves "127.0.0.1" to the host's routable address; its single-host mode
    (the default on macOS and Windows) uses loopback.  The constant is read at import time,
    so it is set both for this process and, through the environment, for its children.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


def start_ray(address: str | None, resources: dict[str, float], dashboard: bool = False) -> None:
    """Join ``address`` or start an embedded Ray bound to loopback (no dashboard unless asked)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray._private.accelerators.npu").setLevel(logging.ERROR)
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return
    bind_ray_to_loopback()
    ray.init(
        address="local",  # a new embedded instance, never a stray cluster on this host
        resources=resources,
        include_dashboard=dashboard,
        logging_level=logging.WARNING,
    )
