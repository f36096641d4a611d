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
    planned = plan_shards(todo, [host1, host1, host1, host2], batch_size=4)
    # Files: one shard per host, 3 of 4 devices on host1: 3/4 of the images, cut at a
    # whole batch (19 x 4 = 76).
    assert [(node.name, len(images)) for node, images in planned] == [("host1", 76),
                                                                     ("host2", 24)]
    assert [item for _, images in planned for item in images] == todo  # each image once
    sizes = [len(images) for _, images in planned]
    batches = plan_batches(sizes, 4, [node.name for node, _ in planned])
    assert sum(b.stop - b.start for b in batches if b.node == "host1") == 76


def test_tar_shards_are_dealt_whole_in_proportion_to_devices():
    host2 = NodeInfo("id2", "host2", "h2", "10.0.0.2", cpus=2, devices=1)
    host1 = NodeInfo("id1", "host1", "h1", "10.0.0.1", cpus=4, devices=3)
    shard_of = [i // 10 for i in range(80)]  # 8 shards of 10 images
    todo = [(i, f"img{i}.jpg") for i in range(80) if i != 35]
    planned = plan_shards(todo, [host1, host1, host1, host2], 4, shard_of)
    per_node = {}
    for node, images in planned:
        assert len({shard_of[i] for i, _ in images}) == 1  # a shard never splits
        per_node[node.name] = per_node.get(node.name, 0) + 1
    assert per_node == {"host1": 6, "host2": 2}  # 3 devices vs 1
    assert sorted(item for _, images in planned for item in images) == todo


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


def test_a_node_that_runs_dry_takes_a_whole_unstarted_shard_from_the_busiest():
    host2 = NodeInfo("id2", "host2", "h2", "10.0.0.2", cpus=4, devices=4)
    batches = plan_batches([6, 6, 6], 2, ["host1", "host2", "host2"], block=3)
    devices = [DeviceState(Device(DeviceRef(None, 0), None, HOST)),
               DeviceState(Device(DeviceRef(None, 1), None, host2))]
    driver = Driver(devices, batches, submit_prep=None, on_replies=None, batches_per_call=3)
    first = driver.next_call(devices[1])  # host2 starts its shard 1
    assert {b.shard for b in first.batches} == {1}
    driver.queues["host1"].clear()  # host1 has finished its own work
    call = driver.next_call(devices[0])
    # It takes shard 2, which nobody started, whole, to be decoded on host1.
    assert {(b.shard, b.node) for b in call.batches} == {(2, "host1")}
    assert {b.shard for b in driver.queues["host2"]} == set()


def test_when_every_shard_has_started_a_dry_node_takes_batches_from_the_back():
    host2 = NodeInfo("id2", "host2", "h2", "10.0.0.2", cpus=4, devices=4)
    batches = plan_batches([20], 1, ["host2"], block=4)
    devices = [DeviceState(Device(DeviceRef(None, 0), None, HOST)),
               DeviceState(Device(DeviceRef(None, 1), None, host2))]
    driver = Driver(devices, batches, submit_prep=None, on_replies=None, batches_per_call=4)
    driver.next_call(devices[1])  # host2 has started its only shard
    call = driver.next_call(devices[0])
    assert [(b.start, b.node) for b in call.batches] == [(16, "host1"), (17, "host1"),
                                                          (18, "host1"), (19, "host1")]
    assert [b.start for b in driver.queues["host2"]] == list(range(4, 16))
