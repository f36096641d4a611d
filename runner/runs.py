"""The two run modes on started devices: pure inference and a scored dataset."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from . import actors, planning
from .cache import CacheBusyError, CacheError, CropCache
from .config import ConfigError, RunConfig
from .dataset import Dataset, ImageIssue
from .driver import DriveOutcome, Driver, SubmitPrep
from .errors import one_line
from .journal import Journal, JournalError, LogitsFile
from .metrics import TOPK
from .preprocess import get_recipe
from .run import BatchStat, Interrupted, RunResult, Started

log = logging.getLogger("cardrunner")


def drive(run: Started, batches: list[planning.Batch], submit_prep: SubmitPrep,
          on_replies: Callable[[list[actors.BatchReply]], None],
          on_give_up: Callable[[planning.Batch, str], None] | None = None) -> DriveOutcome:
    """The driver over this run's devices with this run's settings."""
    cfg = run.plan.cfg
    return Driver(run.devices, batches, submit_prep, on_replies, in_flight=cfg.in_flight,
                  batches_per_call=run.batches_per_call, keep_logits=cfg.keep_logits,
                  batch_timeout_s=cfg.batch_timeout_s, on_give_up=on_give_up).run()


def run_pure_infer(run: Started) -> RunResult:
    """The guide's pure-inference mode: one random payload, put once, sent rounds x devices
    times along the same path as real data."""
    cfg = run.plan.cfg
    spec = run.devices[0].device.info["input"]
    shape = [cfg.batch_size * run.batches_per_call, *spec["shape"][1:]]
    rng = np.random.default_rng(0)
    if spec["dtype"] == "uint8":
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        pixels = rng.standard_normal(shape, dtype=np.float32)
    parts = [actors.Part(np.arange(cfg.batch_size))] * run.batches_per_call
    payload = ray.put(actors.Payload(pixels, parts, None, tensor=True))
    # Put once, before the clock starts: one untimed call per device brings the payload to
    # its node (a second node would otherwise pull it inside the first timed call).
    ray.get([d.device.actor.infer.remote(payload, [(-1, 0)], False) for d in run.devices])
    run.clock.mark("payload")
    rounds = cfg.rounds or planning.pure_infer_rounds(run.batch_s)
    batches = planning.plan_batches([cfg.batch_size * rounds * len(run.devices)],
                                    cfg.batch_size)
    stats: list[BatchStat] = []
    bar = tqdm(total=len(batches) * cfg.batch_size, unit="img", disable=not cfg.progress,
               desc="pure-infer")

    def on_replies(replies: list[actors.BatchReply]) -> None:
        stats.extend(BatchStat.of(r) for r in replies)
        bar.update(sum(r.n for r in replies))

    outcome = drive(run, batches, lambda _: (payload, None), on_replies)
    bar.close()
    return run.result(outcome, stats, num_images=sum(st.n for st in stats), names=[],
                      labels=None, top=np.zeros((0, TOPK), np.int32))


class DatasetSink:
    """Where a dataset run's replies go: scores, errors, journal, logits, progress."""

    def __init__(self, dataset: Dataset, shards: list[list[tuple[int, str]]], top: np.ndarray,
                 issues: list[ImageIssue], journal: Journal, logits: LogitsFile | None,
                 bar: tqdm):
        self.dataset, self.shards, self.top, self.issues = dataset, shards, top, issues
        self.journal, self.logits, self.bar = journal, logits, bar
        self.stats: list[BatchStat] = []
        self.journaled = 0  # images of this session in the journal (scored or unreadable)

    def on_replies(self, replies: list[actors.BatchReply]) -> None:
        t0 = time.perf_counter()
        records = []
        for r in replies:
            if r.n:
                self.top[r.indices] = r.top
                if self.logits is not None:
                    self.logits.write(r.indices, r.logits)
            for i, reason in r.errors:
                self.issues.append(ImageIssue(self.dataset.names[i], reason, int(i)))
            records.append({"batch": r.batch, "device": r.device, "indices": r.indices.tolist(),
                            "top": r.top.tolist(), "errors": r.errors})
        self.journal.append(*records)
        finished = sum(r.n + len(r.errors) for r in replies)
        self.journaled += finished
        self.bar.update(finished)
        post_s = (time.perf_counter() - t0) / len(replies)
        self.stats.extend(BatchStat.of(r, post_s) for r in replies)

    def on_give_up(self, batch: planning.Batch, reason: str) -> None:
        for i, _ in self.shards[batch.shard][batch.start : batch.stop]:
            self.issues.append(ImageIssue(self.dataset.names[i], f"batch failed: {reason}", i))
            self.bar.update(1)


def replay_journal(journal: Journal, dataset: Dataset, top: np.ndarray,
                   issues: list[ImageIssue]) -> np.ndarray:
    """Fill in what earlier sessions of this run finished; return the mask of done images."""
    done = np.zeros(len(dataset), dtype=bool)
    for rec in journal.records:
        idx = np.asarray(rec["indices"], dtype=np.int64)
        if len(idx):
            top[idx] = rec["top"]
        done[idx] = True
        for i, reason in rec["errors"]:
            issues.append(ImageIssue(dataset.names[i], reason, i))
            done[i] = True
    return done


def start_preprocessors(run: Started, todo: list[tuple[int, str]],
                        cache: CropCache | None) -> tuple[list[Any], list, list[str]]:
    """(actors, shards, node of each shard): one preprocessing actor per shard, started."""
    cfg = run.plan.cfg
    cpu = run.devices[0].device.info["provider"] == "CPUExecutionProvider"
    planned = planning.plan_shards(todo, [d.device.node for d in run.devices], cfg.batch_size,
                                   cfg.workers, cpu_inference=cpu)
    preps = [
        ray.remote(actors.Preprocessor).options(
            # A preprocessor that dies (the OOM killer, a decoder crash, its node lost) is
            # restarted by Ray with the same shard, on its node or, once that node is gone,
            # on another (soft affinity); the calls it was running are made again there.
            # Placed by affinity, not by CPU accounting: a surviving node's own
            # preprocessors would otherwise hold every CPU a restarted one needs.
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=actors.PREP_TASK_RETRIES,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=True),
        ).remote(shard, run.plan.recipe, cache)
        for node, shard in planned
    ]
    try:  # actor start-up is not part of the timed run
        ray.get([p.ready.remote() for p in preps], timeout=actors.START_TIMEOUT_S)
    except (GetTimeoutError, RayError) as exc:
        for p in preps:
            ray.kill(p)
        raise ConfigError(f"preprocessing actors did not start: {one_line(exc)}") from None
    return preps, [shard for _, shard in planned], [node.name for node, _ in planned]


def run_dataset(run: Started, out: Path) -> RunResult:
    """Score the dataset: replay the journal, open the logits file and the cache, start
    the preprocessors, drive, and return everything scored."""
    cfg, dataset = run.plan.cfg, run.plan.dataset
    assert dataset is not None
    n = len(dataset)
    top = np.full((n, TOPK), -1, dtype=np.int32)
    issues = list(dataset.issues)
    labels = None if dataset.labels is None else np.asarray(dataset.labels, np.int64)
    header = {
        "model_sha256": run.plan.model_sha,
        "recipe": run.plan.recipe,
        "images": dataset.fingerprint(),
        "count": n,
        "backend": "emulated" if cfg.backend == "emulated" else "real",
        "save_logits": cfg.keep_logits,  # a resume cannot fill in logits it never kept
    }
    journal = Journal(out / "journal.jsonl", header, cfg.resume)
    started = False
    try:
        with ExitStack() as stack:
            done = replay_journal(journal, dataset, top, issues)
            resumed = int(done.sum())
            todo = [(int(i), dataset.path(int(i))) for i in np.flatnonzero(~done)]
            logits = open_logits(out, cfg, n, run.num_classes, resumed)
            if logits is not None:
                stack.callback(logits.close)
            if not todo:  # --resume of a finished run: nothing to time
                return run.result(DriveOutcome(0.0, time.time()), [], num_images=n,
                                  names=dataset.names, labels=labels, top=top, issues=issues,
                                  resumed_images=resumed)
            cache = open_cache(cfg.cache, run.plan.recipe, n, header["images"], resumed) if (
                cfg.cache) else None
            if cache is not None:
                stack.callback(cache.close)
            run.clock.mark("journal, logits and cache")
            preps, shards, nodes = start_preprocessors(run, todo, cache)
            run.clock.mark("preprocessors")
            started = True
            stack.callback(lambda: [ray.kill(p) for p in preps])
            bar = stack.enter_context(tqdm(total=n, initial=resumed, unit="img",
                                           disable=not cfg.progress, desc="evaluate"))
            sink = DatasetSink(dataset, shards, top, issues, journal, logits, bar)

            def submit_prep(call: list[planning.Batch]) -> tuple[Any, Any]:
                ranges = [(b.start, b.stop) for b in call]
                return tuple(preps[call[0].shard].load.options(num_returns=2).remote(ranges))

            batches = planning.plan_batches([len(s) for s in shards], cfg.batch_size, nodes,
                                            block=run.batches_per_call)
            try:
                outcome = drive(run, batches, submit_prep, sink.on_replies, sink.on_give_up)
            except KeyboardInterrupt:
                raise Interrupted(resumed + sink.journaled, n, out) from None
            cache_state = "off" if cache is None else "hit" if cache.complete else (
                "built" if cache.finalize() else "partial")
    except BaseException:
        if not started:
            journal.discard_if_unused()
        raise
    finally:
        journal.close()
    return run.result(outcome, sink.stats, num_images=n, names=dataset.names, labels=labels,
                      top=top, issues=issues, resumed_images=resumed, cache=cache_state,
                      workers=len(preps))


def open_logits(out: Path, cfg: RunConfig, rows: int, classes: int,
                resumed: int) -> LogitsFile | None:
    """``logits.npy`` of a run that keeps logits (``--save-logits``), else None."""
    if not cfg.keep_logits:
        return None
    path = out / "logits.npy"
    if resumed and not path.exists():
        raise JournalError(f"--resume: {path} is missing; the finished images' logits "
                           "are lost (rerun with --overwrite)")
    return LogitsFile(path, rows, classes, cfg.resume)


def open_cache(root: str, recipe: str, n: int, fingerprint: str, resumed: int) -> CropCache | None:
    """The decoded-crop cache for this image list, or None when it cannot be used now."""
    try:
        cache = CropCache.open(root, get_recipe(recipe), n, fingerprint)
    except CacheBusyError as exc:
        log.warning("%s; running without the cache", exc)
        return None
    except CacheError as exc:
        raise ConfigError(str(exc)) from None  # cache messages name --cache themselves
    if not cache.complete and resumed:
        log.warning("--cache: a resumed run cannot fill the whole cache; running without it")
        cache.close()
        return None
    return cache
