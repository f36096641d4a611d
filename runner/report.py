"""Turn a RunResult into figures, a readable table and the files of ``--out``."""

from __future__ import annotations

import csv
import json
import platform
import socket
from pathlib import Path
from typing import Any

import numpy as np

from .evaluation import RunResult, config_dict, now_iso


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000 if values else None


def perf_summary(result: RunResult) -> dict[str, Any]:
    """Per-device and card figures from one concurrent run (nothing is extrapolated but
    ``extrapolated_fps``, which is what the guide's one-chip x N method would claim)."""
    wall = result.outcome.wall_s
    devices = []
    for info in result.devices:
        mine = [s for s in result.stats if s.device == info["device"]]
        images = sum(s.n for s in mine)
        infer_s = sum(s.infer_s for s in mine)
        busy_s = sum(s.run_end - s.run_start for s in mine)
        lat = [s.run_end - s.run_start for s in mine if s.n]
        devices.append({
            "id": info["device"],
            "host": info["host"],
            "provider": info["provider"],
            "emulated": info["emulated"],
            "images": images,
            "batches": len(mine),
            "busy_s": round(busy_s, 4),
            "infer_s": round(infer_s, 4),
            "convert_s": round(sum(s.convert_s for s in mine), 4),
            "compute_fps": round(images / infer_s, 3) if infer_s else 0.0,
            "e2e_fps": round(images / wall, 3) if wall else 0.0,
            "busy_share": round(busy_s / wall, 4) if wall else 0.0,
            "p50_batch_ms": _pct(lat, 50),
            "p99_batch_ms": _pct(lat, 99),
            "failed_at_s": info.get("failed_at_s"),
            "failure": info.get("failure", ""),
            "moved_batches": info.get("moved_batches", 0),
        })
    images = sum(d["images"] for d in devices)
    compute = [d["compute_fps"] for d in devices if d["images"]]
    card = {
        "devices": len(devices),
        "images": images,
        "wall_s": round(wall, 4),
        "measured_fps": round(images / wall, 3) if wall else 0.0,
        "extrapolated_fps": round(max(compute) * len(devices), 3) if compute else 0.0,
        "sum_compute_fps": round(sum(compute), 3),
        "efficiency": round(images / wall / sum(compute), 4) if wall and compute else 0.0,
        "emulated": any(d["emulated"] for d in devices),
    }
    cfg = result.config
    return {
        "created": now_iso(),
        "mode": "pure-infer" if cfg.pure_infer else "dataset",
        "devices": devices,
        "card": card,
        "environment": {
            "backend": result.devices[0]["backend"],
            "provider": result.devices[0]["provider"],
            "batch_size": cfg.batch_size,
            "recipe": result.recipe,
            "model": cfg.model,
            "model_sha256": result.model_sha256,
            "model_metadata": result.model_meta,
            "host": socket.gethostname(),
            "python": platform.python_version(),
            "versions": _versions(),
        },
        "config": config_dict(cfg),
    }


def _versions() -> dict[str, str]:
    import onnxruntime
    import PIL
    import ray

    return {"ray": ray.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__}


def accuracy_summary(result: RunResult) -> dict[str, Any]:
    acc = result.accuracy()
    scored = int(result.scored.size)
    out: dict[str, Any] = {
        "images": result.num_images,
        "scored": scored,
        "not_scored": len(result.issues),
        "resumed_images": result.resumed_images,
        "cache": result.cache,
    }
    if acc is not None:
        out.update({f"top{k}": acc.percent(k) for k in range(1, len(acc.topk) + 1)})
    return out


def format_table(perf: dict[str, Any], accuracy: dict[str, Any] | None) -> str:
    card = perf["card"]
    tag = "  [EMULATED 310 latency model: not a hardware measurement]" if card["emulated"] else ""
    lines = [
        f"{'device':>8} {'host':>12} {'images':>7} {'batches':>7} {'compute fps':>11} "
        f"{'e2e fps':>8} {'busy':>6} {'p50 ms':>7} {'p99 ms':>7}"
    ]
    for d in perf["devices"]:
        p50 = f"{d['p50_batch_ms']:.1f}" if d["p50_batch_ms"] is not None else "-"
        p99 = f"{d['p99_batch_ms']:.1f}" if d["p99_batch_ms"] is not None else "-"
        lines.append(
            f"{d['id']:>8} {d['host'][:12]:>12} {d['images']:>7} {d['batches']:>7} "
            f"{d['compute_fps']:>11.2f} {d['e2e_fps']:>8.2f} {d['busy_share']:>6.1%} "
            f"{p50:>7} {p99:>7}"
            + (f"  FAILED at {d['failed_at_s']:.1f}s: {d['failure']}" if d["failed_at_s"] else "")
        )
    lines += [
        f"card: {card['devices']} devices, {card['images']} images in {card['wall_s']:.2f} s"
        f" -> measured {card['measured_fps']:.2f} img/s{tag}",
        f"      guide-style one-chip x {card['devices']}: {card['extrapolated_fps']:.2f} img/s;"
        f" efficiency (measured / sum of compute-only): {card['efficiency']:.1%}",
    ]
    if accuracy and "top1" in accuracy:
        lines.append(
            f"accuracy: top1 {accuracy['top1']}%  top5 {accuracy['top5']}%  over "
            f"{accuracy['scored']} scored images ({accuracy['not_scored']} not scored)"
        )
    return "\n".join(lines)


def write_outputs(result: RunResult, out: Path) -> dict[str, Any]:
    """Write result.json, perf.json, predictions.csv and errors.csv; return perf."""
    perf = perf_summary(result)
    acc = result.accuracy()
    perf["accuracy"] = accuracy_summary(result)
    if acc is not None:
        (out / "result.json").write_text(acc.to_guide_json())
    (out / "perf.json").write_text(json.dumps(perf, indent=2) + "\n")
    if result.names:
        with open(out / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "label"] + [f"top{k}" for k in range(1, 6)])
            for i in result.scored:
                label = int(result.labels[i]) if result.labels is not None else ""
                w.writerow([result.names[i], label, *result.top[i].tolist()])
    with open(out / "errors.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "index", "reason"])
        for issue in result.issues:
            w.writerow([issue.image, issue.index, issue.reason])
    return perf
