import os
import subprocess
import sys

import pytest

from runner.devices import (
    DeviceRef,
    DeviceSpecError,
    NodeInfo,
    device_kind,
    parse_devices,
    place_devices,
)


@pytest.mark.parametrize(
    "spec, ids",
    [("0-3", [0, 1, 2, 3]), ("0,2,5", [0, 2, 5]), ("3", [3]), (" 1 - 2 ", [1, 2]),
     ("0-1,4", [0, 1, 4])],
)
def test_parse_plain_specs(spec, ids):
    sel = parse_devices(spec)
    assert not sel.all
    assert [d.index for d in sel.devices] == ids
    assert all(d.node is None for d in sel.devices)


def test_parse_all_and_nodes():
    assert parse_devices("all").all
    sel = parse_devices("node1:0-1,node2:0,3")
    assert sel.devices == (DeviceRef("node1", 0), DeviceRef("node1", 1), DeviceRef("node2", 0),
                           DeviceRef("node2", 3))


@pytest.mark.parametrize("spec", ["", "a", "3-1", "0,,1", "1-", "-1", "0,0", "0-2,1", "x/y:1",
                                  "1.5", "0;1"])
def test_parse_rejects(spec):
    with pytest.raises(DeviceSpecError) as err:
        parse_devices(spec)
    assert "--devices" in str(err.value) and "\n" not in str(err.value)


ONE = [NodeInfo("a" * 56, "vm", "vm", "127.0.0.1", 2, 4)]
TWO = [NodeInfo("a" * 56, "node1", "vm", "127.0.0.1", 2, 4),
       NodeInfo("b" * 56, "node2", "vm", "127.0.0.1", 2, 4)]


def test_place_on_one_host():
    every = place_devices(parse_devices("all"), ONE, "NPUs", "a" * 56)
    assert [r for r, _ in every] == [DeviceRef(None, i) for i in range(4)]
    with pytest.raises(DeviceSpecError, match="only 4 NPUs exist"):
        place_devices(parse_devices("2-5"), ONE, "NPUs", "a" * 56)
    with pytest.raises(DeviceSpecError, match="no NPUs found"):
        place_devices(parse_devices("all"), [NodeInfo("a", "vm", "vm", "x", 2, 0)], "NPUs", "a")


def test_place_on_two_nodes():
    placed = place_devices(parse_devices("node1:0-1,node2:3"), TWO, "NPUs", "a" * 56)
    assert [(str(r), n.name) for r, n in placed] == [
        ("node1:0", "node1"), ("node1:1", "node1"), ("node2:3", "node2")]
    assert len(place_devices(parse_devices("all"), TWO, "NPUs", "x")) == 8
    # Unqualified devices mean the driver's own node when it has devices ...
    assert {n.name for _, n in place_devices(parse_devices("0-3"), TWO, "NPUs", "b" * 56)} == {
        "node2"}
    # ... and need a node name when it has none.
    with pytest.raises(DeviceSpecError, match="name the node"):
        place_devices(parse_devices("0-3"), TWO, "NPUs", "c" * 56)
    with pytest.raises(DeviceSpecError, match="'node3' is not in the cluster"):
        place_devices(parse_devices("node3:0"), TWO, "NPUs", "a" * 56)
    with pytest.raises(DeviceSpecError, match="only 4 NPUs exist on node node2"):
        place_devices(parse_devices("node2:4"), TWO, "NPUs", "a" * 56)
    assert place_devices(parse_devices("bbbbbb:1"), TWO, "NPUs", "a")[0][1].name == "node2"


def test_cli_bad_devices_exits_2_with_one_line(tiny_model, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "runner.evaluate", "--devices", "0-x", "--model", str(tiny_model),
         "--images", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "--devices" in proc.stderr and "Traceback" not in proc.stderr


def test_embedded_ray_listens_on_loopback_only(ray_session):
    nodes = ray_session.nodes()
    assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]
    assert ray_session.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    # No dashboard unless --dashboard: Ray reports no web UI.
    assert ray_session._private.worker.global_worker.node.address_info["webui_url"] == ""


def test_no_npu_at_all_says_so_and_what_to_check():
    kind = device_kind("acl", "cpu")
    bare = [NodeInfo("a", "vm", "vm", "x", 2, 0)]
    with pytest.raises(DeviceSpecError) as err:
        place_devices(parse_devices("0"), bare, kind.label, "a", kind.missing)
    message = str(err.value)
    assert message.startswith("--devices: no Ascend NPUs found: Ray sees none on this host; ")
    assert "npu-smi info" in message and "set_env.sh" in message and "\n" not in message
    assert "0 requested" not in message


def test_acl_on_a_host_without_npus_is_one_line(tmp_path):
    om = tmp_path / "m_bs1.om"
    om.write_bytes(b"not really an om")
    proc = subprocess.run(
        [sys.executable, "-m", "runner.evaluate", "--backend", "acl", "--model", str(om),
         "--pure-infer", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 2
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("evaluate:")]
    assert line.startswith("evaluate: error: --devices: no Ascend NPUs found")
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder behind
