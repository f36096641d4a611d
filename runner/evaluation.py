"""One evaluation run: config in, scored and timed results out (no printing, no CLI)."""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from .backends import BACKENDS, BackendOptions
from .cache import CacheBusyError, CacheError, CropCache
from .dataset import Dataset, ImageIssue, load_dataset
from .devices import DeviceRef, NodeInfo, cluster_nodes, parse_devices, place_devices
from .journal import Journal
from .metrics import TOPK, Accuracy, hit_ranks
from .pipeline import (
    EMULATED_RESOURCE,
    DeviceState,
    DeviceWorker,
    DriveOutcome,
    Preprocessor,
    device_actor_options,
    drive,
    plan_batches,
    start_ray,
    visible_devices_env,
)
from .preprocess import get_recipe

RUN_FILES = ("journal.jsonl", "result.json", "perf.json", "logits.npy", "errors.csv",
             "predictions.csv", "per_class.csv", "timeline.png")


class ConfigError(ValueError):
    """Bad configuration: the CLI prints it on one line and exits 2."""


@dataclass
class RunConfig:
    model: str | None = None
    images: str | None = None
    labels: str | None = None
    devices: str = "0"
    backend: str = "onnxruntime"
    provider: str = "cpu"
    precision: str = ""  # CANN execution provider precision_mode (e.g. force_fp16)
    pin_cores: bool = False  # onnxruntime CPU: pin each device's threads to its own cores
    batch_size: int = 16
    out: str = "runs/latest"
    recipe: str | None = None  # default: the model's metadata, else "huawei"
    workers: int | None = None  # preprocessing actors; default: one per host core
    in_flight: int = 2
    threads: int | None = None  # onnxruntime CPU threads per device; default cores / devices
    limit: int | None = None
    pure_infer: bool = False
    rounds: int = 50
    keep_logits: bool = False
    cache: str | None = None  # folder of decoded-crop caches
    address: str | None = None
    dashboard: bool = False  # the embedded Ray's dashboard (on 127.0.0.1)
    emulated_chips: int = 4
    emulated_latency_ms: float | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    # Extra backend options per device id (str), e.g. the emulated fault hook; tests only.
    backend_extra: dict[str, dict] = field(default_factory=dict)


@dataclass
class BatchStat:
    device: str
    n: int
    start: float
    run_start: float
    run_end: float
    infer_s: float
    convert_s: float
    decode_s: float
    handoff_s: float  # payload ready in the preprocessor -> device method starts (transfer+queue)
    post_s: float = 0.0  # driver: scoring bookkeeping, journal, logits for this batch


@dataclass
class RunResult:
    config: RunConfig
    recipe: str
    model_meta: dict[str, str]
    model_sha256: str | None
    devices: list[dict[str, Any]]  # describe() of each device actor, plus failure info
    outcome: DriveOutcome
    stats: list[BatchStat]
    num_images: int  # images planned (scored + not scored)
    names: list[str]
    labels: np.ndarray | None
    top: np.ndarray  # [N, TOPK], -1 where not scored
    num_classes: int
    issues: list[ImageIssue] = field(default_factory=list)
    resumed_images: int = 0
    cache: str = "off"  # off | hit | built | partial
    workers: int = 0  # preprocessing actors

    @property
    def scored(self) -> np.ndarray:
        return np.flatnonzero(self.top[:, 0] >= 0)

    def accuracy(self) -> Accuracy | None:
        if self.labels is None:
            return None
        idx = self.scored
        ranks = hit_ranks(self.top[idx], self.labels[idx], self.num_classes)
        return Accuracy.from_ranks(ranks, self.num_classes)


def model_metadata(path: str | Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX model ({} for other files)."""
    if not str(path).endswith(".onnx"):
        return {}
    try:
        m = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ConfigError(f"--model: {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors have many types
        raise ConfigError(f"--model: {path} is not a readable ONNX model ({exc})") from None
    return {p.key: p.value for p in m.metadata_props}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless told to resume or overwrite."""
    existing = [n for n in RUN_FILES if (out / n).exists()]
    if existing and not (resume or overwrite):
        raise ConfigError(
            f"--out: {out} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it or --overwrite to replace it"
        )
    if overwrite:
        for n in existing:
            (out / n).unlink()
        for p in out.glob("perf_vision_batchsize_*_device_*.txt"):
            p.unlink()
        shutil.rmtree(out / "tmp", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def device_resource(backend: str, provider: str) -> tuple[str | None, str]:
    """The Ray resource that counts this kind of device (None: CPU slices), and its name."""
    if backend == "acl" or (backend == "onnxruntime" and provider == "cann"):
        return "NPU", "Ascend NPUs"
    if backend == "onnxruntime" and provider == "cuda":
        return "GPU", "GPUs"
    if backend == "emulated":
        return EMULATED_RESOURCE, "emulated chips (--emulated-chips)"
    return None, "CPU slices"


def _resolve_backend(cfg: RunConfig) -> tuple[str, str]:
    if cfg.backend != "auto":
        if cfg.backend not in BACKENDS:
            choices = ", ".join(BACKENDS)
            raise ConfigError(f"--backend: unknown {cfg.backend!r}; choose auto, {choices}")
        return cfg.backend, cfg.provider
    res = ray.cluster_resources()
    if res.get("NPU", 0) >= 1:
        return "acl", cfg.provider
    if res.get("GPU", 0) >= 1:
        return "onnxruntime", "cuda"
    return "onnxruntime", "cpu"


def start_devices(
    cfg: RunConfig, backend: str, provider: str, recipe: str,
    placed: list[tuple[DeviceRef, NodeInfo]],
) -> list[DeviceState]:
    """One actor per device, pinned to its node; a device that cannot open is a ConfigError."""
    run_id = uuid.uuid4().hex[:8]
    opts = device_actor_options(backend, provider)
    env = visible_devices_env(backend, provider) if not parse_devices(cfg.devices).all else None
    per_node = Counter(node.node_id for _, node in placed)
    rank: Counter[str] = Counter()
    actors = []
    for ref, node in placed:
        threads = cfg.threads or max(1, node.cpus // per_node[node.node_id])
        first = rank[node.node_id] * threads
        rank[node.node_id] += 1
        cores = tuple((first + j) % max(1, node.cpus) for j in range(threads))
        options = BackendOptions(
            threads=threads,
            cores=cores if cfg.pin_cores else (),
            provider=provider,
            precision=cfg.precision,
            emulated_latency_ms=cfg.emulated_latency_ms,
            extra={"image_size": get_recipe(recipe).crop, **cfg.backend_extra.get(str(ref), {})},
        )
        actor = ray.remote(DeviceWorker).options(
            name=f"cardrunner-{run_id}-device-{ref}",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
            **opts,
        ).remote(backend, cfg.model, str(ref), ref.index, options, recipe, cfg.keep_logits, env)
        actors.append((ref, node, actor))
    states = []
    for ref, node, actor in actors:
        try:
            info = ray.get(actor.describe.remote(), timeout=300)
        except RayActorError as exc:
            raise ConfigError(f"device {ref}: {_init_error(exc)}") from None
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(
                f"device {ref}: its actor did not start within 300 s (Ray resources: "
                f"{ray.available_resources()})"
            ) from None
        states.append(DeviceState(ref, actor, dict(info, node=node.name), node.name))
    return states


def _init_error(exc: BaseException) -> str:
    text = str(exc)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if "Error:" in line or "Error " in line:
            return line[:300]
    return text.strip().splitlines()[-1][:300] if text.strip() else type(exc).__name__


def check_input(info: dict[str, Any], recipe: str, model: str | None) -> None:
    """The model must take what the recipe produces (size) in a form we can feed it."""
    r = get_recipe(recipe)
    shape = info["input"]["shape"]
    hw = shape[1:3] if info["input"]["dtype"] == "uint8" else shape[2:4]
    if list(hw) != [r.crop, r.crop]:
        raise ConfigError(
            f"--model: {model} takes {info['input']['dtype']} {shape} but recipe {recipe} makes "
            f"{r.crop}x{r.crop} crops"
        )
    if info["input"]["dtype"] == "uint8" and r.wire_dtype != "uint8":
        raise ConfigError(f"--model: {model} takes uint8 but recipe {recipe} makes float crops")


def run_evaluation(cfg: RunConfig) -> RunResult:
    if cfg.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    selection = parse_devices(cfg.devices)
    out = Path(cfg.out)
    meta: dict[str, str] = {}
    model_sha = None
    if cfg.model:
        if not Path(cfg.model).exists():
            raise ConfigError(f"--model: {cfg.model} does not exist")
        meta = model_metadata(cfg.model)
        model_sha = file_sha256(cfg.model)
    elif cfg.backend != "emulated":
        raise ConfigError("--model is required (only --backend emulated runs without one)")
    if cfg.model and cfg.backend == "onnxruntime" and not str(cfg.model).endswith(".onnx"):
        raise ConfigError(f"--model: {cfg.model} is not .onnx; .om models need --backend acl")
    recipe = cfg.recipe or meta.get("cardrunner.recipe") or "huawei"
    try:
        get_recipe(recipe)
    except ValueError as exc:
        raise ConfigError(f"--preprocess: {exc}") from None

    dataset: Dataset | None = None
    if not cfg.pure_infer:
        if not cfg.images:
            raise ConfigError("--images is required (or --pure-infer)")
        dataset = load_dataset(cfg.images, cfg.labels, cfg.limit)
    prepare_out_dir(out, cfg.resume, cfg.overwrite)

    start_ray(cfg.address, {EMULATED_RESOURCE: cfg.emulated_chips}, cfg.dashboard)
    backend, provider = _resolve_backend(cfg)
    resource, what = device_resource(backend, provider)
    nodes = cluster_nodes(resource)
    placed = place_devices(selection, nodes, what, ray.get_runtime_context().get_node_id())
    devices = start_devices(cfg, backend, provider, recipe, placed)
    for d in devices:
        check_input(d.info, recipe, cfg.model)
    num_classes = devices[0].info["num_classes"]
    try:
        if cfg.pure_infer:
            return _run_pure_infer(cfg, recipe, meta, model_sha, devices, num_classes)
        assert dataset is not None
        return _run_dataset(cfg, recipe, meta, model_sha, devices, num_classes, dataset, out,
                            [node for _, node in placed])
    finally:
        for d in devices:
            ray.kill(d.actor)


def _stat(r: dict[str, Any]) -> BatchStat:
    return BatchStat(r["device"], r["n"], r["start"], r["run_start"], r["run_end"],
                     r["infer_s"], r["convert_s"], r["decode_s"], r["handoff_s"])


def _run_pure_infer(cfg, recipe, meta, model_sha, devices, num_classes) -> RunResult:
    spec = devices[0].info["input"]
    shape = [cfg.batch_size] + [d for d in spec["shape"][1:]]
    rng = np.random.default_rng(0)
    if spec["dtype"] == "uint8":
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        pixels = rng.standard_normal(shape, dtype=np.float32)
    payload = ray.put({"pixels": pixels, "tensor": True, "indices": np.arange(cfg.batch_size)})
    batches = plan_batches([cfg.batch_size * cfg.rounds * len(devices)], cfg.batch_size)
    stats: list[BatchStat] = []
    bar = tqdm(total=len(batches) * cfg.batch_size, unit="img", disable=not cfg.progress,
               desc="pure-infer")

    def on_result(r: dict[str, Any]) -> None:
        stats.append(_stat(r))
        bar.update(r["n"])

    outcome = drive(devices, batches, lambda b: payload, on_result, cfg.in_flight)
    bar.close()
    n = sum(s.n for s in stats)
    return RunResult(cfg, recipe, meta, model_sha, _device_infos(devices), outcome, stats, n,
                     [], None, np.zeros((0, TOPK), np.int32), num_classes)


def _device_infos(devices: list[DeviceState]) -> list[dict[str, Any]]:
    return [
        dict(d.info, failed_at_s=d.failed_at, failure=d.failure, moved_batches=d.moved_batches)
        for d in devices
    ]


def _run_dataset(cfg, recipe, meta, model_sha, devices, num_classes, dataset, out,
                 nodes: list[NodeInfo]) -> RunResult:
    n = len(dataset)
    top = np.full((n, TOPK), -1, dtype=np.int32)
    issues = list(dataset.issues)
    header = {
        "model_sha256": model_sha,
        "recipe": recipe,
        "images": dataset.fingerprint(),
        "count": n,
        "backend": "emulated" if cfg.backend == "emulated" else "real",
    }
    journal = Journal(out / "journal.jsonl", header, cfg.resume)
    logits_mm = None
    if cfg.keep_logits:
        path = out / "logits.npy"
        mode = "r+" if cfg.resume and path.exists() else "w+"
        logits_mm = np.lib.format.open_memmap(path, mode=mode, dtype=np.float32,
                                              shape=(n, num_classes))
    done = np.zeros(n, dtype=bool)
    for rec in journal.records:
        idx = np.asarray(rec["indices"], dtype=np.int64)
        if len(idx):
            top[idx] = rec["top"]
        done[idx] = True
        for i, reason in rec["errors"]:
            issues.append(ImageIssue(dataset.names[i], reason, i))
            done[i] = True
    resumed = int(done.sum())

    todo = [(int(i), dataset.path(int(i))) for i in np.flatnonzero(~done)]
    planned = plan_shards(todo, nodes, cfg.batch_size, cfg.workers)
    shards = [shard for _, shard, _ in planned]
    cache = open_cache(cfg.cache, recipe, n, header["images"], resumed) if cfg.cache else None
    preps = [
        ray.remote(Preprocessor).options(
            num_cpus=cpus,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        ).remote(shard, recipe, cache)
        for node, shard, cpus in planned
    ]
    ray.get([p.ready.remote() for p in preps])  # actor start-up is not part of the timed run
    batches = plan_batches([len(s) for s in shards], cfg.batch_size,
                           [node.name for node, _, _ in planned])
    stats: list[BatchStat] = []
    bar = tqdm(total=n, initial=resumed, unit="img", disable=not cfg.progress, desc="evaluate")

    def on_result(r: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        idx = r["indices"]
        if len(idx):
            top[idx] = r["top"]
            if logits_mm is not None:
                logits_mm[idx] = r["logits"]
        for i, reason in r["errors"]:
            issues.append(ImageIssue(dataset.names[i], reason, int(i)))
        journal.append({"batch": r["batch"], "device": r["device"], "indices": idx.tolist(),
                        "top": r["top"].tolist(), "errors": r["errors"]})
        bar.update(len(idx) + len(r["errors"]))
        stats.append(_stat(r))
        stats[-1].post_s = time.perf_counter() - t0

    def on_give_up(batch, reason: str) -> None:
        for i, _ in shards[batch.shard][batch.start : batch.stop]:
            issues.append(ImageIssue(dataset.names[i], f"batch failed: {reason}", i))
            bar.update(1)

    try:
        outcome = drive(
            devices,
            batches,
            lambda b: preps[b.shard].load.remote(b.start, b.stop),
            on_result,
            cfg.in_flight,
            on_give_up,
        )
    finally:
        bar.close()
        journal.close()
        if logits_mm is not None:
            logits_mm.flush()
        for p in preps:
            ray.kill(p)
        if cache is not None:
            cache_state = "hit" if cache.complete else ("built" if cache.finalize() else "partial")
            cache.close()
    labels = np.asarray(dataset.labels, dtype=np.int64) if dataset.labels is not None else None
    return RunResult(cfg, recipe, meta, model_sha, _device_infos(devices), outcome, stats, n,
                     dataset.names, labels, top, num_classes, issues, resumed,
                     cache_state if cache is not None else "off", len(preps))


def plan_shards(
    todo: list[tuple[int, str]], nodes: list[NodeInfo], batch_size: int, workers: int | None
) -> list[tuple[NodeInfo, list[tuple[int, str]], float]]:
    """(node, shard, CPUs per actor) for every preprocessing actor.

    The image list is split across the devices' nodes in proportion to their device counts,
    so each device's batches are decoded on its own host; each node's part is split across
    ``workers`` actors (default: one per core of that node).
    """
    devices_on = Counter(node.node_id for node in nodes)
    unique = list({node.node_id: node for node in nodes}.values())
    weights = np.cumsum([0] + [devices_on[node.node_id] for node in unique])
    cut = np.round(weights / weights[-1] * len(todo)).astype(int)
    planned = []
    for node, (a, b) in zip(unique, pairwise(cut), strict=True):
        part = todo[a:b]
        if not part:
            continue
        k = max(1, min(workers or node.cpus or 1, math.ceil(len(part) / batch_size)))
        bounds = np.linspace(0, len(part), k + 1).astype(int)
        cpus = min(1.0, (node.cpus or 1) / k)
        planned += [(node, part[x:y], cpus) for x, y in pairwise(bounds)]
    return planned


def open_cache(root: str, recipe: str, n: int, fingerprint: str, resumed: int) -> CropCache | None:
    """The decoded-crop cache for this image list, or None when it cannot be used now."""
    log = logging.getLogger("cardrunner")
    try:
        cache = CropCache.open(root, get_recipe(recipe), n, fingerprint)
    except CacheBusyError as exc:
        log.warning("%s; running without the cache", exc)
        return None
    except CacheError as exc:
        raise ConfigError(f"--cache: {exc}") from None
    if not cache.complete and resumed:
        log.warning("--cache: a resumed run cannot fill the whole cache; running without it")
        cache.close()
        return None
    return cache

