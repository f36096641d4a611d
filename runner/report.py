"""Turn a RunResult into figures, a readable table and the files of ``--out``."""

from __future__ import annotations

import csv
import json
import platform
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .binding import reservation_notes
from .classes import class_table, short_name
from .errors import short_reason
from .metrics import hit_ranks, label_offset
from .run import RunResult


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
            "node": info.get("node", ""),
            "device_index": info["device_id"],
            "chip": info.get("chip"),  # what the device's runtime was bound to
            "ray_assigned": info.get("ray_assigned"),  # what Ray reserved for the actor
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
    chips = CHIPS_PER_CARD.get(result.devices[0]["backend"]) if result.devices else None
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": "pure-infer" if cfg.pure_infer else "dataset",
        "devices": devices,
        "card": card,
        "hosts": _groups(devices, wall, lambda d: d["node"]),
        "nodes_lost": [{"node": name, "at_s": round(at, 3)}
                       for name, at in result.outcome.nodes_lost.items()],
        "shards": result.shards,  # where each shard was dealt: its home node
        "moves": result.outcome.moves,  # work a node took over once its own ran dry
        "cards": _groups(devices, wall, lambda d: f"{d['node']}/card{d['device_index'] // chips}")
        if chips else [],
        "driver": driver_cost(result, images),
        **result.startup,  # startup_s: the run's start -> its first device call, with parts
        "teardown_s": result.teardown_s,
        "stages": stage_rates(result, card),
        "environment": {
            "backend": result.devices[0]["backend"],
            "provider": result.devices[0]["provider"],
            "precision": result.devices[0]["precision"],  # what the runtime says it runs
            "batch_size": cfg.batch_size,
            "recipe": result.recipe,
            "model": cfg.model,
            "model_sha256": result.model_sha256,
            "model_metadata": result.model_meta,
            "host": socket.gethostname(),
            "python": platform.python_version(),
            "versions": _versions(),
        },
        "config": asdict(cfg),
    }


#: Chips per card where a card holds several: an Atlas 300I carries 4 Ascend 310 chips.
CHIPS_PER_CARD = {"acl": 4, "emulated": 4}


def _groups(devices: list[dict[str, Any]], wall: float, key) -> list[dict[str, Any]]:
    """Measured figures per host (or per card): its images over the run's wall time."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for d in devices:
        groups.setdefault(key(d), []).append(d)
    return [
        {
            "name": name,
            "devices": [d["id"] for d in members],
            "images": sum(d["images"] for d in members),
            "measured_fps": round(sum(d["images"] for d in members) / wall, 3) if wall else 0.0,
            "sum_compute_fps": round(sum(d["compute_fps"] for d in members), 3),
        }
        for name, members in groups.items()
    ]


def driver_cost(result: RunResult, images: int) -> dict[str, Any]:
    """The driver process's own cost over the timed run (CPU of all its threads, Ray's
    included) and how the work crossed Ray: calls, batches per call."""
    wall, cpu = result.outcome.wall_s, result.outcome.cpu_s
    return {
        "cpu_s": round(cpu, 4),
        "cpu_s_per_1000_images": round(1000 * cpu / images, 4) if images else None,
        "wall_share": round(cpu / wall, 4) if wall else None,
        "calls": result.outcome.calls,
        "batches_per_call": result.batches_per_call,
        "chosen_by": "--batches-per-call" if result.config.batches_per_call else (
            f"warm-up: {1000 * result.batch_s:.3g} ms per batch"),
    }


def stage_rates(result: RunResult, card: dict[str, Any]) -> dict[str, Any]:
    """Capacity of each stage in img/s (its work rate x its parallelism) and the bound one.

    decode = read + decode + resize + crop in the preprocessing actors; preprocess = the
    float conversion in the device actors; transfer = the time devices sat idle although
    their next batch was already decoded (object transfer and dispatch not hidden behind the
    previous batch's compute); infer = the sum of compute-only rates; post = the driver's
    per-batch bookkeeping; orchestration = the images the driver process could handle per
    CPU second (Ray calls and bookkeeping): when it is the least, the driver bounds the
    run.  handoff = median ms from a batch being ready in its preprocessor
    to its device call starting (transfer + queueing, hidden or not).
    """
    stats = [s for s in result.stats if s.n]
    images = sum(s.n for s in stats)
    ndev = max(1, len(result.devices))

    def capacity(seconds: float, parallel: int) -> float | None:
        return round(images / seconds * parallel, 2) if seconds > 0 and images else None

    rates = {
        "decode": capacity(sum(s.decode_s for s in stats), max(1, result.workers)),
        "preprocess": capacity(sum(s.convert_s for s in stats), ndev),
        "transfer": capacity(sum(s.stall_s for s in stats), ndev),
        "infer": card["sum_compute_fps"] or None,
        "post": capacity(sum(s.post_s for s in stats), 1),
        "orchestration": capacity(result.outcome.cpu_s, 1),
    }
    if result.config.pure_infer:
        rates["decode"] = None  # no dataset: the batch is made once
    known = {k: v for k, v in rates.items() if v}
    handoff = [s.handoff_s for s in stats]
    return {
        "capacity_fps": rates,
        "handoff_p50_ms": _pct(handoff, 50),
        "bound_by": min(known, key=known.get) if known else None,
    }


def _versions() -> dict[str, str]:
    """Versions that change figures, including which ONNX Runtime build is installed."""
    from importlib import metadata

    import PIL
    import ray

    versions = {"ray": ray.__version__, "numpy": np.__version__, "pillow": PIL.__version__}
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-cann"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def accuracy_summary(result: RunResult) -> dict[str, Any]:
    acc = result.accuracy()
    scored = int(result.scored.size)
    missing = sum(1 for issue in result.issues if issue.index < 0)
    out: dict[str, Any] = {
        "images": result.num_images,  # image files in the run
        "scored": scored,
        "not_scored": result.num_images - scored,
        # labelled images without a file and files without a label: not among ``images``
        "unlabelled_or_missing": missing,
        "errors": len(result.issues),  # every line of errors.csv; --max-errors counts these
        "resumed_images": result.resumed_images,
        "cache": result.cache,
        "data": result.data,  # the kind of --images and where the labels came from
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
            + (f"  FAILED at {d['failed_at_s']:.1f}s: {short_reason(d['failure'])}"
               if d["failed_at_s"] is not None else "")
        )
    lines += [
        f"card: {card['devices']} devices, {card['images']} images in {card['wall_s']:.2f} s"
        f" -> measured {card['measured_fps']:.2f} img/s{tag}",
        f"      guide-style one-chip x {card['devices']}: {card['extrapolated_fps']:.2f} img/s;"
        f" efficiency (measured / sum of compute-only): {card['efficiency']:.1%}",
    ]
    for kind, groups in (("host", perf["hosts"]), ("card", perf["cards"])):
        if len(groups) > 1:
            lines += [f"{kind} {g['name']}: {len(g['devices'])} devices, {g['images']} images, "
                      f"measured {g['measured_fps']:.2f} img/s" for g in groups]
    lines += [f"node {n['node']} lost at {n['at_s']:.1f}s: the other nodes finished its images"
              for n in perf["nodes_lost"]]
    if perf.get("startup_s") is not None:
        parts = ", ".join(f"{k.split(' (')[0]} {v:.1f}" for k, v in perf["parts"].items()
                          if v >= 0.05)
        lines.append(f"start-up {perf['startup_s']:.1f} s ({parts}); teardown "
                     f"{perf['teardown_s']:.1f} s; not in any figure above")
    stages = perf["stages"]
    caps = ", ".join(f"{k} {v:.0f}" for k, v in stages["capacity_fps"].items() if v)
    lines.append(f"stages (img/s capacity): {caps}; bound by {stages['bound_by']}")
    if accuracy and accuracy.get("data"):
        lines.append(f"data: {accuracy['data']}")
    if accuracy and "top1" in accuracy:
        n = accuracy["unlabelled_or_missing"]
        missing = f", {n} unlabelled or missing" if n else ""
        lines.append(
            f"accuracy: top1 {accuracy['top1']}%  top5 {accuracy['top5']}%  over "
            f"{accuracy['scored']} scored images ({accuracy['not_scored']} not scored{missing})"
        )
    return "\n".join(lines)


def guide_perf_lines(result: RunResult, perf: dict[str, Any], device: dict[str, Any]) -> str:
    """``perf_vision_batchsize_{bs}_device_{id}.txt`` in the benchmark tool's five-line form.

    [e2e] this device's images / wall s, and the wall ms; [data read] and [preprocess]
    1000 / ms per image of decoding and of float conversion; [infer] e2e rate, Interface
    (compute-only) rate, wall ms per image; [post] batches / wall s and ms per batch.
    """
    wall = perf["card"]["wall_s"]
    mine = [s for s in result.stats if s.device == device["id"] and s.n]
    n = max(1, device["images"])
    read_ms = 1000 * sum(s.decode_s for s in mine) / n
    prep_ms = 1000 * sum(s.convert_s for s in mine) / n
    e2e = device["images"] / wall if wall else 0.0
    batch_rate = len(mine) / wall if wall else 0.0

    def rate(ms: float) -> float:
        return 1000 / ms if ms else 0.0

    return (
        f"[e2e] throughputRate: {e2e:.6g}, latency: {wall * 1000:.6g}\n"
        f"[data read] throughputRate: {rate(read_ms):.6g}, moduleLatency: {read_ms:.6g}\n"
        f"[preprocess] throughputRate: {rate(prep_ms):.6g}, moduleLatency: {prep_ms:.6g}\n"
        f"[infer] throughputRate: {e2e:.6g}, Interface throughputRate: "
        f"{device['compute_fps']:.6g}, moduleLatency: {1000 * wall / n:.6g}\n"
        f"[post] throughputRate: {batch_rate:.6g}, moduleLatency: {rate(batch_rate):.6g}\n"
        + ("# EMULATED Ascend 310 latency model: not a hardware measurement\n"
           if device["emulated"] else "")
    )


def per_class_rows(result: RunResult, synsets: str | None = None) -> list[list[Any]]:
    """[class, wnid, name, images, top1 %, top5 %] for every class that has scored images."""
    idx = result.scored
    labels = result.labels[idx]
    ranks = hit_ranks(result.top[idx], labels, result.num_classes)
    table = class_table(synsets)
    rows = []
    for c in np.unique(labels):
        mine = ranks[labels == c]
        wnid, name = table[c] if c < len(table) else ("", "")
        rows.append([int(c), wnid, name, int(mine.size),
                     round(100 * float(np.mean(mine == 0)), 2),
                     round(100 * float(np.mean(mine >= 0)), 2)])
    return rows


def format_examples(result: RunResult, count: int, synsets: str | None = None) -> str:
    """The first ``count`` scored images with their label and top-5 names."""
    off = label_offset(result.num_classes)
    lines = []
    for i in result.scored[:count]:
        label = short_name(int(result.labels[i]), synsets) if result.labels is not None else "?"
        top = ", ".join(short_name(int(c) - off, synsets) for c in result.top[i])
        lines.append(f"{result.names[i]}  label: {label}  top-5: {top}")
    return "\n".join(lines)


def write_timeline(result: RunResult, path: Path) -> str | None:
    """Busy intervals per device and the card's img/s over time; None when drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "timeline.png skipped: matplotlib is not installed (pip install cardrunner[plot])"
    t0 = result.outcome.started
    devices = [d["device"] for d in result.devices]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 2 + 0.5 * len(devices)), sharex=True,
                                      gridspec_kw={"height_ratios": [max(1, len(devices)), 2]})
    for row, dev in enumerate(devices):
        spans = [(s.run_start - t0, s.run_end - s.run_start) for s in result.stats
                 if s.device == dev and s.n]
        top.broken_barh(spans, (row - 0.4, 0.8), color=f"C{row % 10}", edgecolor="white",
                        linewidth=0.3)
    top.set_yticks(range(len(devices)), [f"device {d}" for d in devices])
    emulated = " (EMULATED chips)" if any(d["emulated"] for d in result.devices) else ""
    top.set_title(f"busy intervals per device{emulated}")
    # Images finished in a trailing window of a few batches: a narrower one only shows
    # which batches happened to end close together.
    order = np.argsort([s.run_end for s in result.stats])
    ends = np.array([result.stats[i].run_end - t0 for i in order])
    done = np.cumsum([result.stats[i].n for i in order])
    batch_s = float(np.median([s.run_end - s.run_start for s in result.stats]))
    width = max(result.outcome.wall_s / 20, 2 * batch_s, 0.05)
    grid = np.linspace(0, max(result.outcome.wall_s, width), 200)

    def finished(t: np.ndarray) -> np.ndarray:
        k = np.searchsorted(ends, t, side="right")
        return np.where(k > 0, done[np.maximum(k - 1, 0)], 0)

    span = np.minimum(grid, width)
    rate = np.divide(finished(grid) - finished(grid - width), span,
                     out=np.zeros_like(grid), where=span > 0)
    bottom.plot(grid, rate)
    bottom.set_ylabel("card img/s")
    bottom.set_title(f"images finished in the last {width:.1f} s", fontsize=9)
    bottom.set_xlabel("seconds since the first batch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write_outputs(result: RunResult, out: Path, synsets: str | None = None) -> dict[str, Any]:
    """Write every file of a run folder (see README); return perf.json's content.

    A resumed run's speed figures cover only this session (``perf.json`` says so); a resume
    with nothing left to run rewrites the accuracy files and leaves the speed files alone.
    """
    perf = perf_summary(result)
    acc = result.accuracy()
    perf["accuracy"] = accuracy_summary(result)
    timed = bool(result.stats)
    if result.resumed_images:
        perf["notes"] = [f"resumed: {result.resumed_images} images were finished in an earlier "
                         "session; the speed figures cover this session only"]
    if result.teardown:
        perf.setdefault("notes", []).extend(result.teardown)
    if held := reservation_notes(result.devices):
        perf.setdefault("notes", []).extend(held)
    if acc is not None:
        (out / "result.json").write_text(acc.to_guide_json())
        with open(out / "per_class.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["class", "wnid", "name", "images", "top1_pct", "top5_pct"])
            w.writerows(per_class_rows(result, synsets))
    if timed:
        for d in perf["devices"]:
            name = f"perf_vision_batchsize_{result.config.batch_size}_device_{d['id']}.txt"
            (out / name).write_text(guide_perf_lines(result, perf, d))
        note = write_timeline(result, out / "timeline.png")
        if note:
            perf.setdefault("notes", []).append(note)
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
