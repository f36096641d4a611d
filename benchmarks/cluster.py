"""EMULATED 310 chips over 1 and 2 Ray nodes (a local loopback cluster), pure-infer mode.

4 chips on one node and 2 nodes x 4 chips, at bs1 and bs16: measured card img/s from one
concurrent run, the ideal (the sum of the chips' compute-only rates in that run), efficiency
= measured / ideal (``card.efficiency``), and the driver's CPU share.  Each run lasts about
``--seconds`` of device time.  Figures are emulated.

    python benchmarks/cluster.py [--seconds 3] [--batch-sizes 1,16]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

import common

from runner.devices import EMULATED_RESOURCE
from runner.ray_start import bind_ray_to_loopback

bind_ray_to_loopback()

import ray  # noqa: E402 - after the loopback binding
from ray.cluster_utils import Cluster  # noqa: E402

from runner.backends.emulated import batch_latency_ms  # noqa: E402
from runner.config import RunConfig  # noqa: E402
from runner.evaluation import run_evaluation  # noqa: E402
from runner.report import perf_summary  # noqa: E402

LAYOUTS = [(1, 4), (2, 4)]  # (nodes, chips per node)


def measure(nodes: int, chips: int, batch_size: int, seconds: float) -> dict:
    rounds = max(1, math.ceil(seconds * 1000 / batch_latency_ms(batch_size)))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {EMULATED_RESOURCE: chips},
        "labels": {"cardrunner.node": "node1"}})
    for n in range(2, nodes + 1):
        cluster.add_node(num_cpus=1, resources={EMULATED_RESOURCE: chips},
                         labels={"cardrunner.node": f"node{n}"})
    try:
        spec = ",".join(f"node{n}:0-{chips - 1}" for n in range(1, nodes + 1))
        with tempfile.TemporaryDirectory() as out:
            cfg = RunConfig(backend="emulated", address=cluster.address, devices=spec,
                            batch_size=batch_size, pure_infer=True, rounds=rounds, out=out,
                            progress=False)
            perf = perf_summary(run_evaluation(cfg))
    finally:
        ray.shutdown()
        cluster.shutdown()
    card = perf["card"]
    return {"nodes": nodes, "chips": card["devices"], "batch": batch_size,
            "measured_fps": card["measured_fps"], "ideal_fps": card["sum_compute_fps"],
            "efficiency": card["efficiency"], "driver_share": perf["driver"]["wall_share"],
            "per_host_fps": {h["name"]: h["measured_fps"] for h in perf["hosts"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="device time per run")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--json", default="benchmarks/results/cluster.json")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    rows = [measure(n, c, int(bs), args.seconds) for bs in args.batch_sizes.split(",")
            for n, c in LAYOUTS]
    print("EMULATED Ascend 310 chips on a local loopback Ray cluster (not hardware)")
    common.print_table(rows, ["nodes", "chips", "batch", "measured_fps", "ideal_fps",
                              "efficiency", "driver_share"])
    common.write_json(args.json, {"benchmark": "cluster", "emulated": True,
                                  "seconds": args.seconds, "rows": rows})


if __name__ == "__main__":
    main()
