"""A batch-size sweep in the guide's table form: one row per batch size, measured beside the
guide's one-chip x N claim (``sweep.json``, ``sweep.csv``, ``sweep.png``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from .run import RunResult

COLUMNS = ("batch_size", "devices", "measured_fps", "extrapolated_fps", "sum_compute_fps",
           "efficiency", "per_chip_compute_fps", "p50_batch_ms", "p99_batch_ms", "emulated")


def sweep_row(result: RunResult, perf: dict[str, Any]) -> dict[str, Any]:
    """One batch size's card figures; batch latencies over every device's batches."""
    card = perf["card"]
    lat = [s.run_end - s.run_start for s in result.stats if s.n]
    return {
        "batch_size": result.config.batch_size,
        "devices": card["devices"],
        "measured_fps": card["measured_fps"],
        "extrapolated_fps": card["extrapolated_fps"],
        "sum_compute_fps": card["sum_compute_fps"],
        "efficiency": card["efficiency"],
        "per_chip_compute_fps": {d["id"]: d["compute_fps"] for d in perf["devices"]},
        "p50_batch_ms": round(float(np.percentile(lat, 50)) * 1000, 3) if lat else None,
        "p99_batch_ms": round(float(np.percentile(lat, 99)) * 1000, 3) if lat else None,
        "emulated": card["emulated"],
    }


def format_sweep(rows: list[dict[str, Any]]) -> str:
    """The guide's table: batch size, one chip's Interface fps, its x N claim, measured."""
    lines = [f"{'batch':>5} {'one chip fps':>12} {'x N claim':>10} {'measured card':>13} "
             f"{'efficiency':>10} {'p50 ms':>8} {'p99 ms':>8}"]
    for r in rows:
        one = max(r["per_chip_compute_fps"].values(), default=0.0)
        lines.append(
            f"{r['batch_size']:>5} {one:>12.2f} {r['extrapolated_fps']:>10.2f} "
            f"{r['measured_fps']:>13.2f} {r['efficiency']:>10.1%} "
            f"{_ms(r['p50_batch_ms']):>8} {_ms(r['p99_batch_ms']):>8}")
    n = rows[0]["devices"] if rows else 0
    lines.append(f"one chip fps: the best chip's compute-only rate in the concurrent run; x N "
                 f"claim: that x {n} (the guide's method); measured: all images / wall time")
    if any(r["emulated"] for r in rows):
        lines.append("EMULATED 310 latency model: not a hardware measurement")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def write_sweep(rows: list[dict[str, Any]], out: Path) -> str | None:
    """``sweep.json``, ``sweep.csv`` and ``sweep.png`` in ``out``; a note if the plot is
    skipped."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            chips = ";".join(f"{k}={v}" for k, v in r["per_chip_compute_fps"].items())
            w.writerow([chips if c == "per_chip_compute_fps" else r[c] for c in COLUMNS])
    return plot_sweep(rows, out / "sweep.png")


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "sweep.png skipped: matplotlib is not installed (pip install cardrunner[plot])"
    sizes = [r["batch_size"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sizes, [r["measured_fps"] for r in rows], "o-", label="measured card (one run)")
    ax.plot(sizes, [r["extrapolated_fps"] for r in rows], "s--",
            label=f"guide: one chip x {rows[0]['devices']}")
    ax.plot(sizes, [r["sum_compute_fps"] for r in rows], ":", color="grey",
            label="sum of compute-only rates")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("card img/s")
    emulated = " (EMULATED chips)" if any(r["emulated"] for r in rows) else ""
    ax.set_title(f"{rows[0]['devices']} devices: card throughput by batch size{emulated}")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
