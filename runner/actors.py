"""The two Ray actors, the messages between them, and the device actors' life cycle.

A ``Preprocessor`` owns one shard of the image list and decodes the batches of a device
call into one ``Payload`` (uint8 crops in the object store).  A ``DeviceWorker`` owns one
device's runtime (nothing else opens one): it takes a payload by reference, runs its
batches back to back and returns one ``BatchReply`` per model batch.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .backends import BackendOptions, open_backend
from .binding import bind_device
from .cache import CacheWriter, CropCache
from .config import ConfigError, RunConfig
from .devices import DeviceKind, DeviceRef, NodeInfo, device_actor_options
from .errors import one_line
from .metrics import TOPK, topk_indices
from .preprocess import ImageError, decode_crop, get_recipe, to_tensor
from .sources import Location, forwarded_env, read_images

#: Seconds to wait for an actor to start (a model load) or to warm up (a first batch).
START_TIMEOUT_S = 300
#: Times Ray makes a preprocessing call again on a restarted preprocessor before the call
#: fails (then the driver makes it again, one batch per call, up to its own limit): a batch
#: whose images crash the decoder is given up, a preprocessor lost once is not.
PREP_TASK_RETRIES = 2
#: CPUs a preprocessing actor reserves: a token, see ``start_preprocessors``.
PREP_CPUS = 0.01

log = logging.getLogger("cardrunner")


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Part:
    """One model batch inside a payload: the images it decoded, and those it could not."""

    indices: np.ndarray  # image indices of the decoded images, in pixel order
    errors: list[tuple[int, str]] = field(default_factory=list)
    decode_s: float = 0.0


@dataclass(frozen=True)
class Payload:
    """The pixels of one device call: every part's images, concatenated in part order."""

    pixels: np.ndarray
    parts: list[Part]
    ready_at: float | None  # time.time() when the payload was made; None: made before the run
    tensor: bool = False  # pixels already are the model's input (pure-infer)
    node: str = ""  # the Ray node that decoded it

    def part_pixels(self, part: int) -> np.ndarray:
        start = sum(len(p.indices) for p in self.parts[:part])
        return self.pixels[start : start + len(self.parts[part].indices)]


@dataclass
class BatchReply:
    """What a device actor returns for one model batch."""

    batch: int
    device: str
    indices: np.ndarray
    top: np.ndarray  # [n, TOPK] class indices
    logits: np.ndarray | None  # [n, classes] when the run keeps logits
    errors: list[tuple[int, str]]
    decode_s: float
    handoff_s: float  # payload ready -> device call starts (transfer + queueing)
    stall_s: float  # runtime idle although this batch was decoded (exposed transfer)
    convert_s: float
    infer_s: float  # inside the runtime call only
    run_start: float
    run_end: float
    decoded_on: str = ""  # the Ray node whose preprocessor made the batch

    @property
    def n(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------- actors


class Preprocessor:
    """Decodes the images of the calls it is given: one or more per node, holding no part of
    the data set, so that any preprocessor of a node serves any call routed to that node and
    Ray can restart one anywhere."""

    def __init__(self, recipe: str):
        self.recipe = get_recipe(recipe)
        self.node = ray.get_runtime_context().get_node_id()
        self.writers: dict[str, CacheWriter] = {}  # one per cache being built, this process

    def ready(self) -> str:
        return self.node

    def load(self, batches: list[list[tuple[int, Location]]],
             cache: CropCache | None = None) -> tuple[Payload, int]:
        """Each list of (image index, location: a file or a tar member) is one batch ->
        (payload, images).

        Called with ``num_returns=2``: the payload goes to a device actor; the tiny count
        lets the driver tell a failed preprocessing from a failed device.
        """
        arrays, parts = [], []
        for items in batches:
            t0 = time.perf_counter()
            pixels, part = self._decode(items, cache)
            arrays.append(pixels)
            parts.append(Part(part.indices, part.errors, time.perf_counter() - t0))
        pixels = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        return Payload(pixels, parts, time.time(), node=self.node), sum(map(len, batches))

    def _decode(self, items: list[tuple[int, Location]],
                cache: CropCache | None) -> tuple[np.ndarray, Part]:
        if cache is not None and cache.complete:
            pixels, idx, errors = cache.batch([i for i, _ in items])
            return pixels, Part(idx, errors)
        writer = None
        if cache is not None:
            writer = self.writers.get(cache.key) or self.writers.setdefault(cache.key,
                                                                            cache.writer())
        crops, indices, errors = [], [], []
        for (index, _), data in zip(items, read_images([loc for _, loc in items]), strict=True):
            try:
                if isinstance(data, ImageError):
                    raise data
                crop = decode_crop(data, self.recipe)
            except ImageError as exc:
                errors.append((index, str(exc)))
                if writer:
                    writer.put_error(index, str(exc))
                continue
            crops.append(crop)
            indices.append(index)
            if writer:
                writer.put(index, crop)
        shape = (0, self.recipe.crop, self.recipe.crop, 3)
        pixels = np.stack(crops) if crops else np.zeros(shape, self.recipe.wire_dtype)
        return pixels, Part(np.asarray(indices, dtype=np.int64), errors)


def start_preprocessors(nodes: list[NodeInfo], counts: list[int], recipe: str) -> dict[str, list]:
    """``counts[i]`` preprocessing actors on ``nodes[i]``, created, not yet waited for."""
    return {
        node.name: [
            ray.remote(Preprocessor).options(
                # A preprocessor that dies (the OOM killer, a decoder crash, its node lost)
                # is restarted by Ray, on its node or, once that node is gone, on another
                # (soft affinity); the calls it was running are made again there.  Placed by
                # affinity, not by CPU accounting: a whole CPU each would leave no room for
                # a restarted one on the surviving nodes, and none at all would make Ray
                # ignore the soft affinity (Ray 2.60 placed a zero-resource actor on another
                # node of a 2-node cluster).
                num_cpus=PREP_CPUS,
                max_restarts=-1,
                max_task_retries=PREP_TASK_RETRIES,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=True),
                # Where remote data lives and who asks for it (endpoint, credentials): from
                # the driver's environment to every node's preprocessors.
                runtime_env={"env_vars": env} if (env := forwarded_env()) else None,
            ).remote(recipe)
            for _ in range(count)
        ]
        for node, count in zip(nodes, counts, strict=True)
    }


def wait_for_preprocessors(preps: dict[str, list]) -> None:
    """Block until every preprocessing actor is up; a one-line ConfigError if one is not."""
    every = [p for group in preps.values() for p in group]
    try:
        ray.get([p.ready.remote() for p in every], timeout=START_TIMEOUT_S)
    except (GetTimeoutError, RayError) as exc:
        raise ConfigError(f"preprocessing actors did not start: {one_line(exc)}") from None


class DeviceWorker:
    """The only owner of a runtime: one per device.

    Every runtime call (open, warm-up, batches, close) runs on one thread of the actor's
    own, fed through a queue: a runtime may bind per-thread state (an ACL context) when it
    opens, and batches queued by two concurrent device calls run back to back, without a
    lock to hand over between calls.  The calls' own threads convert pixels and build
    replies while the runtime computes.
    """

    def __init__(
        self, *, backend: str, model: Any, device: str, device_id: int,
        options: BackendOptions, recipe: str, visible_env: str | None = None,
        bind_chip: bool = False,
    ):
        # Named: the node's device_id-th chip; --devices all: the chip Ray reserved. The runtime
        # sees only that chip (runner/binding.py).
        binding = bind_device(device_id, visible_env, named=bind_chip)
        device_id, assigned = binding.device_id, binding.ray_assigned
        self.device = device
        self.recipe = get_recipe(recipe)
        self.runtime = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime")
        self.last_run_end = 0.0  # when the runtime last went idle (set on its thread)
        self.backend = self.runtime.submit(open_backend, backend, model, device_id,
                                           options).result()
        self.info = {
            "device": device,
            "device_id": device_id,
            "ray_assigned": assigned,
            "chip": binding.chip, "node_index": binding.index,
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "backend": self.backend.name,
            "provider": self.backend.provider,
            "precision": self.backend.precision,
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

    def warm_up(self, batch_size: int, runs: int = 2) -> float:
        """Untimed batches of random data; returns the fastest one's seconds in the runtime.

        Lazy runtime start-up (kernel selection, first executes) must not count as compute
        time.  Measured here: ONNX Runtime's first batch after a single all-zeros warm-up
        still took 2.5x a steady one on 2 cores.  The returned time sizes device calls.
        """
        spec = self.backend.input
        shape = (batch_size, *(d if d > 0 else 1 for d in spec.shape[1:]))
        rng = np.random.default_rng(0)
        if spec.dtype == "uint8":
            x = rng.integers(0, 256, size=shape, dtype=np.uint8)
        else:
            x = rng.standard_normal(shape).astype(spec.dtype)
        return min(self.runtime.submit(self.backend.run, x).result()[1] for _ in range(runs))

    def _run_after(self, tensors: list[np.ndarray]) -> tuple[float, list]:
        """On the runtime thread: when it went idle before these batches, and their runs."""
        previous = self.last_run_end
        runs = self._run(tensors)
        if runs:
            self.last_run_end = runs[-1][3]
        return previous, runs

    def _run(self, tensors: list[np.ndarray]) -> list[tuple[np.ndarray, float, float, float]]:
        """Back to back: (logits, seconds in the runtime, start, end) of each batch."""
        runs = []
        for x in tensors:
            start = time.time()
            if len(x):
                logits, infer_s = self.backend.run(x)
            else:  # every image of the batch failed to decode
                logits, infer_s = np.zeros((0, self.backend.num_classes), np.float32), 0.0
            runs.append((logits, infer_s, start, time.time()))
        return runs

    def infer(self, payload: Payload, picks: list[tuple[int, int]],
              keep_logits: bool) -> list[BatchReply]:
        """Run the payload's parts named by ``picks`` ((batch id, part index)) back to back.

        The batches are converted on the call's thread, then queued for the runtime as one
        job.  A batch's stall is the time the runtime sat idle although the batch could have
        been running: past the previous batch's end, and past the payload being made plus
        the conversions up to it.
        """
        start = time.time()
        ready = start if payload.ready_at is None else payload.ready_at
        tensors, convert_s = [], []
        for _, part in picks:
            t0 = time.perf_counter()
            pixels = payload.part_pixels(part)
            native = payload.tensor or str(pixels.dtype) == self.backend.input.dtype == "uint8"
            tensors.append(pixels if native or not len(pixels) else to_tensor(pixels, self.recipe))
            convert_s.append(time.perf_counter() - t0)
        previous, runs = self.runtime.submit(self._run_after, tensors).result()
        replies = []
        for (batch, part), conv, (logits, infer_s, run_start, run_end) in zip(
                picks, convert_s, runs, strict=True):
            ready += conv
            meta = payload.parts[part]
            replies.append(BatchReply(
                batch, self.device, meta.indices, topk_indices(logits, TOPK),
                logits if keep_logits else None, meta.errors, meta.decode_s,
                max(0.0, start - ready), max(0.0, run_start - max(ready, previous)), conv,
                infer_s, run_start, run_end, payload.node))
            previous = run_end
        return replies

    def close(self) -> None:
        """Tear the runtime down after any batch already queued."""
        self.runtime.submit(self.backend.close).result()
        self.runtime.shutdown()


# --------------------------------------------------------------------------- life cycle


@dataclass
class Device:
    """A started device actor and where it runs."""

    ref: DeviceRef
    actor: Any
    node: NodeInfo
    info: dict[str, Any] = field(default_factory=dict)  # DeviceWorker.describe()


def start_devices(
    cfg: RunConfig, backend: str, kind: DeviceKind, recipe: str,
    placed: list[tuple[DeviceRef, NodeInfo]], bind_chips: bool,
) -> list[Device]:
    """One actor per device, pinned to its node; a device that cannot open is a
    ConfigError (and the actors already made are closed)."""
    run_id = uuid.uuid4().hex[:8]
    per_node = Counter(node.node_id for _, node in placed)
    rank: Counter[str] = Counter()
    devices: list[Device] = []
    try:
        for ref, node in placed:
            threads = cfg.threads or max(1, node.cpus // per_node[node.node_id])
            first = rank[node.node_id] * threads
            rank[node.node_id] += 1
            cores = tuple((first + j) % max(1, node.cpus) for j in range(threads))
            options = BackendOptions(
                threads=threads,
                cores=cores if cfg.pin_cores else (),
                provider=cfg.provider,
                precision=cfg.precision,
                emulated_latency_ms=cfg.emulated_latency_ms,
                extra={"image_size": get_recipe(recipe).crop,
                       **cfg.backend_extra.get(str(ref), {})},
            )
            actor = ray.remote(DeviceWorker).options(
                name=f"cardrunner-{run_id}-device-{ref}",
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
                **device_actor_options(kind),
            ).remote(backend=backend, model=cfg.model, device=str(ref), device_id=ref.index,
                     options=options, recipe=recipe, visible_env=kind.visible_env,
                     bind_chip=bind_chips)
            devices.append(Device(ref, actor, node))
        for device in devices:
            device.info = wait_for(device, device.actor.describe.remote(), "did not start")
    except BaseException:
        for line in close_devices(devices):
            log.warning("%s", line)
        raise
    return devices


def warm_up(devices: list[Device], batch_size: int) -> float:
    """Warm every device up at ``batch_size``; the median device's seconds per batch."""
    calls = [(d, d.actor.warm_up.remote(batch_size)) for d in devices]
    seconds = [wait_for(d, ref, "failed to warm up") for d, ref in calls]
    return float(np.median(seconds))


def wait_for(device: Device, ref: Any, what: str) -> Any:
    """``ray.get`` of a start-up call, as a one-line ConfigError when it fails or stalls."""
    try:
        return ray.get(ref, timeout=START_TIMEOUT_S)
    except GetTimeoutError:
        raise ConfigError(
            f"device {device.ref}: {what} within {START_TIMEOUT_S} s (Ray has "
            f"{ray.available_resources()})"
        ) from None
    except RayError as exc:
        raise ConfigError(f"device {device.ref}: {one_line(exc)}") from None


def close_devices(devices: list[Device]) -> list[str]:
    """Let each runtime tear down (ACL frees device memory, resets the chip), then kill.

    Returns one line per device whose teardown failed or did not finish in 30 s."""
    closing = {d.actor.close.remote(): d for d in devices}
    problems = []
    try:
        done, late = ray.wait(list(closing), num_returns=len(closing), timeout=30)
        problems += [f"device {closing[ref].ref}: teardown did not finish in 30 s" for ref in late]
        for ref in done:
            try:
                ray.get(ref)
            except RayActorError:
                pass  # the actor never started or already died: no runtime to tear down
            except RayError as exc:
                problems.append(f"device {closing[ref].ref}: teardown failed: {one_line(exc)}")
    finally:
        for d in devices:
            ray.kill(d.actor)
    return problems
