"""Which chip a device actor drives (issue 17 item 4): runner.binding against fake node
environments, and DeviceWorker on a real Ray node whose visible-devices variables were set
before Ray started (remapped NPUs, GPU UUIDs), as ``CUDA_VISIBLE_DEVICES=1,3 ray start`` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from runner.binding import Binding, BindingError, bind, reservation_notes

NPU, CUDA = "ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"


def test_named_index_is_the_nodes_nth_chip_not_the_physical_number():
    env = {NPU: "3"}  # what Ray set for this actor on a node started with =1,3
    assert bind(0, NPU, True, env, ["3"], ["1", "3"]) == Binding(0, "1", 1, "3")
    assert env[NPU] == "1"
    env = {NPU: "1"}
    assert bind(1, NPU, True, env, ["1"], ["1", "3"]) == Binding(1, "3", 3, "1")
    assert env[NPU] == "3"


def test_node_without_a_list_numbers_its_chips_from_zero():
    env: dict[str, str] = {NPU: "0"}
    assert bind(2, NPU, True, env, ["0"], None) == Binding(2, "2", 2, "0")
    assert env == {NPU: "2"}


def test_named_index_beyond_the_nodes_list_is_refused():
    with pytest.raises(BindingError, match=r"device 2 requested but this node lists 2 chip"):
        bind(2, NPU, True, {}, ["1"], ["1", "3"])


def test_devices_all_drives_the_chip_ray_reserved():
    env = {NPU: "3"}
    assert bind(0, NPU, False, env, ["3"], ["1", "3"]) == Binding(1, "3", 3, "3")
    assert env[NPU] == "3"
    assert bind(0, NPU, False, {}, ["2"], None) == Binding(2, "2", 2, "2")


def test_gpu_uuids_are_bound_by_narrowing_to_the_uuid():
    """Ray hands out the node's own entries, here UUIDs, which int() cannot parse."""
    node = ["GPU-8f2c1e", "GPU-2c9a07"]
    env = {CUDA: "GPU-2c9a07"}
    assert bind(0, CUDA, False, env, ["GPU-2c9a07"], node) == Binding(1, "GPU-2c9a07", 1,
                                                                       "GPU-2c9a07")
    assert env[CUDA] == "GPU-2c9a07"
    env = {CUDA: "GPU-8f2c1e"}
    assert bind(1, CUDA, True, env, ["GPU-8f2c1e"], node).chip == "GPU-2c9a07"
    assert env[CUDA] == "GPU-2c9a07"


def test_ray_told_not_to_set_the_variable_still_leaves_one_chip_visible():
    """RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES: the actor inherits the node's list."""
    env = {NPU: "1,3"}
    assert bind(0, NPU, False, env, ["3"], ["1", "3"]).chip == "3"
    assert env[NPU] == "3"


def test_spaces_in_the_nodes_list_are_not_passed_to_cann():
    """Ray splits "1, 3" on commas only; CANN would read " 3" as no chip at all."""
    env: dict[str, str] = {}
    assert bind(1, NPU, True, env, [" 3"], ["1", " 3"]) == Binding(1, "3", 3, "3")
    assert env[NPU] == "3"


def test_more_than_one_id_for_one_actor_is_refused():
    with pytest.raises(BindingError, match=r"ids \['4', '5'\]"):
        bind(0, NPU, False, {}, ["4", "5"], ["4", "5"])


def test_cpu_slices_bind_nothing():
    env: dict[str, str] = {}
    assert bind(5, None, True, env, [], None) == Binding(5, None, 5, None)
    assert env == {}


def info(node: str, chip: str, reserved: str) -> dict:
    return {"node_id": node, "host": "h", "chip": chip, "ray_assigned": reserved}


def test_reservation_notes_only_when_ray_reserved_other_chips_than_driven():
    swapped = [info("n1", "0", "1"), info("n1", "1", "0")]
    assert reservation_notes(swapped) == []
    cpu = [{"node_id": "n1", "host": "h", "chip": None, "ray_assigned": None}]
    assert reservation_notes(cpu) == []
    gap = [info("n1", "2", "0"), info("n1", "3", "1"), info("n2", "0", "0")]
    (note,) = reservation_notes(gap)
    assert note.startswith("h (node n1)") and "drives chips 2, 3" in note
    assert "reserved 0, 1" in note and "give chips 2, 3 to other work" in note


# --------------------------------------------------------------------------- a real Ray node

NODE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import ray
    from runner.actors import DeviceWorker
    from runner.backends import BackendOptions

    class Probe(DeviceWorker):
        def seen(self, variable):
            return {**self.info, "visible": os.environ.get(variable)}

    ray.init(num_gpus=2, resources={"NPU": 2}, include_dashboard=False, log_to_driver=False)
    out = {}
    for name, variable, opts in [("gpu", "CUDA_VISIBLE_DEVICES", {"num_gpus": 1}),
                                 ("npu", "ASCEND_RT_VISIBLE_DEVICES", {"resources": {"NPU": 1}})]:
        for named in (False, True):
            actors = [ray.remote(Probe).options(num_cpus=0, **opts).remote(
                backend="emulated", model=None, device=str(i), device_id=i,
                options=BackendOptions(), recipe="huawei", visible_env=variable,
                bind_chip=named) for i in range(2)]
            try:
                out[f"{name}-{'named' if named else 'all'}"] = ray.get(
                    [a.seen.remote(variable) for a in actors])
            except Exception as exc:
                out[f"{name}-{'named' if named else 'all'}"] = repr(exc).splitlines()[0]
            for a in actors:
                ray.kill(a)
    ray.shutdown()
    print("RESULT " + json.dumps(out, default=str))
""")


@pytest.fixture(scope="module")
def remapped_node() -> dict:
    """A Ray node started with GPUs named by UUID and NPUs 1 and 3 of the host visible."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           CUDA: "GPU-8f2c1e,GPU-2c9a07", NPU: "1,3"}
    done = subprocess.run([sys.executable, "-c", NODE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=240)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def by_device(infos: list[dict]) -> dict[str, dict]:
    assert isinstance(infos, list), infos  # else: the actors failed to start (the message)
    return {i["device"]: i for i in infos}


def test_named_npus_on_a_remapped_node_drive_the_nodes_chips(remapped_node):
    """--devices 0-1 on `ASCEND_RT_VISIBLE_DEVICES=1,3 ray start`: chips 1 and 3, not 0 and 1."""
    got = by_device(remapped_node["npu-named"])
    assert [got[d]["visible"] for d in "01"] == ["1", "3"]
    assert [got[d]["device_id"] for d in "01"] == [1, 3]
    assert sorted(got[d]["ray_assigned"] for d in "01") == ["1", "3"]
    assert reservation_notes(got.values()) == []  # Ray reserved the very chips driven


def test_devices_all_on_a_remapped_node_keeps_rays_chip(remapped_node):
    got = by_device(remapped_node["npu-all"])
    for i in got.values():
        assert i["visible"] == i["ray_assigned"] == i["chip"] == str(i["device_id"])
    assert sorted(i["node_index"] for i in got.values()) == [0, 1]


def test_gpu_uuids_from_ray_are_driven_not_parsed_as_numbers(remapped_node):
    """Before: int("GPU-8f2c1e") raised in DeviceWorker.__init__ and no actor started."""
    got = by_device(remapped_node["gpu-all"])
    assert sorted(i["visible"] for i in got.values()) == ["GPU-2c9a07", "GPU-8f2c1e"]
    for i in got.values():
        assert i["visible"] == i["ray_assigned"] == i["chip"]
        assert i["device_id"] == i["node_index"] == ["GPU-8f2c1e", "GPU-2c9a07"].index(i["chip"])
    named = by_device(remapped_node["gpu-named"])
    assert [named[d]["visible"] for d in "01"] == ["GPU-8f2c1e", "GPU-2c9a07"]
