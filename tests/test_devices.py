import subprocess
import sys

import pytest

from runner.devices import DeviceRef, DeviceSpecError, parse_devices, resolve_devices


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


def test_resolve_against_available():
    every = resolve_devices(parse_devices("all"), 3, "NPUs")
    assert every == [DeviceRef(None, i) for i in range(3)]
    with pytest.raises(DeviceSpecError, match="only 4 NPUs exist"):
        resolve_devices(parse_devices("2-5"), 4, "NPUs")
    with pytest.raises(DeviceSpecError, match="no NPUs found"):
        resolve_devices(parse_devices("all"), 0, "NPUs")


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
