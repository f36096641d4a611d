"""What one run is: its plan (checked before Ray), its started devices, and its result."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .actors import BatchReply
from .config import RunConfig
from .dataset import Dataset, ImageIssue
from .driver import DeviceState, DriveOutcome
from .metrics import Accuracy, hit_ranks
from .reaper import start_ticks


@dataclass
class BatchStat:
    device: str
    n: int
    run_start: float
    run_end: float
    infer_s: float
    convert_s: float
    decode_s: float
    handoff_s: float  # payload ready in the preprocessor -> device call starts (transfer+queue)
    stall_s: float  # runtime idle although the batch was decoded (exposed transfer)
    post_s: float = 0.0  # driver: scoring bookkeeping, journal, logits for this batch

    @classmethod
    def of(cls, reply: BatchReply, post_s: float = 0.0) -> BatchStat:
        return cls(reply.device, reply.n, reply.run_start, reply.run_end, reply.infer_s,
                   reply.convert_s, reply.decode_s, reply.handoff_s, reply.stall_s, post_s)


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
    batches_per_call: int = 1  # the call size this run used (chosen or --batches-per-call)
    batch_s: float = 0.0  # the median device's seconds per batch at warm-up
    startup: dict[str, Any] = field(default_factory=dict)  # StartupClock.summary
    data: str = ""  # what --images was and where its labels came from (dataset runs)
    shards: list[dict[str, Any]] = field(default_factory=list)  # each shard's home node
    teardown_s: float = 0.0  # the last reply -> devices and preprocessors torn down

    @property
    def scored(self) -> np.ndarray:
        return np.flatnonzero(self.top[:, 0] >= 0)

    def accuracy(self) -> Accuracy | None:
        if self.labels is None:
            return None
        idx = self.scored
        ranks = hit_ranks(self.top[idx], self.labels[idx], self.num_classes)
        return Accuracy.from_ranks(ranks, self.num_classes)


def process_start_time() -> float | None:
    """When this process started (time.time() scale), from /proc; None where unknown."""
    try:
        ticks = start_ticks(os.getpid())
        boot = next(line for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    return int(boot.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class StartupClock:
    """Where the time from a run's start to its first device call went, part by part."""

    began: float
    parts: dict[str, float] = field(default_factory=dict)
    last: float = 0.0

    def __post_init__(self) -> None:
        self.last = self.last or self.began

    def mark(self, part: str) -> None:
        """The time since the previous mark was spent on ``part``."""
        now = time.time()
        self.parts[part] = round(self.parts.get(part, 0.0) + now - self.last, 4)
        self.last = now

    def summary(self, first_call: float) -> dict[str, Any]:
        parts = dict(self.parts, other=round(max(0.0, first_call - self.last), 4))
        return {"startup_s": round(first_call - self.began, 4), "parts": parts}


@dataclass
class Plan:
    """What a run checked before touching Ray."""

    cfg: RunConfig
    recipe: str
    meta: dict[str, str]
    model_sha: str | None
    dataset: Dataset | None


@dataclass
class Started:
    """A run whose devices are warmed up at its batch size."""

    plan: Plan
    devices: list[DeviceState]
    num_classes: int
    batches_per_call: int
    batch_s: float
    clock: StartupClock
    preprocessors: dict[str, list[Any]]  # node name -> its preprocessing actors (dataset runs)

    def result(self, outcome: DriveOutcome, stats: list[BatchStat], **kw: Any) -> RunResult:
        infos = [dict(d.device.info, node=d.node, failed_at_s=d.failed_at, failure=d.failure,
                      moved_batches=d.moved_batches) for d in self.devices]
        data = self.plan.dataset
        return RunResult(self.plan.cfg, self.plan.recipe, self.plan.meta, self.plan.model_sha,
                         infos, outcome, stats, num_classes=self.num_classes,
                         batches_per_call=self.batches_per_call, batch_s=self.batch_s,
                         startup=self.clock.summary(outcome.started),
                         data=f"{data.source}; {data.label_rule}" if data else "", **kw)


class Interrupted(Exception):
    """Ctrl-C during a dataset run; the journal holds every batch finished before it."""

    def __init__(self, done: int, total: int, out: Path):
        super().__init__(f"interrupted after {done} of {total} images")
        self.done, self.total, self.out = done, total, out
