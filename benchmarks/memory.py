"""Driver peak RSS at 1,000 and 8,000 images: in-flight work is bounded, so it must not grow.

Each size runs in a fresh process (EMULATED chips, 2 ms per batch, small JPEGs so decoding
is quick), keeping every logit (``--save-logits``: streamed to ``logits.npy``) unless
``--no-logits``, and reports that process's peak RSS (ru_maxrss); the ratio is printed.

    python benchmarks/memory.py [--sizes 1000,8000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import numpy as np
from PIL import Image

CHILD = r"""
import json, resource, sys, tempfile
from runner.config import RunConfig
from runner.evaluation import run_evaluation
images, labels, n, keep = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
with tempfile.TemporaryDirectory() as out:
    cfg = RunConfig(backend="emulated", images=images, labels=labels, limit=n, devices="0-3",
                    batch_size=16, out=out, progress=False, emulated_latency_ms=2.0,
                    keep_logits=keep)
    result = run_evaluation(cfg)
print(json.dumps({"images": int(result.scored.size),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(1, count + 1):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        if not (folder / name).exists():
            arr = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / name, quality=80)
        lines.append(f"{name} {i % 1000}\n")
    (folder / "val_label.txt").write_text("".join(lines))
    return folder / "val_label.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,8000")
    p.add_argument("--json", default="benchmarks/results/memory.json")
    p.add_argument("--no-logits", action="store_true",
                   help="without --save-logits (by default all logits are kept, on disk)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    folder = Path(tempfile.gettempdir()) / "cardrunner-memory-images"
    labels = make_images(folder, max(sizes))
    env = dict(os.environ, PYTHONPATH=str(common.ROOT))
    rows = []
    for n in sizes:
        keep = "0" if args.no_logits else "1"
        proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(labels), str(n), keep],
                              capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    common.print_table(rows, ["images", "peak_rss_mb"])
    print(f"driver peak RSS {sizes[-1]} / {sizes[0]} images = {ratio:.3f} "
          "(EMULATED chips; the driver never holds pixels)")
    common.write_json(args.json, {"benchmark": "memory", "save_logits": not args.no_logits,
                                  "rows": rows, "ratio": ratio})


if __name__ == "__main__":
    main()
