"""ONNX -> Ascend ``.om`` with CANN's ATC: one fixed-batch model per batch size + a manifest.

The atc command is the guide's (REFERENCE.md section 2), so a converted model is comparable
with the published Ascend 310 figures; ``manifest.json`` records the exact argv of every run
and the input contract (float32 NCHW, or uint8 NHWC with ``--aipp``) that the runner's ACL
backend reads.

The tests drive this module with a fake ``atc`` (tests/fake_atc/atc); real ATC has not been
run by them, so flag spellings are checked against the guide and CANN's documentation only.

    python -m convert.onnx2om efficientnetB3.onnx --batch-sizes 1,16 --soc Ascend310 --out om/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import onnx

from convert.aipp import aipp_params, write_aipp_config
from runner.modelfile import file_sha256
from runner.preprocess import Recipe, get_recipe

PROG = "onnx2om"
ATC_MISSING = (
    "atc not found on PATH; source /usr/local/Ascend/ascend-toolkit/set_env.sh (CANN) first"
)
#: CANN's set_env.sh exports both; the CANN 5.x ``env.sh`` scripts of the guide's era export
#: only ASCEND_OPP_PATH, which is what ATC itself reads to find its operators.
CANN_ENV_VARS = ("ASCEND_OPP_PATH", "ASCEND_TOOLKIT_HOME")
ATC_LOG_LEVELS = ("debug", "info", "warning", "error", "null")
ATC_DEFAULT_PRECISION = "force_fp16"
#: GE's ModelHelper inserts ``_<host_env_os>_<host_env_cpu>`` before ``.om`` when the model
#: carries operator .so binaries (hicann/ge model_helper.cc), e.g. ``m_bs16_linux_x86_64.om``.
OS_CPU_SUFFIX = re.compile(r"_[a-z]+_[a-z0-9_]+")


class ConvertError(RuntimeError):
    """A failure reported to the user as one line, exit status 2."""


@dataclass(frozen=True)
class OnnxInput:
    """The model's single image input; ``batch`` is None when the ONNX batch axis is dynamic."""

    name: str
    batch: int | None
    height: int
    width: int


@dataclass(frozen=True)
class AtcOptions:
    """Everything in the atc command that does not vary with the batch size."""

    soc: str
    log: str = "debug"  # the guide's
    auto_tune: frozenset[int] = frozenset()  # batch sizes to tune (the guide tunes bs16 only)
    precision: str | None = None  # None: leave ATC's own default (force_fp16)
    insert_op_conf: Path | None = None


def read_onnx(path: Path) -> tuple[OnnxInput, dict[str, str]]:
    """The image input and the metadata_props of an ONNX file, without its external data."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types
        raise ConvertError(f"{path}: cannot read ONNX: {exc}") from None
    graph = model.graph
    initialisers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialisers]
    if len(inputs) != 1:
        raise ConvertError(f"{path}: expected one graph input, found {len(inputs)}")
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        dtype = onnx.TensorProto.DataType.Name(tensor.elem_type)
        raise ConvertError(f"{path}: input {inputs[0].name!r} is {dtype}, expected FLOAT")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or dims[2] is None or dims[3] is None:
        shown = ["?" if d is None else d for d in dims]
        raise ConvertError(
            f"{path}: input {inputs[0].name!r} has shape {shown}, expected [N,3,H,W]"
        )
    meta = {p.key: p.value for p in model.metadata_props}
    return OnnxInput(inputs[0].name, dims[0], dims[2], dims[3]), meta


def atc_argv(
    model: Path, inp: OnnxInput, batch_size: int, output: Path, opts: AtcOptions
) -> list[str]:
    """The guide's atc command for one batch size; ATC appends ``.om`` to ``output``."""
    argv = [
        "atc",
        "--framework=5",
        f"--model={model}",
        "--input_format=NCHW",
        f"--input_shape={inp.name}:{batch_size},3,{inp.height},{inp.width}",
        f"--output={output}",
        f"--log={opts.log}",
        f"--soc_version={opts.soc}",
    ]
    if batch_size in opts.auto_tune:
        argv.append("--auto_tune_mode=RL,GA")
    if opts.precision is not None:
        argv.append(f"--precision_mode={opts.precision}")
    if opts.insert_op_conf is not None:
        argv.append(f"--insert_op_conf={opts.insert_op_conf}")
    return argv


def check_atc() -> None:
    """Fail early, in one line, where the CANN environment has not been sourced."""
    if shutil.which("atc") is None or not any(os.environ.get(v) for v in CANN_ENV_VARS):
        raise ConvertError(ATC_MISSING)


def atc_log_hint(env: Mapping[str, str], log_level: str) -> str:
    """Where ATC's detailed log went: it prints only a summary ("ATC run failed, Please check
    the detail log").  Precedence from CANN's environment variable reference:
    ASCEND_SLOG_PRINT_TO_STDOUT=1 prints it; else ASCEND_PROCESS_LOG_PATH > ASCEND_WORK_PATH/log
    > $HOME/ascend/log."""
    if log_level == "null":
        return "ATC kept no log (--log null); rerun with --log error"
    if env.get("ASCEND_SLOG_PRINT_TO_STDOUT") == "1":
        return "its log is above (ASCEND_SLOG_PRINT_TO_STDOUT=1)"
    if env.get("ASCEND_PROCESS_LOG_PATH"):
        root = Path(env["ASCEND_PROCESS_LOG_PATH"])
    elif env.get("ASCEND_WORK_PATH"):
        root = Path(env["ASCEND_WORK_PATH"]) / "log"
    else:
        root = Path(env.get("HOME", "~")) / "ascend" / "log"
    return f"its log is under {root} (ASCEND_SLOG_PRINT_TO_STDOUT=1 prints it here instead)"


def om_candidates(out: Path, base: str) -> list[Path]:
    """``<base>.om`` and the ``<base>_<os>_<cpu>.om`` variants ATC may write instead."""
    found = [p for p in out.glob(f"{base}_*.om")
             if OS_CPU_SUFFIX.fullmatch(p.name[len(base):-len(".om")])]
    exact = out / f"{base}.om"
    return sorted([exact, *found] if exact.is_file() else found)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers: {text!r}")
    return list(dict.fromkeys(sizes))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert an ONNX model to Ascend .om files with ATC, one per batch size, "
        "and write manifest.json beside them.",
    )
    p.add_argument("onnx", type=Path, help="ONNX model (input [N,3,H,W])")
    p.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=[1, 16],
        metavar="LIST",
        help="comma-separated; one .om per size (default 1,16)",
    )
    p.add_argument("--soc", default="Ascend310", help="ATC --soc_version (default Ascend310)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--auto-tune",
        nargs="?",
        const="all",
        metavar="LIST",
        help='add --auto_tune_mode="RL,GA" for these batch sizes, or all without a list '
        "(the guide tunes 16 only; CANN <= 6.0.0; slow)",
    )
    p.add_argument(
        "--precision",
        metavar="MODE",
        help=f"ATC --precision_mode (default: ATC's own, {ATC_DEFAULT_PRECISION})",
    )
    p.add_argument(
        "--aipp",
        action="store_true",
        help="normalise on the chip (static AIPP): the model takes uint8 NHWC RGB",
    )
    p.add_argument("--dry-run", action="store_true", help="print the atc commands only")
    p.add_argument("--log", default="debug", choices=ATC_LOG_LEVELS,
                   help="ATC --log level (default debug, as in the guide)")
    return p


def _tuned_sizes(auto_tune: str | None, batch_sizes: list[int]) -> frozenset[int]:
    """The batch sizes ``--auto-tune`` names (all of them for a bare ``--auto-tune``)."""
    if auto_tune is None:
        return frozenset()
    if auto_tune == "all":
        return frozenset(batch_sizes)
    try:
        tuned = frozenset(_batch_sizes(auto_tune))
    except argparse.ArgumentTypeError as exc:
        raise ConvertError(f"--auto-tune: {exc}") from None
    if not tuned <= set(batch_sizes):
        raise ConvertError(f"--auto-tune {auto_tune}: not among --batch-sizes "
                           f"{','.join(map(str, batch_sizes))}")
    return tuned


def _input_spec(inp: OnnxInput, aipp: bool) -> dict[str, object]:
    # -1: each .om has the fixed batch size it is listed under in "models".
    if aipp:
        return {
            "name": inp.name,
            "dtype": "uint8",
            "layout": "NHWC",
            "shape": [-1, inp.height, inp.width, 3],
        }
    return {
        "name": inp.name,
        "dtype": "float32",
        "layout": "NCHW",
        "shape": [-1, 3, inp.height, inp.width],
    }


def _check_model(inp: OnnxInput, recipe: Recipe, batch_sizes: list[int], path: Path) -> None:
    if (inp.height, inp.width) != (recipe.crop, recipe.crop):
        raise ConvertError(
            f"{path}: input is {inp.height}x{inp.width} but recipe {recipe.name!r} "
            f"crops {recipe.crop}x{recipe.crop}"
        )
    if inp.batch is not None and any(bs != inp.batch for bs in batch_sizes):
        raise ConvertError(
            f"{path}: batch axis is fixed at {inp.batch}; export with a dynamic batch axis "
            f"or pass --batch-sizes {inp.batch}"
        )


def convert(args: argparse.Namespace) -> None:
    """Run atc once per batch size and write the manifest (or only print, with --dry-run)."""
    inp, meta = read_onnx(args.onnx)
    try:
        recipe = get_recipe(meta.get("cardrunner.recipe", "huawei"))
    except ValueError as exc:
        raise ConvertError(f"{args.onnx}: {exc}") from None
    _check_model(inp, recipe, args.batch_sizes, args.onnx)
    if args.aipp:
        try:
            aipp_params(recipe)
        except ValueError as exc:
            raise ConvertError(str(exc)) from None
    tuned = _tuned_sizes(args.auto_tune, args.batch_sizes)
    if not args.dry_run:
        check_atc()

    stem = args.onnx.stem
    out: Path = args.out
    aipp_cfg = out / f"{stem}_aipp.cfg" if args.aipp else None
    opts = AtcOptions(args.soc, args.log, tuned, args.precision, aipp_cfg)
    commands = {
        bs: atc_argv(args.onnx, inp, bs, out / f"{stem}_bs{bs}", opts) for bs in args.batch_sizes
    }
    if args.dry_run:
        for argv in commands.values():
            print(shlex.join(argv))
        print(f"# dry run: nothing was run or written (manifest would go to {out})")
        return

    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # rewritten only once every .om is there
    if aipp_cfg is not None:
        write_aipp_config(recipe, (inp.height, inp.width), aipp_cfg)
    models = {}
    for bs, argv in commands.items():
        base = f"{stem}_bs{bs}"
        for stale in om_candidates(out, base):  # an earlier run's .om must not pass for this one's
            stale.unlink()
        before = set(out.iterdir())
        print(shlex.join(argv), flush=True)
        try:
            rc = subprocess.run(argv, check=False).returncode
        except OSError as exc:
            raise ConvertError(f"cannot run atc for batch size {bs}: {exc}") from None
        if rc != 0:
            raise ConvertError(f"atc failed for batch size {bs} (exit code {rc}); "
                               f"{atc_log_hint(os.environ, args.log)}")
        written = om_candidates(out, base)
        if len(written) != 1:
            new = sorted(p.name for p in set(out.iterdir()) - before)
            raise ConvertError(
                f"atc exited 0 for batch size {bs} but wrote "
                f"{'no' if not written else 'more than one'} {out / base}.om "
                f"(or {base}_<os>_<cpu>.om); in {out} it wrote "
                f"{', '.join(new) if new else 'nothing'}"
            )
        models[str(bs)] = written[0].name

    manifest = {
        "onnx": str(args.onnx.resolve()),
        "onnx_sha256": file_sha256(args.onnx),
        "arch": meta.get("cardrunner.arch"),
        "soc": args.soc,
        "atc_flags": {str(bs): argv for bs, argv in commands.items()},
        "models": models,
        "recipe": recipe.name,
        "input": _input_spec(inp, args.aipp),
        "precision": args.precision or ATC_DEFAULT_PRECISION,
        "aipp": args.aipp,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = out / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        convert(args)
    except (ConvertError, OSError) as exc:  # OSError: unwritable --out, full disk, ...
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
