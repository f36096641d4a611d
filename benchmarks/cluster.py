"""EMULATED 310 chips over 1 and 2 Ray nodes (a local loopback cluster), pure-infer mode.

4 and 8 chips, bs16: measured card img/s from one concurrent run, the ideal (the sum of the
chips' compute-only rates in that run), efficiency = measured / ideal (``card.efficiency``).
Figures are emulated.

    python benchmarks/cluster.py [--rounds 50] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import common

from runner.pipeline import EMULATED_RESOURCE, bind_ray_to_loopback

bind_ray_to_loopback()

import ray  # noqa: E402 - after the loopback binding
from ray.cluster_utils import Cluster  # noqa: E402

from runner.config import RunConfig  # noqa: E402
from runner.evaluation import run_evaluation  # noqa: E402
from runner.report import perf_summary  # noqa: E402

LAYOUTS = [(1, 4), (2, 2), (1, 8), (2, 4)]  # (nodes, chips per node)


def measure(nodes: int, chips: int, batch_size: int, rounds: int) -> dict:
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
            "efficiency": card["efficiency"],
            "per_host_fps": {h["name"]: h["measured_fps"] for h in perf["hosts"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=50, help="batches per chip")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", default="benchmarks/results/cluster.json")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    rows = [measure(n, c, args.batch_size, args.rounds) for n, c in LAYOUTS]
    print("EMULATED Ascend 310 chips on a local loopback Ray cluster (not hardware)")
    common.print_table(rows, ["nodes", "chips", "batch", "measured_fps", "ideal_fps",
                              "efficiency"])
    common.write_json(args.json, {"benchmark": "cluster", "emulated": True,
                                  "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
