"""Card scaling with EMULATED Ascend 310 chips (latency model, not hardware) in pure-infer mode.

For 1, 2 and 4 chips at bs1 and bs16: measured card img/s from one concurrent run, the
ideal (the sum of the chips' compute-only rates in that run, i.e. chips x one chip's rate),
efficiency (``perf.json`` ``card.efficiency`` = measured / ideal) and speed-up over the
one-chip run.  Every batch travels driver -> device actor like real data.

    python benchmarks/emulated_card.py [--rounds 50]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import common

from runner.config import RunConfig
from runner.evaluation import run_evaluation
from runner.pipeline import EMULATED_RESOURCE, start_ray
from runner.report import perf_summary


def run(chips: int, batch_size: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(backend="emulated", devices=f"0-{chips - 1}", batch_size=batch_size,
                        pure_infer=True, rounds=rounds, out=out, progress=False)
        perf = perf_summary(run_evaluation(cfg))
    return perf["card"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=50, help="batches per chip")
    p.add_argument("--chips", default="1,2,4")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--json", default="benchmarks/results/emulated_card.json")
    args = p.parse_args()
    chips = [int(c) for c in args.chips.split(",")]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start_ray(None, {EMULATED_RESOURCE: max(chips)})
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        one = None
        for n in chips:
            card = run(n, bs, args.rounds)
            one = one or card
            rows.append({"batch": bs, "chips": n, "measured_fps": card["measured_fps"],
                         "ideal_fps": card["sum_compute_fps"], "efficiency": card["efficiency"],
                         "speedup": card["measured_fps"] / one["measured_fps"]})
    print("EMULATED Ascend 310 chips (latency model from the guide's figures; not hardware)")
    common.print_table(rows, ["batch", "chips", "measured_fps", "ideal_fps", "efficiency",
                              "speedup"])
    common.write_json(args.json, {"benchmark": "emulated_card", "emulated": True,
                                  "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
