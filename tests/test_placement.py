"""Ray placement: one actor per chip, the resource each backend asks for, backend auto."""

import os

import pytest
import ray

from runner.actors import DeviceWorker
from runner.backends import BackendOptions
from runner.binding import reservation_notes
from runner.config import RunConfig
from runner.devices import EMULATED_RESOURCE, device_actor_options, device_kind
from runner.evaluation import _resolve_backend


def test_four_fake_npus_give_four_actors_each_its_own_chip(ray_session):
    class ChipProbe:  # defined here so Ray ships it by value to the workers
        def chip(self) -> dict:
            return {"visible": os.environ.get("ASCEND_RT_VISIBLE_DEVICES"),
                    "npu_ids": ray.get_runtime_context().get_accelerator_ids().get("NPU")}

    opts = device_actor_options(device_kind("acl", "cpu"))
    assert opts["resources"] == {"NPU": 1} and opts["num_cpus"] == 0
    actors = [ray.remote(ChipProbe).options(**opts).remote() for _ in range(4)]
    chips = ray.get([a.chip.remote() for a in actors])
    visible = sorted(c["visible"] for c in chips)
    assert visible == ["0", "1", "2", "3"]  # Ray set ASCEND_RT_VISIBLE_DEVICES per actor
    assert sorted(c["npu_ids"][0] for c in chips) == ["0", "1", "2", "3"]
    for a in actors:
        ray.kill(a)


def test_each_backend_asks_for_its_own_resource():
    def opts(backend, provider):
        return device_actor_options(device_kind(backend, provider))

    assert opts("onnxruntime", "cuda")["num_gpus"] == 1
    assert opts("onnxruntime", "cann")["resources"] == {"NPU": 1}
    assert opts("emulated", "cpu")["resources"] == {EMULATED_RESOURCE: 1}
    cpu = opts("onnxruntime", "cpu")
    assert cpu["num_cpus"] == 0 and "resources" not in cpu and cpu["max_concurrency"] == 2
    assert device_kind("acl", "cpu").visible_env == "ASCEND_RT_VISIBLE_DEVICES"
    assert device_kind("onnxruntime", "cuda").visible_env == "CUDA_VISIBLE_DEVICES"
    assert device_kind("onnxruntime", "cpu").visible_env is None


def test_backend_auto_picks_acl_when_ray_sees_npus(ray_session):
    assert _resolve_backend(RunConfig(backend="auto")) == ("acl", "cpu")


@pytest.mark.parametrize("bind", [False, True])
def test_device_workers_on_fake_npus_each_get_a_distinct_chip(ray_session, bind):
    """--devices all keeps Ray's assignment; named devices bind the chip the user named. Either
    way the runtime sees that one chip, and a node's actors reserve exactly the chips driven."""

    class Probe(DeviceWorker):  # defined here so Ray ships it by value to the workers
        def seen(self) -> dict:
            return {**self.info, "visible": os.environ.get("ASCEND_RT_VISIBLE_DEVICES")}

    kind = device_kind("acl", "cpu")
    worker = ray.remote(Probe).options(**device_actor_options(kind))
    actors = [worker.remote(backend="emulated", model=None, device=str(i), device_id=i,
                            options=BackendOptions(), recipe="huawei",
                            visible_env=kind.visible_env, bind_chip=bind) for i in range(4)]
    infos = ray.get([a.seen.remote() for a in actors])
    assert sorted(i["device_id"] for i in infos) == [0, 1, 2, 3]
    assert len({i["ray_assigned"] for i in infos}) == 4  # Ray gave each its own NPU
    for i in infos:
        assert i["visible"] == i["chip"] == str(i["device_id"]) == str(i["node_index"])
    if bind:
        assert [i["device_id"] for i in infos] == [0, 1, 2, 3]
    else:
        assert all(i["device_id"] == int(i["ray_assigned"]) for i in infos)
    assert reservation_notes(infos) == []  # all 4 NPUs held, in whatever order
    for a in actors:
        ray.kill(a)
