"""The driver loop: device calls out, replies in, failures re-queued.

Each node has a queue of the batches of its shards and a queue of calls to retry; a
node's calls are decoded by that node's preprocessors, so no pixels cross hosts.  A device
with room takes work from its own node; once that is empty, its node takes work over from
the node with the most left: a whole shard no call has started, else a retry or a call's
worth of batches, all decoded on the node that took them.  A call is formed when a device
has room: up to ``batches_per_call`` consecutive batches of one shard, and fewer near the
end of the run, so that the devices finish together (guided self-scheduling).  Each device keeps
``in_flight`` calls queued; its actor runs two at once, so one call's pixels arrive and
convert while the other computes.

Bookkeeping stays per model batch: replies, retries, give-ups and the journal count
batches.  A call that fails is retried one batch per call, so that a batch whose images
crash a decoder or a runtime cannot take its neighbours down with it.  Blame is placed: a
failed preprocessing is made again and not held against the device; a device that fails
twice, or whose actor dies, is dropped.  ``--batch-timeout`` bounds each batch of a call,
so a call of k batches may run k timeouts once its payload has been decoded.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import (
    ActorUnavailableError,
    GetTimeoutError,
    ObjectLostError,
    RayActorError,
    RayError,
)

from .actors import BatchReply, Device
from .errors import one_line, short_reason
from .planning import Batch

#: A batch that failed this many times is given up and its images recorded as errors.
MAX_BATCH_ATTEMPTS = 3
#: A device whose runtime raised this many times is dropped from the run.
MAX_DEVICE_FAILURES = 2
#: A call whose preprocessor cannot be reached (being restarted: after its node died, Ray
#: needs its health checks, ~15 s, to notice) is made again every PREP_RETRY_S, for up to
#: PREP_WAIT_S, before that counts as a failed attempt.
PREP_RETRY_S = 1.0
PREP_WAIT_S = 120.0
#: How long to wait, after a run, for Ray to confirm that a node whose every device failed
#: is dead (its health checks take ~15 s by default).
NODE_LOSS_WAIT_S = 30.0

log = logging.getLogger("cardrunner")


@dataclass
class DeviceState:
    """One device during one run."""

    device: Device
    in_flight: int = 0
    last_reply: float = 0.0  # time.time() of its latest reply: its next call starts no earlier
    failures: int = 0
    failed_at: float | None = None  # seconds into the run
    failure: str = ""
    unreachable: bool = False  # its actor died or could not be reached (maybe its node)
    moved_batches: int = 0

    @property
    def alive(self) -> bool:
        return self.failed_at is None

    @property
    def node(self) -> str:
        return self.device.node.name


@dataclass
class Call:
    """Consecutive batches of one shard that travel to a device together."""

    batches: list[Batch]
    parts: list[int]  # each batch's part index in the payload
    payload: Any = None  # ObjectRef of the payload once submitted
    status: Any = None  # ObjectRef of the preprocessor's image count (None: nothing to check)
    ready_seen: float | None = None  # when the driver first saw the payload made (hang clock)
    slow_prep_warned: bool = False
    attempts: int = 0
    waited_s: float = 0.0  # for its preprocessor to come back (not counted as attempts)

    @property
    def node(self) -> str:
        return self.batches[0].node

    def split(self) -> list[Call]:
        """One call per batch, sharing this call's payload (if any) and attempts."""
        return [Call([b], [p], self.payload, self.status, self.ready_seen,
                     attempts=self.attempts, waited_s=self.waited_s)
                for b, p in zip(self.batches, self.parts, strict=True)]

    def remake(self) -> None:
        """Forget the payload: the call is decoded again before it is sent."""
        self.payload = self.status = self.ready_seen = None


@dataclass
class DriveOutcome:
    """What the driver observed; scoring and reporting happen elsewhere."""

    wall_s: float
    started: float
    given_up: list[tuple[int, str]] = field(default_factory=list)  # (batch id, reason)
    calls: int = 0  # device calls submitted
    cpu_s: float = 0.0  # CPU time of the driver process while it drove (all its threads)
    nodes_lost: dict[str, float] = field(default_factory=dict)  # node -> seconds into the run
    moves: list[dict[str, Any]] = field(default_factory=list)  # work a dry node took over


SubmitPrep = Callable[[list[Batch]], tuple[Any, Any]]


class Driver:
    """Feeds batches to devices in calls and hands each batch's reply on.

    ``submit_prep(batches)`` returns (payload ref, status ref) for one call; the payload is
    reused when a call moves to another device after its device failed, and made again
    when it was the preprocessing that failed.
    """

    def __init__(
        self, devices: list[DeviceState], batches: list[Batch], submit_prep: SubmitPrep,
        on_replies: Callable[[list[BatchReply]], None], *, in_flight: int = 2,
        batches_per_call: int = 1, keep_logits: bool = False, batch_timeout_s: float = 600.0,
        on_give_up: Callable[[Batch, str], None] | None = None,
    ):
        self.devices = devices
        self.submit_prep = submit_prep
        self.on_replies = on_replies
        self.on_give_up = on_give_up
        self.in_flight = in_flight
        self.batches_per_call = batches_per_call
        self.keep_logits = keep_logits
        self.batch_timeout_s = batch_timeout_s
        self.queues: dict[str, deque[Batch]] = {dev.node: deque() for dev in devices}
        for b in batches:
            self.queues.setdefault(b.node, deque()).append(b)
        self.retries: dict[str, deque[Call]] = {node: deque() for node in self.queues}
        self.started: set[int] = set()  # shards some call has taken batches from
        self.pending: dict[Any, tuple[Call, DeviceState, float]] = {}
        self.waiting: list[tuple[float, Call]] = []  # (not before, call), in time order
        self.outcome = DriveOutcome(0.0, time.time())

    def run(self) -> DriveOutcome:
        cpu0, self.outcome.started = time.process_time(), time.time()
        for slots in range(1, self.in_flight + 1):  # every device's first call first
            for dev in self.devices:
                self.fill(dev, slots)
        while self.pending or self.waiting:
            timeout = min(5.0, self.batch_timeout_s)
            if self.waiting:
                timeout = max(0.0, min(timeout, self.waiting[0][0] - time.time()))
            if self.pending:
                done, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout)
            else:
                done = []
                time.sleep(timeout)
            self.release_waiting()
            self.kill_hung(done)
            if done:
                self.on_reply(done[0])
        self.give_up_rest()
        self.outcome.wall_s = time.time() - self.outcome.started
        self.outcome.cpu_s = time.process_time() - cpu0
        self.note_lost_nodes()  # may wait for Ray to confirm: after the clock
        return self.outcome

    # ----------------------------------------------------------------- sending work

    def fill(self, dev: DeviceState, slots: int | None = None) -> None:
        """Send ``dev`` calls until it has ``slots`` (default: ``in_flight``) pending."""
        slots = slots or self.in_flight
        while dev.alive and dev.in_flight < slots and (call := self.next_call(dev)):
            if call.payload is None:
                call.payload, call.status = self.submit_prep(call.batches)
                call.parts = list(range(len(call.batches)))
            picks = [(b.id, p) for b, p in zip(call.batches, call.parts, strict=True)]
            ref = dev.device.actor.infer.remote(call.payload, picks, self.keep_logits)
            self.pending[ref] = (call, dev, time.time())
            dev.in_flight += 1
            self.outcome.calls += 1

    def work(self, node: str) -> int:
        return len(self.queues.get(node, ())) + len(self.retries.get(node, ()))

    def next_call(self, dev: DeviceState) -> Call | None:
        """A retry or a new call from the device's own node; work with no home node (pure
        inference) next; else work taken over from another node."""
        node = dev.node
        if not self.work(node):
            if self.work(""):
                node = ""
            elif not self.steal(node):
                return None
        if self.retries[node]:
            return self.retries[node].popleft()
        return self.form_call(self.queues[node])

    def steal(self, node: str) -> bool:
        """``node`` ran dry: move work to it from the node with the most left, to be decoded
        on ``node``: a whole shard that no call has started yet, else a retry, else the
        last call's worth of batches.  Returns whether anything moved."""
        victim = max((n for n in self.queues if n not in (node, "")), key=self.work,
                     default=None)
        if victim is None or not self.work(victim):
            return False
        queue = self.queues[victim]
        shard = next((b.shard for b in reversed(queue) if b.shard not in self.started), None)
        if shard is not None:
            moved = [b for b in queue if b.shard == shard]
            self.queues[victim] = deque(b for b in queue if b.shard != shard)
            self.queues[node].extend(replace(b, node=node) for b in moved)
        elif self.retries[victim]:
            call = self.retries[victim].pop()
            moved = call.batches
            call.batches = [replace(b, node=node) for b in call.batches]
            call.remake()  # decoded here, not shipped
            self.retries[node].append(call)
        else:
            moved = [queue.pop()]
            while (len(moved) < self.batches_per_call and queue
                   and queue[-1].shard == moved[-1].shard and queue[-1].stop == moved[-1].start):
                moved.append(queue.pop())
            moved.reverse()
            self.queues[node].extend(replace(b, node=node) for b in moved)
        self.outcome.moves.append({
            "at_s": round(time.time() - self.outcome.started, 3), "to": node, "from": victim,
            "shard": moved[0].shard, "batches": [b.id for b in moved],
            "whole_shard": shard is not None})
        return True

    def form_call(self, queue: deque[Batch]) -> Call:
        """Up to the call size of consecutive batches of one shard from the queue's front.

        Near the end, calls shrink to the remaining batches' fair share of the devices'
        slots, so that no device is left with a long call while the others are idle.
        """
        remaining = sum(len(q) for q in self.queues.values())
        slots = max(1, sum(d.alive for d in self.devices) * self.in_flight)
        size = min(self.batches_per_call, max(1, math.ceil(remaining / slots)))
        batches = [queue.popleft()]
        while (len(batches) < size and queue and queue[0].shard == batches[-1].shard
               and queue[0].start == batches[-1].stop):
            batches.append(queue.popleft())
        self.started.add(batches[0].shard)
        return Call(batches, list(range(len(batches))))

    # ----------------------------------------------------------------- replies

    def on_reply(self, ref: Any) -> None:
        call, dev, _ = self.pending.pop(ref)
        dev.in_flight -= 1
        dev.last_reply = time.time()
        try:
            replies = ray.get(ref)
        except RayError as exc:
            self.on_error(call, dev, exc)
            return
        self.on_replies(replies)
        self.fill(dev)

    def on_error(self, call: Call, dev: DeviceState, exc: RayError) -> None:
        reason = one_line(exc)
        prep = preprocessing_error(call.status)
        if isinstance(prep, ActorUnavailableError) and call.waited_s < PREP_WAIT_S:
            # Its preprocessor is being restarted (after its node died, until Ray has
            # noticed): neither the images' fault nor the device's; made again once the
            # preprocessor can be reached.
            call.remake()
            call.waited_s += PREP_RETRY_S
            self.waiting.append((time.time() + PREP_RETRY_S, call))
        elif prep is not None or payload_lost(exc):
            # Never made, or lost with the node that held it: make it again; not the
            # device's fault.
            call.remake()
            self.retry(call, f"preprocessing failed: {one_line(prep or exc)}")
        else:
            dev.failures += 1
            dev.unreachable = isinstance(exc, RayActorError)
            if dev.unreachable or dev.failures >= MAX_DEVICE_FAILURES:
                self.drop(dev, reason)
            dev.moved_batches += len(call.batches)
            self.retry(call, reason)
        for other in sorted(self.devices, key=lambda d: d is dev):  # others get it first
            self.fill(other)

    def retry(self, call: Call, reason: str) -> None:
        call.attempts += 1
        if call.attempts >= MAX_BATCH_ATTEMPTS or not any(d.alive for d in self.devices):
            self.give_up(call, reason)
        else:
            self.retries[call.node].extendleft(reversed(call.split()))

    def release_waiting(self) -> None:
        """Calls whose wait is over go back to their node's queue, first in line."""
        now, due = time.time(), []
        while self.waiting and self.waiting[0][0] <= now:
            due.append(self.waiting.pop(0)[1])
        for call in reversed(due):
            self.retries[call.node].appendleft(call)
        if due:  # with no device left, give_up_rest gives them up once the wait is over
            for dev in self.devices:
                self.fill(dev)

    def drop(self, dev: DeviceState, reason: str) -> None:
        if dev.alive:
            dev.failed_at = time.time() - self.outcome.started
            dev.failure = reason
            log.warning("device %s dropped: %s", dev.device.ref, short_reason(reason))

    def note_lost_nodes(self) -> None:
        """Nodes that died during the run, lost when their first device was dropped.

        A node all of whose devices were dropped as unreachable is asked about until Ray
        confirms its death (Ray notices only once its health checks time out, ~15 s) or
        NODE_LOSS_WAIT_S have passed; the others finished its work meanwhile, so this waits
        after the run."""
        nodes = {d.device.node.node_id: d.device.node for d in self.devices}
        suspects = {node_id: min(d.failed_at for d in self.devices
                                 if d.device.node.node_id == node_id)
                    for node_id in nodes
                    if all(d.unreachable for d in self.devices
                           if d.device.node.node_id == node_id)}
        deadline = time.time() + NODE_LOSS_WAIT_S
        while suspects:
            alive = alive_nodes()
            for node_id in [n for n in suspects if n not in alive]:
                at = suspects.pop(node_id)
                self.outcome.nodes_lost[nodes[node_id].name] = at
                log.warning("node %s lost at %.1f s: its devices were dropped and the other "
                            "nodes finished its images", nodes[node_id].name, at)
            if not suspects or time.time() > deadline:
                break
            time.sleep(0.5)

    def give_up(self, call: Call, reason: str) -> None:
        for batch in call.batches:
            self.outcome.given_up.append((batch.id, reason))
            if self.on_give_up:
                self.on_give_up(batch, reason)

    def give_up_rest(self) -> None:
        """Batches still queued when every device has died."""
        for node, queue in self.queues.items():
            while self.retries[node]:
                self.give_up(self.retries[node].popleft(), "no device left")
            while queue:
                self.give_up(Call([queue.popleft()], [0]), "no device left")

    # ----------------------------------------------------------------- hangs

    def kill_hung(self, replied: list) -> None:
        """Drop a device whose call runs past its limit once its payload was decoded.

        Checked on every turn, so that busy peers cannot hide a hang.  A device runs its
        calls in order, so its oldest call started no earlier than its last reply, its
        submission, and its payload being decoded: a payload still being decoded is the
        preprocessing's delay, never held against the device.
        """
        now = time.time()
        for ref, (call, dev, since) in list(self.pending.items()):
            if ref in replied or not dev.alive:
                continue
            limit = self.batch_timeout_s * len(call.batches)
            if now - max(since, dev.last_reply, call.ready_seen or 0.0) <= limit:
                continue
            if call.ready_seen is None:
                if ray.wait([call.payload], timeout=0)[0]:
                    call.ready_seen = now  # its clock starts now: at most one timeout late
                elif not call.slow_prep_warned:
                    call.slow_prep_warned = True
                    log.warning("batch %d: preprocessing has not finished in %g s; waiting",
                                call.batches[0].id, limit)
                continue
            self.drop(dev, f"batch {call.batches[0].id} ran over {limit:g} s: hung")
            ray.kill(dev.device.actor)  # its pending calls now fail and are re-queued


def payload_lost(exc: RayError) -> bool:
    """Whether a device call failed because its payload was lost (the node holding it died)."""
    return isinstance(exc, ObjectLostError) or isinstance(getattr(exc, "cause", None),
                                                          ObjectLostError)


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def preprocessing_error(status: Any) -> RayError | None:
    """How the preprocessing behind a call failed (its tiny status ref holds the error)."""
    if status is None:
        return None
    try:
        ray.get(status, timeout=30)
    except GetTimeoutError:
        return None
    except RayError as exc:
        return exc
    return None
