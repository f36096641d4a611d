"""Card scaling with EMULATED Ascend 310 chips (latency model, not hardware) in pure-infer mode.

For 1, 4 and 8 chips of one node at batch sizes 1, 4, 8, 16 and 32: measured card img/s from
one concurrent run, the ideal (the sum of the chips' compute-only rates in that run, i.e.
chips x one chip's rate), efficiency (``perf.json`` ``card.efficiency`` = measured / ideal),
speed-up over the one-chip run, and the driver's CPU share.  Every batch travels driver ->
device actor like real data.  Each run lasts about ``--seconds`` of device time (rounds =
seconds / the chip's batch latency), so that start-up ramps weigh the same at every size.
``--baseline`` adds runs with one batch per device call (the design before calls were sized
by device time) beside the default ones, where the default chose more than one.

    python benchmarks/emulated_card.py [--seconds 3] [--baseline]
"""

from __future__ import annotations

import argparse
import math
import tempfile

import common

from runner.backends.emulated import batch_latency_ms
from runner.config import RunConfig
from runner.devices import EMULATED_RESOURCE
from runner.evaluation import Evaluator
from runner.ray_start import start_ray
from runner.report import perf_summary


def run(evaluator: Evaluator, chips: int, batch_size: int, seconds: float,
        per_call: int | None) -> dict:
    rounds = max(1, math.ceil(seconds * 1000 / batch_latency_ms(batch_size)))
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(backend="emulated", devices=f"0-{chips - 1}", batch_size=batch_size,
                        pure_infer=True, rounds=rounds, out=out, progress=False,
                        batches_per_call=per_call)
        perf = perf_summary(evaluator.run(cfg, keep_devices=True))
    return {**perf["card"], "rounds": rounds, "per_call": perf["driver"]["batches_per_call"],
            "driver_share": perf["driver"]["wall_share"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="device time per run")
    p.add_argument("--chips", default="1,4,8")
    p.add_argument("--batch-sizes", default="1,4,8,16,32")
    p.add_argument("--baseline", action="store_true",
                   help="also run one batch per call, side by side")
    p.add_argument("--json", default="benchmarks/results/emulated_card.json")
    args = p.parse_args()
    chips = [int(c) for c in args.chips.split(",")]
    start_ray(None, {EMULATED_RESOURCE: max(chips)})
    rows = []
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    with Evaluator() as evaluator:  # actors kept across batch sizes, as a sweep does
        for n in chips:
            for bs in sizes:
                for per_call in ([None, 1] if args.baseline else [None]):
                    if per_call == 1 and rows[-1]["per_call"] == 1:
                        continue  # the call size chosen was one batch already
                    card = run(evaluator, n, bs, args.seconds, per_call)
                    one = next((r for r in rows if (r["batch"], r["chips"], r["per_call"]) == (
                        bs, chips[0], card["per_call"])), None)
                    rows.append({
                        "batch": bs, "chips": n, "per_call": card["per_call"],
                        "rounds": card["rounds"], "measured_fps": card["measured_fps"],
                        "ideal_fps": card["sum_compute_fps"], "efficiency": card["efficiency"],
                        "speedup": card["measured_fps"] / (one or card)["measured_fps"],
                        "driver_share": card["driver_share"]})
    rows.sort(key=lambda r: (r["batch"], r["chips"], r["per_call"]))
    print("EMULATED Ascend 310 chips (latency model from the guide's figures; not hardware)")
    common.print_table(rows, ["batch", "chips", "per_call", "rounds", "measured_fps",
                              "ideal_fps", "efficiency", "speedup", "driver_share"])
    common.write_json(args.json, {"benchmark": "emulated_card", "emulated": True,
                                  "seconds": args.seconds, "rows": rows})


if __name__ == "__main__":
    main()
