"""Runs on every kind of --images give the same scores, image by image; on a real 2-node
Ray cluster (loopback, ray.cluster_utils) each node decodes only its own shards until it runs
out of work."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_tar, needs_val_227
from test_sources import s3, val227_forms  # noqa: F401 - fixtures shared with the listing tests

from runner import source_tar
from runner.config import RunConfig
from runner.evaluation import run_evaluation
from runner.prep import main as prep_main
from runner.report import write_outputs
from runner.shard import main as shard_main

ROOT = Path(__file__).resolve().parents[1]


def rows(out: Path) -> dict[str, str]:
    """predictions.csv as image -> the rest of its row."""
    lines = (out / "predictions.csv").read_text().splitlines()[1:]
    return dict(line.split(",", 1) for line in lines)


#: The ImageFolder copy lists class by class, so its first images are others; its listing
#: and bytes are checked against the folder's in tests/test_sources.py.
FORMS = ["folder", "tar", "shards dir", "shards on s3"]


@needs_val_227
def test_every_source_scores_the_same_images_alike(ray_session, val227_forms, tmp_path):  # noqa: F811
    runs = {}
    for form in FORMS:
        images, labels = val227_forms[form]
        out = tmp_path / form.replace(" ", "_")
        cfg = RunConfig(backend="emulated", images=images, labels=labels, limit=256,
                        devices="0-3", batch_size=16, out=str(out), progress=False,
                        emulated_latency_ms=2.0)
        result = run_evaluation(cfg)
        perf = write_outputs(result, out)
        assert perf["accuracy"]["scored"] == 256 and perf["accuracy"]["errors"] == 0, form
        runs[form] = (out, perf)
    ref_out, _ = runs["folder"]
    reference = rows(ref_out)
    for form, (out, perf) in runs.items():
        # The emulated chip's logits are a function of each crop's bytes: the same rows mean
        # the same bytes were decoded into the same crops, whatever held them.
        assert rows(out) == reference, form
        assert (out / "result.json").read_text() == (ref_out / "result.json").read_text()
        assert perf["accuracy"]["data"].startswith(form.split()[0])
    assert all(s["shard"].startswith("s3://") for s in runs["shards on s3"][1]["shards"])


CLUSTER = r"""
import json, sys
from pathlib import Path
from runner.devices import EMULATED_RESOURCE
from runner.ray_start import bind_ray_to_loopback
bind_ray_to_loopback()
import ray
from ray.cluster_utils import Cluster
from runner.config import RunConfig
from runner.evaluation import run_evaluation
from runner.report import write_outputs

shards, out = sys.argv[1:3]
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "resources": {EMULATED_RESOURCE: 2}, "labels": {"cardrunner.node": "node1"}})
cluster.add_node(num_cpus=1, resources={EMULATED_RESOURCE: 2},
                 labels={"cardrunner.node": "node2"})
try:
    cfg = RunConfig(backend="emulated", address=cluster.address, devices="node1:0-1,node2:0-1",
                    images=shards, batch_size=2, out=out, progress=False,
                    emulated_latency_ms=10.0)
    result = run_evaluation(cfg)
    perf = write_outputs(result, Path(out))
    print(json.dumps({"perf": perf, "devices": result.devices,
                      "addresses": sorted({n["NodeManagerAddress"] for n in ray.nodes()}),
                      "by_label": {n["Labels"]["cardrunner.node"]: n["NodeID"]
                                   for n in ray.nodes()}}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_each_node_decodes_its_own_shards_until_it_runs_dry(images64, tmp_path):
    folder, labels = images64
    shards = tmp_path / "shards"
    assert shard_main([str(folder), str(shards), "--labels", str(labels),
                       "--shard-size", "8"]) == 0  # 8 shards of 8 images
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", CLUSTER, str(shards), str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(line for line in proc.stdout.splitlines()
                             if line.startswith('{"perf"')))
    assert report["addresses"] == ["127.0.0.1"]  # both nodes on loopback
    on = {}
    for d in report["devices"]:  # each device actor runs on the node carrying its label
        on.setdefault(d["node"], set()).add(d["node_id"])
    assert on == {name: {node_id} for name, node_id in report["by_label"].items()}
    perf = report["perf"]
    hosts = {h["name"]: h for h in perf["hosts"]}
    assert set(hosts) == {"node1", "node2"} and sum(h["images"] for h in hosts.values()) == 64
    assert all(h["images"] > 0 and h["measured_fps"] > 0 for h in hosts.values())
    assert {c["name"] for c in perf["cards"]} == {"node1/card0", "node2/card0"}
    homes = perf["shards"]
    assert sorted(h["node"] for h in homes) == ["node1"] * 4 + ["node2"] * 4  # 2 devices each
    assert all(h["images"] == 8 for h in homes)
    moved = {b: m["to"] for m in perf["moves"] for b in m["batches"]}
    records = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()[1:]]
    assert sorted(i for r in records for i in r["indices"]) == list(range(64))
    home_of = {}  # image index -> its shard's home node (shards hold images in order)
    for shard, home in enumerate(homes):
        home_of.update({i: home["node"] for i in range(8 * shard, 8 * shard + 8)})
    for r in records:
        home = home_of[r["indices"][0]]
        # Decoded on its shard's home node, unless a node that had run dry took it over.
        assert r["decoded_on"] == moved.get(r["batch"], home), r
    local = sum(r["decoded_on"] == home_of[r["indices"][0]] for r in records)
    assert local >= 0.75 * len(records), f"{local} of {len(records)} batches decoded at home"


def test_broken_shards_are_named_and_the_rest_of_them_scored(ray_session, small_shards,
                                                             tmp_path):
    images, shards = small_shards  # two shards of 4 labelled images
    tar = shards / "shard-000000.tar"
    third = source_tar.scan_tar(str(tar), tar.stat().st_size).entries[4]  # its 3rd image
    with open(tar, "r+b") as f:
        f.truncate(third.offset + third.size // 2)
    good = (images / "ILSVRC2012_val_00000001.JPEG").read_bytes()
    make_tar(shards / "shard-000002.tar", [("ILSVRC2012_val_00000009.cls", b"7"),
                                           ("ILSVRC2012_val_00000010.JPEG", good),
                                           ("ILSVRC2012_val_00000010.cls", b"3")])
    out = tmp_path / "run"
    result = run_evaluation(RunConfig(backend="emulated", images=str(shards), devices="0-1",
                                      batch_size=2, out=str(out), progress=False,
                                      emulated_latency_ms=1.0))
    perf = write_outputs(result, out)
    errors = {row.split(",", 1)[0]: row for row in
              (out / "errors.csv").read_text().splitlines()[1:]}
    assert "truncated tar member: shard-000000.tar:ILSVRC2012_val_00000003.JPEG" in errors[
        "ILSVRC2012_val_00000003.JPEG"]
    assert "lost: shard shard-000000.tar" in errors["ILSVRC2012_val_00000004.JPEG"]
    assert "has no image" in errors["ILSVRC2012_val_00000009"]
    scored = sorted(rows(out))
    assert scored == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2, 5, 6, 7, 8, 10)]
    assert perf["accuracy"]["scored"] == 7 and perf["accuracy"]["errors"] == len(errors)


def test_prep_writes_the_same_bin_files_from_shards_as_from_the_folder(small_shards, tmp_path):
    images, shards = small_shards
    assert prep_main([str(images), str(tmp_path / "from_folder"), "--workers", "1"]) == 0
    assert prep_main([str(shards), str(tmp_path / "from_shards"), "--workers", "1"]) == 0
    bins = sorted(p.name for p in (tmp_path / "from_folder").glob("*.bin"))
    assert len(bins) == 8
    assert bins == sorted(p.name for p in (tmp_path / "from_shards").glob("*.bin"))
    for name in bins:
        assert (tmp_path / "from_shards" / name).read_bytes() == (
            tmp_path / "from_folder" / name).read_bytes()
