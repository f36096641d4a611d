"""One evaluation run: config in, scored and timed results out (no printing, no CLI)."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from .backends import BACKENDS, BackendOptions
from .cache import CacheBusyError, CacheError, CropCache
from .classes import check_synsets
from .config import ConfigError, RunConfig
from .dataset import Dataset, ImageIssue, load_dataset
from .devices import DeviceRef, NodeInfo, cluster_nodes, parse_devices, place_devices
from .errors import one_line
from .journal import Journal, JournalError, LogitsFile
from .metrics import TOPK, Accuracy, hit_ranks
from .modelfile import describe_model
from .pipeline import (
    EMULATED_RESOURCE,
    Batch,
    DeviceKind,
    DeviceState,
    DeviceWorker,
    DriveOutcome,
    Preprocessor,
    device_actor_options,
    device_kind,
    drive,
    plan_batches,
    plan_shards,
    start_ray,
)
from .preprocess import get_recipe

RUN_FILES = ("journal.jsonl", "result.json", "perf.json", "logits.npy", "errors.csv",
             "predictions.csv", "per_class.csv", "timeline.png")
#: Seconds to wait for an actor to start (a model load) or to warm up (a first batch).
START_TIMEOUT_S = 300

log = logging.getLogger("cardrunner")


@dataclass
class BatchStat:
    device: str
    n: int
    run_start: float
    run_end: float
    infer_s: float
    convert_s: float
    decode_s: float
    handoff_s: float  # payload ready in the preprocessor -> device method starts (transfer+queue)
    stall_s: float  # runtime idle although the batch was decoded (exposed transfer)
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
    resumed_images: int = 0  # finished in an earlier session of this run (--resume)
    cache: str = "off"  # off | hit | built | partial
    workers: int = 0  # preprocessing actors
    teardown: list[str] = field(default_factory=list)  # devices whose runtime closed badly

    @property
    def scored(self) -> np.ndarray:
        return np.flatnonzero(self.top[:, 0] >= 0)

    def accuracy(self) -> Accuracy | None:
        if self.labels is None:
            return None
        idx = self.scored
        ranks = hit_ranks(self.top[idx], self.labels[idx], self.num_classes)
        return Accuracy.from_ranks(ranks, self.num_classes)


@dataclass
class Session:
    """What both run modes need once the devices are up."""

    cfg: RunConfig
    recipe: str
    meta: dict[str, str]
    model_sha: str | None
    devices: list[DeviceState]
    nodes: list[NodeInfo]  # the node of each device, in the same order
    num_classes: int

    def result(self, outcome: DriveOutcome, stats: list[BatchStat], **kw: Any) -> RunResult:
        infos = [dict(d.info, node=d.node, failed_at_s=d.failed_at, failure=d.failure,
                      moved_batches=d.moved_batches) for d in self.devices]
        return RunResult(self.cfg, self.recipe, self.meta, self.model_sha, infos, outcome,
                         stats, num_classes=self.num_classes, **kw)


# --------------------------------------------------------------------------- checks


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless told to resume or overwrite."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    existing = [n for n in RUN_FILES if (out / n).exists()]
    if existing and not (resume or overwrite):
        raise ConfigError(
            f"--out: {out} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it or --overwrite to replace it"
        )


def clear_out_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; with ``overwrite``, remove the previous run's files (only once the new
    run has started its devices, so a bad flag never destroys results)."""
    if overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for p in out.glob("perf_vision_batchsize_*_device_*.txt"):
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def check_input(info: dict[str, Any], recipe: str, model: str | None) -> None:
    """The model must take what the recipe produces (size) in a form we can feed it."""
    r = get_recipe(recipe)
    dtype, shape = info["input"]["dtype"], info["input"]["shape"]
    if dtype not in ("float32", "uint8"):
        raise ConfigError(f"--model: {model} takes {dtype}; cardrunner feeds float32 or uint8")
    hw = shape[1:3] if dtype == "uint8" else shape[2:4]
    if list(hw) != [r.crop, r.crop]:
        raise ConfigError(
            f"--model: {model} takes {dtype} {shape} but recipe {recipe} makes "
            f"{r.crop}x{r.crop} crops"
        )
    if dtype == "uint8" and r.wire_dtype != "uint8":
        raise ConfigError(f"--model: {model} takes uint8 but recipe {recipe} makes float crops")


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


# --------------------------------------------------------------------------- devices


def start_devices(
    cfg: RunConfig, backend: str, kind: DeviceKind, recipe: str,
    placed: list[tuple[DeviceRef, NodeInfo]], bind_chips: bool,
) -> list[DeviceState]:
    """One actor per device, pinned to its node and warmed up; a device that cannot open is a
    ConfigError (and the actors already made are closed)."""
    run_id = uuid.uuid4().hex[:8]
    per_node = Counter(node.node_id for _, node in placed)
    rank: Counter[str] = Counter()
    states: list[DeviceState] = []
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
            ).remote(backend, cfg.model, str(ref), ref.index, options, recipe, cfg.keep_logits,
                     kind.visible_env, bind_chips)
            states.append(DeviceState(ref, actor, {}, node.name))
        for state in states:
            state.info = _await(state, state.actor.describe.remote(), "did not start")
            check_input(state.info, recipe, cfg.model)
        for state in states:
            _await(state, state.actor.warm_up.remote(cfg.batch_size), "failed to warm up")
    except BaseException:
        for line in close_devices(states):
            log.warning("%s", line)
        raise
    return states


def _await(state: DeviceState, ref: Any, what: str) -> Any:
    try:
        return ray.get(ref, timeout=START_TIMEOUT_S)
    except GetTimeoutError:
        raise ConfigError(
            f"device {state.ref}: {what} within {START_TIMEOUT_S} s (Ray has "
            f"{ray.available_resources()})"
        ) from None
    except RayError as exc:
        raise ConfigError(f"device {state.ref}: {one_line(exc)}") from None


def close_devices(states: list[DeviceState]) -> list[str]:
    """Let each runtime tear down (ACL frees device memory, resets the chip), then kill.

    Returns one line per device whose teardown failed or did not finish in 30 s."""
    closing = {s.actor.close.remote(): s for s in states if s.alive}
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
        for s in states:
            ray.kill(s.actor)
    return problems


# --------------------------------------------------------------------------- the run


def run_evaluation(cfg: RunConfig) -> RunResult:
    """Check everything that can be checked, start the devices, run, return the result."""
    cfg.validate()
    selection = parse_devices(cfg.devices)
    meta: dict[str, str] = {}
    model_sha = None
    if cfg.model:
        meta, model_sha = describe_model(cfg.model)
    elif cfg.backend != "emulated":
        raise ConfigError("--model is required (only --backend emulated runs without one)")
    if cfg.model and cfg.backend == "onnxruntime" and not str(cfg.model).endswith(".onnx"):
        raise ConfigError(f"--model: {cfg.model} is not .onnx; .om models need --backend acl")
    recipe = cfg.recipe or meta.get("cardrunner.recipe") or "huawei"
    try:
        get_recipe(recipe)
    except ValueError as exc:
        raise ConfigError(f"--preprocess: {exc}") from None
    if cfg.synsets:
        check_synsets(cfg.synsets)
    dataset: Dataset | None = None
    if not cfg.pure_infer:
        if not cfg.images:
            raise ConfigError("--images is required (or --pure-infer)")
        dataset = load_dataset(cfg.images, cfg.labels, cfg.limit)
    out = Path(cfg.out)
    check_out_dir(out, cfg.resume, cfg.overwrite)

    try:
        start_ray(cfg.address, {EMULATED_RESOURCE: cfg.emulated_chips}, cfg.dashboard)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--address {cfg.address}: {one_line(exc)}") from None
    backend, provider = _resolve_backend(cfg)
    cfg.provider = provider
    kind = device_kind(backend, provider)
    nodes = cluster_nodes(kind.resource, every_core_once=selection.all)
    placed = place_devices(selection, nodes, kind.label,
                           ray.get_runtime_context().get_node_id())
    devices = start_devices(cfg, backend, kind, recipe, placed, bind_chips=not selection.all)
    try:
        clear_out_dir(out, cfg.overwrite)
        session = Session(cfg, recipe, meta, model_sha, devices, [n for _, n in placed],
                          devices[0].info["num_classes"])
        if cfg.pure_infer:
            result = _run_pure_infer(session)
        else:
            assert dataset is not None
            result = _run_dataset(session, dataset, out)
    except BaseException:
        for line in close_devices(devices):
            log.warning("%s", line)
        raise
    result.teardown = close_devices(devices)
    return result


def _stat(r: dict[str, Any]) -> BatchStat:
    return BatchStat(r["device"], r["n"], r["run_start"], r["run_end"], r["infer_s"],
                     r["convert_s"], r["decode_s"], r["handoff_s"], r["stall_s"])


def _run_pure_infer(s: Session) -> RunResult:
    cfg = s.cfg
    spec = s.devices[0].info["input"]
    shape = [cfg.batch_size, *spec["shape"][1:]]
    rng = np.random.default_rng(0)
    if spec["dtype"] == "uint8":
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        pixels = rng.standard_normal(shape, dtype=np.float32)
    payload = ray.put({"pixels": pixels, "tensor": True, "indices": np.arange(cfg.batch_size)})
    batches = plan_batches([cfg.batch_size * cfg.rounds * len(s.devices)], cfg.batch_size)
    stats: list[BatchStat] = []
    bar = tqdm(total=len(batches) * cfg.batch_size, unit="img", disable=not cfg.progress,
               desc="pure-infer")

    def on_result(r: dict[str, Any]) -> None:
        stats.append(_stat(r))
        bar.update(r["n"])

    outcome = drive(s.devices, batches, lambda b: (payload, None), on_result, cfg.in_flight,
                    batch_timeout_s=cfg.batch_timeout_s)
    bar.close()
    return s.result(outcome, stats, num_images=sum(st.n for st in stats), names=[],
                    labels=None, top=np.zeros((0, TOPK), np.int32))


def _run_dataset(s: Session, dataset: Dataset, out: Path) -> RunResult:
    cfg, n = s.cfg, len(dataset)
    top = np.full((n, TOPK), -1, dtype=np.int32)
    issues = list(dataset.issues)
    header = {
        "model_sha256": s.model_sha,
        "recipe": s.recipe,
        "images": dataset.fingerprint(),
        "count": n,
        "backend": "emulated" if cfg.backend == "emulated" else "real",
        "save_logits": cfg.keep_logits,  # a resume cannot fill in logits it never kept
    }
    done = np.zeros(n, dtype=bool)
    journal = Journal(out / "journal.jsonl", header, cfg.resume)
    started = False
    logits_file = None
    try:
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
        if cfg.keep_logits:
            path = out / "logits.npy"
            if resumed and not path.exists():
                raise JournalError(f"--resume: {path} is missing; the finished images' logits "
                                   "are lost (rerun with --overwrite)")
            logits_file = LogitsFile(path, n, s.num_classes, cfg.resume)
        cache = open_cache(cfg.cache, s.recipe, n, header["images"], resumed) if (
            cfg.cache and todo) else None
        stats: list[BatchStat] = []
        labels = None if dataset.labels is None else np.asarray(dataset.labels, np.int64)
        if not todo:  # --resume of a finished run: nothing to time
            return s.result(DriveOutcome(0.0, time.time()), stats, num_images=n,
                            names=dataset.names, labels=labels, top=top, issues=issues,
                            resumed_images=resumed)

        planned = plan_shards(todo, s.nodes, cfg.batch_size, cfg.workers,
                              cpu_inference=s.devices[0].info["provider"] == "CPUExecutionProvider")
        shards = [shard for _, shard, _ in planned]
        preps = [
            ray.remote(Preprocessor).options(
                num_cpus=cpus,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
            ).remote(shard, s.recipe, cache)
            for node, shard, cpus in planned
        ]
        bar = tqdm(total=n, initial=resumed, unit="img", disable=not cfg.progress,
                   desc="evaluate")

        def on_result(r: dict[str, Any]) -> None:
            t0 = time.perf_counter()
            idx = r["indices"]
            if len(idx):
                top[idx] = r["top"]
                if logits_file is not None:
                    logits_file.write(idx, r["logits"])
            for i, reason in r["errors"]:
                issues.append(ImageIssue(dataset.names[i], reason, int(i)))
            journal.append({"batch": r["batch"], "device": r["device"],
                            "indices": idx.tolist(), "top": r["top"].tolist(),
                            "errors": r["errors"]})
            bar.update(len(idx) + len(r["errors"]))
            stats.append(_stat(r))
            stats[-1].post_s = time.perf_counter() - t0

        def on_give_up(batch: Batch, reason: str) -> None:
            for i, _ in shards[batch.shard][batch.start : batch.stop]:
                issues.append(ImageIssue(dataset.names[i], f"batch failed: {reason}", i))
                bar.update(1)

        cache_state = "off"
        try:
            try:  # actor start-up is not part of the timed run
                ray.get([p.ready.remote() for p in preps], timeout=START_TIMEOUT_S)
            except (GetTimeoutError, RayError) as exc:
                raise ConfigError(f"preprocessing actors did not start: {one_line(exc)}") from None
            started = True
            outcome = drive(
                s.devices, batches=plan_batches([len(sh) for sh in shards], cfg.batch_size,
                                                [node.name for node, _, _ in planned]),
                submit_prep=lambda b: tuple(
                    preps[b.shard].load.options(num_returns=2).remote(b.start, b.stop)),
                on_result=on_result, in_flight=cfg.in_flight, on_give_up=on_give_up,
                batch_timeout_s=cfg.batch_timeout_s,
            )
        finally:
            bar.close()
            for p in preps:
                ray.kill(p)
            if cache is not None:
                cache_state = "hit" if cache.complete else (
                    "built" if cache.finalize() else "partial")
                cache.close()
    except BaseException:
        if not started:
            journal.discard_if_unused()
        raise
    finally:
        journal.close()
        if logits_file is not None:
            logits_file.close()
    return s.result(outcome, stats, num_images=n, names=dataset.names, labels=labels, top=top,
                    issues=issues, resumed_images=resumed, cache=cache_state,
                    workers=len(preps))


def open_cache(root: str, recipe: str, n: int, fingerprint: str, resumed: int) -> CropCache | None:
    """The decoded-crop cache for this image list, or None when it cannot be used now."""
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
