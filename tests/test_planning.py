"""Planning without Ray: shards, batches, call sizes, and how the driver forms calls."""

from collections import deque
from itertools import pairwise

from runner.actors import Device
from runner.devices import DeviceRef, NodeInfo
from runner.driver import DeviceState, Driver
from runner.planning import (
    MAX_BATCHES_PER_CALL,
    MAX_IMAGES_PER_CALL,
    batches_per_call,
    plan_batches,
    plan_shards,
    pure_infer_rounds,
)

HOST = NodeInfo("id1", "host1", "h1", "10.0.0.1", cpus=4, devices=4)


def test_plan_batches_interleaves_shards_and_covers_everything():
    batches = plan_batches([5, 3], 2)
    assert [(b.shard, b.start, b.stop) for b in batches] == [
        (0, 0, 2), (1, 0, 2), (0, 2, 4), (1, 2, 3), (0, 4, 5)]
    assert [b.id for b in batches] == list(range(5))


def test_plan_batches_keeps_a_calls_batches_adjacent():
    batches = plan_batches([9, 5], 2, block=2)
    assert [(b.shard, b.start, b.stop) for b in batches] == [
        (0, 0, 2), (0, 2, 4), (1, 0, 2), (1, 2, 4), (0, 4, 6), (0, 6, 8), (1, 4, 5), (0, 8, 9)]


def test_plan_shards_keeps_each_hosts_images_on_that_host():
    host2 = NodeInfo("id2", "host2", "h2", "10.0.0.2", cpus=2, devices=1)
    host1 = NodeInfo("id1", "host1", "h1", "10.0.0.1", cpus=4, devices=3)
    todo = [(i, f"img{i}.jpg") for i in range(100)]
    planned = plan_shards(todo, [host1, host1, host1, host2], batch_size=4, workers=None)
    by_node = {}
    for node, shard in planned:
        by_node.setdefault(node.name, []).append(shard)
    # 3 of 4 devices on host1: 3/4 of the images, cut at a whole batch (19 x 4 = 76).
    assert sum(map(len, by_node["host1"])) == 76 and sum(map(len, by_node["host2"])) == 24
    assert len(by_node["host1"]) == 4 and len(by_node["host2"]) == 2  # one actor per core
    assert [item for _, shard in planned for item in shard] == todo  # each image once
    assert all(len(shard) % 4 == 0 for shards in by_node.values() for shard in shards[:-1])

    sizes = [len(shard) for _, shard in planned]
    batches = plan_batches(sizes, 4, [node.name for node, _ in planned])
    assert sum(b.stop - b.start for b in batches if b.node == "host1") == 76
    assert len(plan_shards(todo, [host1], 4, workers=None, cpu_inference=True)) == 2  # half


def test_calls_hold_about_75_ms_of_device_time():
    assert batches_per_call(0.0083, 1) == 10  # EMULATED 310, bs1: 8.3 ms per batch
    assert batches_per_call(0.0952, 16) == 1  # bs16: 95 ms, already enough
    assert batches_per_call(0.5, 1) == 1
    assert batches_per_call(1e-6, 1) == batches_per_call(0.0, 1) == MAX_BATCHES_PER_CALL
    assert batches_per_call(0.002, 16) == MAX_IMAGES_PER_CALL // 16  # 2 ms: 38, capped at 256


def _driver(batches, devices=4, per_call=8, in_flight=2):
    states = [DeviceState(Device(DeviceRef(None, i), None, HOST)) for i in range(devices)]
    return Driver(states, batches, submit_prep=None, on_replies=None, in_flight=in_flight,
                  batches_per_call=per_call)


def test_calls_take_consecutive_batches_of_one_shard_and_shrink_near_the_end():
    batches = plan_batches([200, 200], 1, ["host1", "host1"], block=8)
    driver = _driver(batches)
    queue = driver.queues["host1"]
    sizes = []
    while queue:
        call = driver.form_call(queue)
        assert len({b.shard for b in call.batches}) == 1
        assert all(a.stop == b.start for a, b in pairwise(call.batches))
        sizes.append(len(call.batches))
    assert sum(sizes) == 400
    assert sizes[:40] == [8] * 40  # plenty left: full calls
    assert sizes[-8:] == [1] * 8  # the last ones: one batch each, so the devices end together
    assert sum(size < 8 for size in sizes) <= 3 * 8  # the shrinking costs a few calls per slot


def test_a_call_never_spans_two_shards_or_a_gap():
    driver = _driver(plan_batches([3, 3], 1, ["host1", "host1"], block=8), devices=1)
    queue = driver.queues["host1"]
    assert [(b.shard, b.start) for b in driver.form_call(queue).batches] == [
        (0, 0), (0, 1), (0, 2)]
    queue.appendleft(queue.pop())  # (1, 2) now precedes (1, 0): not consecutive
    assert [(b.shard, b.start) for b in driver.form_call(queue).batches] == [(1, 2)]
    assert isinstance(queue, deque) and len(queue) == 2


def test_pure_infer_lasts_a_few_seconds_of_device_time_by_default():
    assert pure_infer_rounds(0.0083) == 362  # EMULATED 310, bs1: 3 s / 8.3 ms
    assert pure_infer_rounds(0.0952) == 50  # bs16: 50 rounds already last 4.8 s
    assert pure_infer_rounds(0.0) == 50
