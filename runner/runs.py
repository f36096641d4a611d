"""The two run modes on started devices: pure inference and a scored dataset."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from . import actors, planning
from .cache import CacheBusyError, CacheError, CropCache
from .config import ConfigError, RunConfig
from .dataset import Dataset, ImageIssue
from .driver import DriveOutcome, Driver, SubmitPrep
from .journal import Journal, JournalError, LogitsFile
from .metrics import TOPK
from .preprocess import get_recipe
from .run import BatchStat, Interrupted, RunResult, Started
from .sources import Location

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

    def __init__(self, dataset: Dataset, shards: list[list[tuple[int, Location]]],
                 top: np.ndarray, issues: list[ImageIssue], journal: Journal,
                 logits: LogitsFile | None, bar: tqdm):
        self.dataset, self.shards, self.top, self.issues = dataset, shards, top, issues
        self.journal, self.logits, self.bar = journal, logits, bar
        self.node_names: dict[str, str] = {}  # Ray node id -> node name, for the journal
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
                            "top": r.top.tolist(), "errors": r.errors,
                            "decoded_on": self.node_names.get(r.decoded_on, r.decoded_on)})
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
            todo = [(int(i), dataset.location(int(i))) for i in np.flatnonzero(~done)]
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
            started = True
            planned = planning.plan_shards(todo, [d.device.node for d in run.devices],
                                           cfg.batch_size, dataset.shard_of)
            shards = [images for _, images in planned]
            bar = stack.enter_context(tqdm(total=n, initial=resumed, unit="img",
                                           disable=not cfg.progress, desc="evaluate"))
            sink = DatasetSink(dataset, shards, top, issues, journal, logits, bar)
            sink.node_names = {d.device.node.node_id: d.node for d in run.devices}
            turns = {node: itertools.cycle(group) for node, group in run.preprocessors.items()}

            def submit_prep(call: list[planning.Batch]) -> tuple[Any, Any]:
                """Decoded by the next preprocessor of the node the call is for."""
                images = [shards[b.shard][b.start : b.stop] for b in call]
                prep = next(turns[call[0].node])
                return tuple(prep.load.options(num_returns=2).remote(images, cache))

            batches = planning.plan_batches([len(s) for s in shards], cfg.batch_size,
                                            [node.name for node, _ in planned],
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
    homes = [{"node": node.name, "images": len(images),
              "shard": "files" if dataset.shard_of is None
              else dataset.shards[dataset.shard_of[images[0][0]]]}
             for node, images in planned]
    return run.result(outcome, sink.stats, num_images=n, names=dataset.names, labels=labels,
                      top=top, issues=issues, resumed_images=resumed, cache=cache_state,
                      workers=sum(map(len, run.preprocessors.values())), shards=homes)


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
