"""Evaluation runs: config in, scored and timed results out (no printing, no CLI).

An ``Evaluator`` runs one configuration after another in one Ray instance and keeps the
device actors between runs whose devices are set up alike (a batch-size sweep warms the
same actors up again at each size instead of reloading the model).
"""

from __future__ import annotations

import logging
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import ray

from . import actors, planning
from .backends import BACKENDS, BackendError, ort
from .classes import check_synsets
from .config import ConfigError, RunConfig
from .dataset import Dataset, load_dataset
from .devices import (
    EMULATED_RESOURCE,
    NodeInfo,
    cluster_nodes,
    device_kind,
    parse_devices,
    place_devices,
)
from .driver import DeviceState
from .errors import one_line
from .modelfile import describe_model
from .preprocess import get_recipe
from .ray_start import start_ray
from .run import Plan, RunResult, Started, StartupClock, process_start_time
from .runlock import RunFolders
from .runs import run_dataset, run_pure_infer

RUN_FILES = ("journal.jsonl", "result.json", "perf.json", "logits.npy", "errors.csv",
             "predictions.csv", "per_class.csv", "timeline.png")
#: RunConfig fields that do not change what the device actors are: runs that differ only in
#: these share actors.
RUN_ONLY_FIELDS = {"images", "labels", "batch_size", "out", "workers", "in_flight", "limit",
                   "pure_infer", "rounds", "keep_logits", "cache", "synsets", "batch_timeout_s",
                   "resume", "overwrite", "progress", "batches_per_call"}

log = logging.getLogger("cardrunner")


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


def plan_run(cfg: RunConfig) -> Plan:
    """Every check that needs neither Ray nor a device: config, model file, recipe, data."""
    cfg.validate()
    parse_devices(cfg.devices)
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
    return Plan(cfg, recipe, meta, model_sha, dataset)


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


def check_precision(backend: str, provider: str, precision: str) -> None:
    """``--precision`` is the CANN execution provider's precision_mode and nothing else."""
    if backend == "onnxruntime":
        try:
            ort.check_precision(provider, precision)
        except BackendError as exc:
            raise ConfigError(str(exc)) from None
    elif precision:
        raise ConfigError(f"--precision {precision}: only --backend onnxruntime --provider cann "
                          "has a precision mode (an .om's was set by ATC: convert.onnx2om "
                          "--precision)")


# --------------------------------------------------------------------------- runs


class Evaluator:
    """Runs configurations one after another, sharing device actors where it can.

    Every run's folder stays locked (``runner.runlock``) from its check until the evaluator
    closes, so that the reports written after ``run`` returns are written under the lock."""

    def __init__(self) -> None:
        self.devices: list[actors.Device] = []
        self.key: tuple | None = None
        self.preprocessors: dict[str, list] = {}  # node name -> actors, for dataset runs
        self.preprocessors_key: tuple | None = None
        self.folders = RunFolders()
        began = process_start_time()  # a first run's start-up includes the command's own
        self.clock = StartupClock(began or time.time())
        if began:
            self.clock.mark("command (interpreter, imports, arguments)")

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for line in self.close():
                log.warning("%s", line)
        finally:
            self.folders.release()

    def close(self) -> list[str]:
        """Tear the actors down; one line per device whose teardown failed."""
        self._kill_preprocessors()
        self.preprocessors, self.preprocessors_key = {}, None
        devices, self.devices, self.key = self.devices, [], None
        return actors.close_devices(devices) if devices else []

    def run(self, cfg: RunConfig, keep_devices: bool = False) -> RunResult:
        """Check everything that can be checked, start or reuse the devices, run.

        ``keep_devices``: leave the actors up for a next run (otherwise they are torn down
        and their teardown problems are part of this result)."""
        clock, self.clock = self.clock, StartupClock(0.0)  # a next run times from its start
        if not clock.began:
            clock = StartupClock(time.time())
        plan = plan_run(cfg)
        out = Path(cfg.out)
        self.folders.hold(out)  # one writer per folder: a second run exits 2 naming this one
        check_out_dir(out, cfg.resume, cfg.overwrite)
        clock.mark("checks and image list")
        started = self._start(plan, clock)
        try:
            clear_out_dir(Path(cfg.out), cfg.overwrite)
            self.folders.used(out)
            if cfg.pure_infer:
                result = run_pure_infer(started)
            else:
                result = run_dataset(started, Path(cfg.out))
        except BaseException:
            for line in self.close():
                log.warning("%s", line)
            raise
        if not keep_devices or not all(d.alive for d in started.devices):
            result.teardown = self.close()  # a failed device is not carried into the next run
        if result.stats:
            result.teardown_s = round(time.time() - result.outcome.started
                                      - result.outcome.wall_s, 4)
        return result

    def _start(self, plan: Plan, clock: StartupClock) -> Started:
        cfg = plan.cfg
        try:
            start_ray(cfg.address, {EMULATED_RESOURCE: cfg.emulated_chips}, cfg.dashboard)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"--address {cfg.address}: {one_line(exc)}") from None
        clock.mark("ray")
        backend, provider = _resolve_backend(cfg)
        cfg.provider = provider
        check_precision(backend, provider, cfg.precision)
        key = (backend, plan.recipe, *(getattr(cfg, f.name) for f in fields(cfg)
                                       if f.name not in RUN_ONLY_FIELDS))
        if key != self.key:
            self.close()
            kind = device_kind(backend, provider)
            selection = parse_devices(cfg.devices)
            nodes = cluster_nodes(kind.resource, every_core_once=selection.all)
            placed = place_devices(selection, nodes, kind.label,
                                   ray.get_runtime_context().get_node_id(), kind.missing)
            # Preprocessors start up while the devices load their models.
            self._start_preprocessors(plan, backend, [node for _, node in placed])
            self.devices = actors.start_devices(cfg, backend, kind, plan.recipe, placed,
                                                bind_chips=not selection.all)
            self.key = key
            clock.mark("devices (actors, model load)")
        try:
            self._start_preprocessors(plan, backend, [d.node for d in self.devices])
            for device in self.devices:
                check_input(device.info, plan.recipe, cfg.model)
            batch_s = actors.warm_up(self.devices, cfg.batch_size)
            clock.mark("warm-up")
            actors.wait_for_preprocessors(self.preprocessors)
            clock.mark("preprocessors")
            if plan.dataset is not None:
                plan.dataset.check_label_range(self.devices[0].info["num_classes"])
        except BaseException:
            for line in self.close():
                log.warning("%s", line)
            raise
        per_call = cfg.batches_per_call or planning.batches_per_call(batch_s, cfg.batch_size)
        return Started(plan, [DeviceState(d) for d in self.devices],
                       self.devices[0].info["num_classes"], per_call, batch_s, clock,
                       self.preprocessors)

    def _kill_preprocessors(self) -> None:
        for group in self.preprocessors.values():
            for prep in group:
                ray.kill(prep)

    def _start_preprocessors(self, plan: Plan, backend: str, nodes: list[NodeInfo]) -> None:
        """The preprocessing actors a dataset run needs on its devices' nodes (kept from the
        previous run when they are the same)."""
        if plan.cfg.pure_infer:
            return
        unique = list({node.node_id: node for node in nodes}.values())
        cpu = backend == "onnxruntime" and plan.cfg.provider == "cpu"
        counts = [plan.cfg.workers or planning.default_workers(n.cpus, cpu) for n in unique]
        key = (plan.recipe, tuple(n.node_id for n in unique), tuple(counts))
        if key != self.preprocessors_key:
            self._kill_preprocessors()
            self.preprocessors = actors.start_preprocessors(unique, counts, plan.recipe)
            self.preprocessors_key = key


def run_evaluation(cfg: RunConfig) -> RunResult:
    """One run with its own device actors."""
    with Evaluator() as evaluator:
        return evaluator.run(cfg)
