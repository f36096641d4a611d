"""``python -m runner.evaluate``: the command line, and nothing else.

Exit codes: 0 success, 2 bad configuration, 3 an accuracy or speed gate failed,
4 more unscored images than ``--max-errors``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .backends import BackendError
from .dataset import DatasetError
from .devices import DeviceSpecError
from .evaluation import ConfigError, RunConfig, run_evaluation
from .journal import JournalError
from .metrics import LabelError
from .report import format_table, write_outputs

DEMO_IMAGES = 1000
CONFIG_ERRORS = (ConfigError, DeviceSpecError, DatasetError, LabelError, JournalError,
                 BackendError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runner.evaluate",
        description="Evaluate an ImageNet classifier on several devices at once and measure "
        "the card's real throughput.",
    )
    p.add_argument("--devices", default="0", help="e.g. 0-3, 0,2,5, 3 or all (default 0)")
    p.add_argument("--model", help=".onnx (onnxruntime) or .om / manifest.json (acl)")
    p.add_argument("--images", help="folder of validation images")
    p.add_argument("--labels", help="val_label.txt: '<image> <class index>' per line")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="runs/latest", help="run folder (default runs/latest)")
    p.add_argument("--backend", default="onnxruntime",
                   choices=["auto", "onnxruntime", "acl", "emulated"])
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "cann"],
                   help="onnxruntime execution provider (default cpu)")
    p.add_argument("--preprocess", dest="recipe",
                   help="recipe: huawei, pycls or tf-lite (default: from the model's metadata)")
    p.add_argument("--workers", type=int, help="preprocessing actors (default: one per core)")
    p.add_argument("--in-flight", type=int, default=2, help="batches queued per device")
    p.add_argument("--threads", type=int, help="onnxruntime CPU threads per device")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--pure-infer", action="store_true",
                   help="random input of the model's shape, no dataset (device figures)")
    p.add_argument("--rounds", type=int, default=50, help="pure-infer batches per device")
    p.add_argument("--save-logits", dest="keep_logits", action="store_true",
                   help="stream all logits to OUT/logits.npy")
    p.add_argument("--address", help="join a Ray cluster (auto or HOST:PORT)")
    p.add_argument("--emulated-chips", type=int, default=4,
                   help="emulated chips the embedded Ray offers (default 4, one 310 card)")
    p.add_argument("--emulated-latency-ms", type=float,
                   help="fixed emulated ms per batch instead of the 310 table")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--max-errors", type=int, default=0,
                   help="unscored images tolerated before exit code 4 (default 0)")
    p.add_argument("--demo", action="store_true",
                   help="synthetic images + random-init EN-B3 (untrained: only speed means "
                   "anything)")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    fields = RunConfig.__dataclass_fields__
    return RunConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.demo:
        from . import demo

        count = args.limit or DEMO_IMAGES
        print(f"demo: preparing {count} synthetic images and a random-init EN-B3 in "
              f"{demo.cache_dir() / 'demo'} ...", flush=True)
        try:
            images, labels, model = demo.prepare(count)
        except RuntimeError as exc:
            print(f"evaluate: error: {exc}", file=sys.stderr)
            return 2
        args.images, args.labels, args.model = str(images), str(labels), str(model)
        args.limit = count
        print("demo: the weights are UNTRAINED (random init): accuracy is chance level; "
              "only the throughput figures mean anything.", flush=True)
    cfg = config_from_args(args)
    try:
        result = run_evaluation(cfg)
    except CONFIG_ERRORS as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    perf = write_outputs(result, out)
    print(format_table(perf, perf["accuracy"]))
    print(f"wrote {out}/")
    not_scored = perf["accuracy"]["not_scored"]
    if not_scored > args.max_errors:
        print(f"evaluate: {not_scored} images were not scored (see {out / 'errors.csv'}); "
              f"--max-errors is {args.max_errors}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
