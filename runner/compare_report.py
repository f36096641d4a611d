"""The files and the printed summary of ``runner.compare``: flips.csv, per_class_compare.csv,
compare.json and compare.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from .classes import class_table, short_name
from .compare import Comparison, RunFolder

SIGNIFICANCE = 0.05


def _name(index: int, synsets: str | None) -> str:
    return short_name(index, synsets) if index >= 0 else "background"


def per_class_rows(c: Comparison, synsets: str | None = None) -> list[list[Any]]:
    """[class, wnid, name, images, top1 A %, top1 B %, delta, lost, gained, top5 A %, top5 B %]
    per labelled class, the largest top-1 loss first."""
    table = class_table(synsets)
    top5_a = np.any(c.a.top - c.a.offset == c.a.labels[:, None], axis=1)
    top5_b = np.any(c.b.top - c.b.offset == c.b.labels[:, None], axis=1)
    rows = []
    for cls in np.unique(c.a.labels):
        mine = c.a.labels == cls
        n = int(mine.sum())
        wnid, name = table[cls] if cls < len(table) else ("", "")
        a1, b1 = 100 * c.right_a[mine].mean(), 100 * c.right_b[mine].mean()
        rows.append([int(cls), wnid, name, n, round(a1, 2), round(b1, 2), round(b1 - a1, 2),
                     int((c.right_a & ~c.right_b)[mine].sum()),
                     int((~c.right_a & c.right_b)[mine].sum()),
                     round(100 * top5_a[mine].mean(), 2), round(100 * top5_b[mine].mean(), 2)])
    rows.sort(key=lambda r: (r[6], r[0]))
    return rows


def _run_json(run: RunFolder) -> dict[str, Any]:
    acc = run.accuracy()
    return {"path": str(run.path), "model": run.environment.get("model"),
            "model_sha256": run.header.get("model_sha256"),
            "precision": run.environment.get("precision"), "recipe": run.header.get("recipe"),
            "num_classes": run.num_classes, "top1": acc.percent(1), "top5": acc.percent(5)}


def summary_json(c: Comparison, gates_failed: list[str]) -> dict[str, Any]:
    acc_a, acc_b = c.a.accuracy(), c.b.accuracy()
    logits = None
    if c.logits is not None:
        logits = {k: v for k, v in c.logits.items() if k != "per_image_relative"}
    return {
        "run_a": _run_json(c.a), "run_b": _run_json(c.b), "images": c.images,
        # From the counts, not from the rounded percentages.
        "top1_diff_points": 100 * (acc_b.topk[0] - acc_a.topk[0]),
        "top5_diff_points": 100 * (acc_b.topk[4] - acc_a.topk[4]),
        "top1_drop_points": c.top1_drop,
        "top1_agreement": c.agreement, "top5_overlap": c.top5_overlap,
        "flips": {"right_in_a_only": len(c.lost), "right_in_b_only": len(c.gained),
                  "mcnemar_exact_p": c.p_value},
        "logits": logits, "gates_failed": gates_failed, "notes": c.notes,
    }


def write_flips(c: Comparison, path: Path, synsets: str | None = None) -> None:
    """Every image whose top-1 correctness differs, A's losses first; classes are ImageNet
    indices (0..999), a 1001-way model's background is -1."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "label_name", "a_top1", "a_name", "b_top1", "b_name",
                    "direction"])
        for direction, rows in (("right in A only", c.lost), ("right in B only", c.gained)):
            for i in rows:
                label, ta, tb = int(c.a.labels[i]), int(c.top1_a[i]), int(c.top1_b[i])
                w.writerow([c.a.names[i], label, _name(label, synsets), ta, _name(ta, synsets),
                            tb, _name(tb, synsets), direction])


def write_picture(c: Comparison, rows: list[list[Any]], path: Path) -> str | None:
    """Accuracy and flips, per-class top-1 deltas, the logit-error distribution; None when
    drawn, else a note saying why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "compare.png skipped: matplotlib is not installed (pip install cardrunner[plot])"
    fig, (acc_ax, cls_ax, err_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    acc_a, acc_b = c.a.accuracy(), c.b.accuracy()
    x = np.arange(2)
    acc_ax.bar(x - 0.2, [acc_a.percent(1), acc_a.percent(5)], 0.4, label=f"A {c.a.path.name}")
    acc_ax.bar(x + 0.2, [acc_b.percent(1), acc_b.percent(5)], 0.4, label=f"B {c.b.path.name}")
    acc_ax.set_xticks(x, ["top-1 %", "top-5 %"])
    bottom = max(0, min(acc_a.percent(1), acc_b.percent(1)) - 10)
    acc_ax.set_ylim(bottom, 100 + 0.2 * (100 - bottom))
    acc_ax.legend(loc="upper center", ncol=2, fontsize=8)
    acc_ax.set_title(f"{c.images} images: agreement {c.agreement:.2%}\nflips {len(c.lost)} lost "
                     f"/ {len(c.gained)} gained, McNemar p = {c.p_value:.3g}", fontsize=9)
    deltas = np.array([r[6] for r in rows])
    changed = deltas != 0
    cls_ax.bar(np.arange(changed.sum()), deltas[changed],
               color=np.where(deltas[changed] < 0, "C3", "C2"))
    cls_ax.axhline(0, color="grey", linewidth=0.5)
    cls_ax.set_xlabel("classes whose top-1 changed, worst first")
    cls_ax.set_ylabel("B - A top-1 points")
    cls_ax.set_title(f"per-class top-1: {int((deltas < 0).sum())} classes lost, "
                     f"{int((deltas > 0).sum())} gained, {int((~changed).sum())} unchanged",
                     fontsize=9)
    if c.logits is None or "per_image_relative" not in c.logits:
        err_ax.text(0.5, 0.5, "no logits: run both with --save-logits", ha="center",
                    va="center", transform=err_ax.transAxes)
        err_ax.set_axis_off()
    else:
        rel = c.logits["per_image_relative"]
        positive = rel[rel > 0]
        if positive.size:
            bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()) + 1e-9, 40)
            err_ax.hist(positive, bins=bins)
            err_ax.set_xscale("log")
        err_ax.set_xlabel("relative logit error ||B - A|| / ||A|| per image")
        err_ax.set_ylabel("images")
        err_ax.set_title(f"logits: {rel.size - positive.size} images identical, worst "
                         f"{rel.max():.3g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write_files(c: Comparison, out: Path, synsets: str | None,
                gates_failed: list[str]) -> list[str]:
    """Write every file of a comparison into ``out``; return notes (a skipped picture)."""
    rows = per_class_rows(c, synsets)
    write_flips(c, out / "flips.csv", synsets)
    with open(out / "per_class_compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "wnid", "name", "images", "top1_a_pct", "top1_b_pct",
                    "top1_delta_pts", "lost", "gained", "top5_a_pct", "top5_b_pct"])
        w.writerows(rows)
    note = write_picture(c, rows, out / "compare.png")
    payload = summary_json(c, gates_failed)
    payload["notes"] = c.notes + ([note] if note else [])
    (out / "compare.json").write_text(json.dumps(payload, indent=2) + "\n")
    return [note] if note else []


def format_summary(c: Comparison) -> str:
    acc_a, acc_b = c.a.accuracy(), c.b.accuracy()

    def who(run: RunFolder) -> str:
        precision = run.environment.get("precision")
        return f"{run.path}" + (f" ({precision})" if precision else "")

    p = c.p_value
    verdict = ("unlikely to be noise" if p < SIGNIFICANCE else "within the noise") + (
        f" at {SIGNIFICANCE:g}")
    lines = [
        f"A: {who(c.a)}",
        f"B: {who(c.b)}",
        f"{c.images} images, recipe {c.a.header.get('recipe')}",
        f"{'':>6} {'top1 %':>8} {'top5 %':>8}",
        f"{'A':>6} {acc_a.percent(1):>8.2f} {acc_a.percent(5):>8.2f}",
        f"{'B':>6} {acc_b.percent(1):>8.2f} {acc_b.percent(5):>8.2f}",
        f"{'B - A':>6} {100 * (acc_b.topk[0] - acc_a.topk[0]):>+8.2f} "
        f"{100 * (acc_b.topk[4] - acc_a.topk[4]):>+8.2f}",
        f"top-1 agreement {c.agreement:.2%}; top-5 overlap {c.top5_overlap:.2%}",
        f"flips: {len(c.lost)} right in A only, {len(c.gained)} right in B only; McNemar exact "
        f"p = {p:.3g} ({verdict})",
    ]
    logits = c.logits
    if logits is None:
        lines.append("logits: not compared (run both with --save-logits)")
    elif "skipped" in logits:
        lines.append(f"logits: not compared: {logits['skipped']}")
    else:
        worst = f" ({logits['worst'][0]['image']})" if logits["relative_max"] > 0 else ""
        lines.append(
            f"logits: cosine mean {logits['cosine_mean']:.6f} (min {logits['cosine_min']:.6f}); "
            f"max-abs error max {logits['max_abs_max']:.4g} (mean {logits['max_abs_mean']:.4g}); "
            f"relative error mean {logits['relative_mean']:.4g}, max {logits['relative_max']:.4g}"
            f"{worst}")
    return "\n".join(lines)
