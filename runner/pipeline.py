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
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from .backends import BackendOptions, open_backend
from .cache import CropCache
from .devices import DeviceRef, NodeInfo
from .errors import one_line
from .metrics import TOPK, topk_indices
from .preprocess import ImageError, get_recipe, load_crop, to_tensor

#: Custom Ray resource that counts emulated chips (one per emulated device actor).
EMULATED_RESOURCE = "emulated_npu"
#: A batch that failed this many times is given up and its images recorded as errors.
MAX_BATCH_ATTEMPTS = 3
#: A device whose runtime raised this many times is dropped from the run.
MAX_DEVICE_FAILURES = 2

log = logging.getLogger("cardrunner")


# --------------------------------------------------------------------------- device kinds


@dataclass(frozen=True)
class DeviceKind:
    """How Ray counts, places and exposes one kind of device."""

    resource: str | None  # Ray resource held by each device actor; None: CPU slices
    visible_env: str | None  # variable through which the runtime sees only its own chip
    label: str  # what the devices are called in messages


def device_kind(backend: str, provider: str) -> DeviceKind:
    if backend == "acl" or (backend == "onnxruntime" and provider == "cann"):
        return DeviceKind("NPU", "ASCEND_RT_VISIBLE_DEVICES", "Ascend NPUs")
    if backend == "onnxruntime" and provider == "cuda":
        return DeviceKind("GPU", "CUDA_VISIBLE_DEVICES", "GPUs")
    if backend == "emulated":
        return DeviceKind(EMULATED_RESOURCE, None, "emulated chips (--emulated-chips)")
    return DeviceKind(None, None, "CPU slices")


def device_actor_options(kind: DeviceKind) -> dict[str, Any]:
    """Ray placement for one device actor: exactly one chip, no CPU reservation."""
    opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 2}
    if kind.resource == "GPU":
        opts["num_gpus"] = 1
    elif kind.resource:
        opts["resources"] = {kind.resource: 1}
    return opts


# --------------------------------------------------------------------------- actors


class Preprocessor:
    """Owns one shard of the image list and turns batches of it into crops."""

    def __init__(self, shard: list[tuple[int, str]], recipe: str, cache: CropCache | None = None):
        self.shard = shard
        self.recipe = get_recipe(recipe)
        self.cache = cache
        self.writer = cache.writer() if cache is not None and not cache.complete else None

    def ready(self) -> bool:
        return True

    def load(self, start: int, stop: int) -> tuple[dict[str, Any], int]:
        """Positions [start, stop) of this shard -> (payload, image count).

        Called with ``num_returns=2``: the payload goes to a device actor; the tiny count
        lets the driver tell a failed preprocessing from a failed device.
        """
        t0 = time.time()
        part = self.shard[start:stop]
        if self.cache is not None and self.cache.complete:
            pixels, idx, errs = self.cache.batch([i for i, _ in part])
        else:
            crops, indices, errs = [], [], []
            for index, path in part:
                try:
                    crop = load_crop(path, self.recipe)
                except ImageError as exc:
                    errs.append((index, str(exc)))
                    if self.writer:
                        self.writer.put_error(index, str(exc))
                    continue
                crops.append(crop)
                indices.append(index)
                if self.writer:
                    self.writer.put(index, crop)
            shape = (0, self.recipe.crop, self.recipe.crop, 3)
            pixels = np.stack(crops) if crops else np.zeros(shape, self.recipe.wire_dtype)
            idx = np.asarray(indices, dtype=np.int64)
        payload = {"pixels": pixels, "indices": idx, "errors": errs,
                   "decode_s": time.time() - t0, "ready_at": time.time()}
        return payload, len(part)


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
        bind_chip: bool = False,
    ):
        assigned = os.environ.get(visible_env) if visible_env else None
        if visible_env and bind_chip:
            # Bind the chip the user named; Ray's resource only counts and places.
            os.environ[visible_env] = str(device_id)
        elif assigned:
            device_id = int(assigned.split(",")[0])  # --devices all: the chip Ray gave us
        self.device = device
        self.recipe = get_recipe(recipe)
        self.keep_logits = keep_logits
        self.backend = open_backend(backend, model, device_id, options)
        self.lock = threading.Lock()
        self.last_run_end = 0.0  # when the runtime last went idle
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

    def warm_up(self, batch_size: int, runs: int = 2) -> None:
        """Untimed batches of random data: lazy runtime start-up (kernel selection, first
        executes) must not count as compute time.  Measured here: ONNX Runtime's first
        batch after a single all-zeros warm-up still took 2.5x a steady one on 2 cores."""
        spec = self.backend.input
        shape = (batch_size, *(d if d > 0 else 1 for d in spec.shape[1:]))
        rng = np.random.default_rng(0)
        if spec.dtype == "uint8":
            x = rng.integers(0, 256, size=shape, dtype=np.uint8)
        else:
            x = rng.standard_normal(shape).astype(spec.dtype)
        with self.lock:
            for _ in range(runs):
                self.backend.run(x)

    def infer(self, payload: dict[str, Any], batch_id: int) -> dict[str, Any]:
        start = time.time()
        ready = payload.get("ready_at", start)
        pixels = payload["pixels"]
        n = len(pixels)
        convert_s = infer_s = stall_s = 0.0
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
                # The runtime sat idle although this batch was already decoded: transfer and
                # dispatch that the previous batch's compute did not hide (its conversion is
                # a stage of its own).
                stall_s = max(0.0, run_start - max(ready, self.last_run_end) - convert_s)
                logits, infer_s = self.backend.run(x)
                run_end = self.last_run_end = time.time()
        return {
            "batch": batch_id,
            "device": self.device,
            "indices": payload["indices"],
            "top": topk_indices(logits, TOPK),
            "logits": logits if self.keep_logits else None,
            "errors": payload.get("errors", []),
            "decode_s": payload.get("decode_s", 0.0),
            "handoff_s": max(0.0, start - ready),
            "stall_s": stall_s,
            "convert_s": convert_s,
            "infer_s": infer_s,
            "run_start": run_start,
            "run_end": run_end,
            "n": n,
        }

    def close(self) -> None:
        with self.lock:  # never tear the runtime down under a running batch
            self.backend.close()


# --------------------------------------------------------------------------- planning


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


def _cuts(total: int, weights: list[int], batch_size: int) -> list[int]:
    """Split points of ``total`` items in proportion to ``weights``, at whole batches."""
    acc = np.cumsum([0, *weights]) / max(1, sum(weights))
    cuts = [min(total, int(round(a * total / batch_size)) * batch_size) for a in acc]
    cuts[-1] = total
    return cuts


def default_workers(cores: int, cpu_inference: bool) -> int:
    """Preprocessing actors for a node of ``cores`` cores.

    Accelerators leave the host's cores to decoding: one actor per core.  CPU slices run
    inference on those same cores, where decoding needs a small share (about 5 ms per image
    against about 50 ms of EN-B3 inference per core) and every extra decoder preempts one
    more inference thread at once, which is what stretches a batch: half the cores.
    """
    return max(1, cores // 2 if cpu_inference else cores)


def plan_shards(
    todo: list[tuple[int, str]], nodes: list[NodeInfo], batch_size: int, workers: int | None,
    cpu_inference: bool = False,
) -> list[tuple[NodeInfo, list[tuple[int, str]], float]]:
    """(node, shard, CPUs per actor) for every preprocessing actor.

    The image list is split across the devices' nodes in proportion to their device counts,
    so each device's batches are decoded on its own host; each node's part is split across
    ``workers`` actors (default: ``default_workers``).  Shards are cut at whole batches, so
    only the last batch can be partial (fixed-batch .om files pad it).
    """
    unique = list({node.node_id: node for node in nodes}.values())
    per_node = [sum(n.node_id == u.node_id for n in nodes) for u in unique]
    planned = []
    for node, (a, b) in zip(unique, pairwise(_cuts(len(todo), per_node, batch_size)),
                            strict=True):
        part = todo[a:b]
        if not part:
            continue
        wanted = workers or default_workers(node.cpus, cpu_inference)
        k = max(1, min(wanted, math.ceil(len(part) / batch_size)))
        cpus = min(1.0, max(node.cpus, 1) / k)
        planned += [(node, part[x:y], cpus)
                    for x, y in pairwise(_cuts(len(part), [1] * k, batch_size)) if y > x]
    return planned


# --------------------------------------------------------------------------- driver


@dataclass
class DeviceState:
    ref: DeviceRef
    actor: Any
    info: dict[str, Any]
    node: str = ""  # name of the node it runs on: it takes that node's batches first
    in_flight: int = 0
    last_reply: float = 0.0  # time.time() of its latest reply: its next call starts no earlier
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
    given_up: list[tuple[int, str]] = field(default_factory=list)  # (batch id, reason)


@dataclass
class _Work:
    batch: Batch
    payload: Any = None  # ObjectRef of the preprocessed batch once submitted
    status: Any = None  # ObjectRef of the preprocessor's image count (None: nothing to check)
    ready_seen: float | None = None  # when the driver first saw the payload made (hang clock)
    slow_prep_warned: bool = False
    attempts: int = 0


def drive(
    devices: list[DeviceState],
    batches: list[Batch],
    submit_prep: Callable[[Batch], tuple[Any, Any]],
    on_result: Callable[[dict[str, Any]], None],
    in_flight: int = 2,
    on_give_up: Callable[[Batch, str], None] | None = None,
    batch_timeout_s: float = 600.0,
) -> DriveOutcome:
    """Feed ``batches`` to ``devices`` keeping ``in_flight`` per device; re-queue on failure.

    ``submit_prep(batch)`` returns (payload ref, status ref); the payload is reused when a
    batch moves to another device after its device failed, and made again when it was the
    preprocessing that failed (which is then not held against the device).  Each node has
    its own queue (the batches its preprocessors own); a device takes from its node's queue
    and, once that is empty, from the fullest other one.  A device call that runs longer
    than ``batch_timeout_s`` once its batch has been decoded marks its device as hung: the
    actor is killed and its batches move.
    """
    queues: dict[str, deque[_Work]] = {}
    for b in batches:
        queues.setdefault(b.node, deque()).append(_Work(b))
    pending: dict[Any, tuple[_Work, DeviceState, float]] = {}
    given_up: list[tuple[int, str]] = []
    started = time.time()

    def next_queue(dev: DeviceState) -> deque | None:
        own = queues.get(dev.node)
        if own:
            return own
        return max((q for q in queues.values() if q), key=len, default=None)

    def fill(dev: DeviceState) -> None:
        while dev.alive and dev.in_flight < in_flight and (queue := next_queue(dev)):
            work = queue.popleft()
            if work.payload is None:
                work.payload, work.status = submit_prep(work.batch)
            ref = dev.actor.infer.remote(work.payload, work.batch.id)
            pending[ref] = (work, dev, time.time())
            dev.in_flight += 1

    def drop(dev: DeviceState, reason: str) -> None:
        if dev.alive:
            dev.failed_at = time.time() - started
            dev.failure = reason
            log.warning("device %s dropped: %s", dev.ref, reason)

    def give_up(work: _Work, reason: str) -> None:
        given_up.append((work.batch.id, reason))
        if on_give_up:
            on_give_up(work.batch, reason)

    def retry(work: _Work, reason: str) -> None:
        work.attempts += 1
        if work.attempts >= MAX_BATCH_ATTEMPTS or not any(d.alive for d in devices):
            give_up(work, reason)
        else:
            queues[work.batch.node].appendleft(work)

    def kill_hung(replied: list) -> None:
        # Checked on every turn, so that busy peers cannot hide a hang.  A device runs its
        # calls in order, so its oldest call started no earlier than its last reply, its
        # submission, and its batch being decoded: a batch still being decoded is the
        # preprocessing's delay, never held against the device.
        now = time.time()
        for ref, (work, dev, since) in list(pending.items()):
            if ref in replied or not dev.alive:
                continue
            if now - max(since, dev.last_reply, work.ready_seen or 0.0) <= batch_timeout_s:
                continue
            if work.ready_seen is None:
                if ray.wait([work.payload], timeout=0)[0]:
                    work.ready_seen = now  # its clock starts now: at most one timeout late
                elif not work.slow_prep_warned:
                    work.slow_prep_warned = True
                    log.warning("batch %d: preprocessing has not finished in %g s; waiting",
                                work.batch.id, batch_timeout_s)
                continue
            drop(dev, f"batch {work.batch.id} ran over {batch_timeout_s:g} s: hung")
            ray.kill(dev.actor)  # its pending calls now fail and are re-queued

    for dev in devices:
        fill(dev)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=min(5.0, batch_timeout_s))
        kill_hung(done)
        if not done:
            continue
        ref = done[0]
        work, dev, _ = pending.pop(ref)
        dev.in_flight -= 1
        dev.last_reply = time.time()
        try:
            result = ray.get(ref)
        except RayError as exc:
            reason = one_line(exc)
            if _failed(work.status):
                work.payload = work.status = work.ready_seen = None  # make it again
                retry(work, f"preprocessing failed: {reason}")
            else:
                dev.failures += 1
                if isinstance(exc, RayActorError) or dev.failures >= MAX_DEVICE_FAILURES:
                    drop(dev, reason)
                dev.moved_batches += 1
                retry(work, reason)
            for d in sorted(devices, key=lambda d: d is dev):  # others get the batch first
                fill(d)
            continue
        on_result(result)
        fill(dev)
    # Batches still queued when every device has died are given up too.
    for queue in queues.values():
        while queue:
            give_up(queue.popleft(), "no device left")
    return DriveOutcome(time.time() - started, started, given_up)


def _failed(status: Any) -> bool:
    """Whether the preprocessing behind a batch failed (its tiny status ref holds an error)."""
    if status is None:
        return False
    try:
        ray.get(status, timeout=30)
    except GetTimeoutError:
        return False
    except RayError:
        return True
    return False


# --------------------------------------------------------------------------- Ray


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
