"""A real 2-node Ray cluster on loopback (ray.cluster_utils), 4 emulated chips per node."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in its own process: the test session already drives a single-node Ray.
SCRIPT = r"""
import json, sys
from runner.devices import EMULATED_RESOURCE
from runner.ray_start import bind_ray_to_loopback
bind_ray_to_loopback()
import ray
from ray.cluster_utils import Cluster
from runner.config import RunConfig
from runner.evaluation import run_evaluation
from runner.report import write_outputs

images, labels, out = sys.argv[1:4]
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "resources": {EMULATED_RESOURCE: 4}, "labels": {"cardrunner.node": "node1"}})
cluster.add_node(num_cpus=1, resources={EMULATED_RESOURCE: 4},
                 labels={"cardrunner.node": "node2"})
try:
    cfg = RunConfig(backend="emulated", address=cluster.address, devices="node1:0-3,node2:0-3",
                    images=images, labels=labels, batch_size=2, out=out, progress=False,
                    emulated_latency_ms=10.0)
    result = run_evaluation(cfg)
    perf = write_outputs(result, __import__("pathlib").Path(out))
    addresses = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
    by_label = {n["Labels"]["cardrunner.node"]: n["NodeID"] for n in ray.nodes()}
    print(json.dumps({"devices": result.devices, "perf": perf, "addresses": addresses,
                      "by_label": by_label,
                      "top": result.top.tolist(), "names": result.names}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_two_nodes_eight_chips_every_image_once(images64, tmp_path):
    folder, labels = images64
    out = tmp_path / "run"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(labels), str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["addresses"] == ["127.0.0.1"]  # both nodes on loopback

    devices = report["devices"]
    assert len(devices) == 8
    node_ids = {}
    for d in devices:  # each actor runs on the Ray node that carries its label
        node_ids.setdefault(d["node"], set()).add(d["node_id"])
    assert node_ids == {name: {node_id} for name, node_id in report["by_label"].items()}
    assert node_ids["node1"] != node_ids["node2"]
    assert sorted(d["device"] for d in devices) == [f"node{n}:{i}" for n in (1, 2)
                                                     for i in range(4)]

    lines = (out / "journal.jsonl").read_text().splitlines()[1:]
    seen = sorted(i for line in lines for i in json.loads(line)["indices"])
    assert seen == list(range(64))  # every image exactly once
    # Images 0-31 are decoded on node1, 32-63 on node2; a device takes its own host's
    # batches first and another host's only when its own queue has run dry.
    records = [json.loads(line) for line in lines]
    local = [r["device"].split(":")[0] == ("node1" if max(r["indices"]) < 32 else "node2")
             for r in records]
    assert all(min(r["indices"]) // 32 == max(r["indices"]) // 32 for r in records)
    assert sum(local) >= 0.75 * len(records), f"{sum(local)} of {len(records)} batches local"

    perf = report["perf"]
    hosts = {h["name"]: h for h in perf["hosts"]}
    assert set(hosts) == {"node1", "node2"}
    assert sum(h["images"] for h in hosts.values()) == 64
    assert all(h["images"] > 0 and h["measured_fps"] > 0 for h in hosts.values())
    assert {c["name"] for c in perf["cards"]} == {"node1/card0", "node2/card0"}
