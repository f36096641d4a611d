"""Planning without Ray: shards per preprocessing actor, model batches, and device calls.

Three units, from the data's side to the device's:

- a **shard** is the part of the image list one preprocessing actor owns (on one node);
- a **batch** is what the model takes in one runtime call (``--batch-size`` images);
- a **device call** carries one or more consecutive batches of one shard across Ray, which
  the device actor runs back to back.  Calls are sized by device time, not by batch size,
  so that Ray's per-call cost vanishes beside the work a call holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from .devices import NodeInfo

#: Device time one call should hold when the size is chosen automatically.  On this
#: project's 2-core machine (EMULATED 310 chips, pure-infer, bs1: 8.3 ms per batch, 4 chips,
#: 3 s runs, one run each) the card's efficiency was 0.838 at one batch per call, 0.982 at
#: 2, 0.986 at 4, 0.988 at 9 (75 ms), 0.987 at 16 and 0.989 at 32, while the driver's CPU
#: fell from 1.95 s to 0.41 s at 9 and 0.19 s at 32: past ~75 ms a call saves little and
#: coarsens the load balancing at the end of a run.
CALL_TARGET_S = 0.075
#: Device time a pure-infer run lasts by default: short runs measure their start and end.
PURE_INFER_S = 3.0
#: Upper bounds for automatically sized calls: a runtime measured as nearly free would
#: otherwise put a whole shard in one call, and every call in flight holds its crops in the
#: object store (256 crops of 300x300: 69 MB) and its logits in the driver when kept.
MAX_BATCHES_PER_CALL = 64
MAX_IMAGES_PER_CALL = 256


@dataclass(frozen=True)
class Batch:
    id: int
    shard: int
    start: int  # position range within the shard
    stop: int
    node: str = ""  # the node whose preprocessor owns the shard


def batches_per_call(batch_s: float, batch_size: int, target_s: float = CALL_TARGET_S) -> int:
    """Batches a call needs to hold ``target_s`` of device time at ``batch_s`` per batch,
    within the caps above."""
    cap = max(1, min(MAX_BATCHES_PER_CALL, MAX_IMAGES_PER_CALL // batch_size))
    if batch_s <= 0:
        return cap
    return max(1, min(cap, math.ceil(target_s / batch_s)))


def pure_infer_rounds(batch_s: float, seconds: float = PURE_INFER_S) -> int:
    """Batches per device for a pure-infer run: at least 50 (the guide's habit), and enough
    for ``seconds`` of device time, so that the ramp at either end weighs under ~1 %."""
    return max(50, math.ceil(seconds / batch_s)) if batch_s > 0 else 50


def plan_batches(
    shard_sizes: list[int], batch_size: int, shard_nodes: list[str] | None = None,
    block: int = 1,
) -> list[Batch]:
    """Batches of each shard, interleaved across shards in blocks of ``block`` batches.

    Interleaving keeps every preprocessor busy; blocks keep the batches a call will carry
    adjacent, so the driver forms a call by taking consecutive batches of one shard.
    """
    nodes = shard_nodes or [""] * len(shard_sizes)
    per_shard = [
        [(s, a, min(a + batch_size, size)) for a in range(0, size, batch_size)]
        for s, size in enumerate(shard_sizes)
    ]
    order = []
    for row in range(0, max((len(p) for p in per_shard), default=0), block):
        for p in per_shard:
            order += p[row : row + block]
    return [Batch(i, s, a, b, nodes[s]) for i, (s, a, b) in enumerate(order)]


def cut_points(total: int, weights: list[int], batch_size: int) -> list[int]:
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
    todo: list[tuple[int, str]], nodes: list[NodeInfo], batch_size: int,
    shard_of: list[int] | None = None,
) -> list[tuple[NodeInfo, list[tuple[int, str]]]]:
    """(home node, images) of every shard: the units a node decodes and, when it runs dry,
    takes whole from another.

    ``nodes`` holds each device's node, so work goes to nodes in proportion to their
    devices.  Images that live in shards of their own (``shard_of``: tar shards) keep them:
    whole shards are dealt to the nodes, so a node reads only its own shards.  Plain files
    are cut into one shard per node at whole batches, so only a shard's last batch can be
    partial (fixed-batch .om files pad it).
    """
    unique = list({node.node_id: node for node in nodes}.values())
    weights = [sum(n.node_id == u.node_id for n in nodes) for u in unique]
    if shard_of is None:
        cuts = cut_points(len(todo), weights, batch_size)
        return [(node, todo[a:b]) for node, (a, b) in zip(unique, pairwise(cuts), strict=True)
                if b > a]
    groups: dict[int, list[tuple[int, str]]] = {}
    for item in todo:
        groups.setdefault(shard_of[item[0]], []).append(item)
    load = [0] * len(unique)
    planned = []
    for group in sorted(groups.values(), key=len, reverse=True):  # largest first: even loads
        i = min(range(len(unique)), key=lambda j: (load[j] + len(group)) / weights[j])
        load[i] += len(group)
        planned.append((unique[i], group))
    return sorted(planned, key=lambda p: p[1][0][0])  # in image order
