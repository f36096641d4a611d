"""Float ONNX classifier -> static INT8 QDQ model for ONNX Runtime, calibrated on real images.

The calibration images are decoded exactly as the runner decodes them (``load_crop`` +
``to_tensor`` of the model's own recipe), every ``metadata_props`` entry of the float model is
carried over (``cardrunner.precision`` becomes ``int8``), and the result is verified against
the float model on the calibration images before it is kept.

Defaults (measured on Lite0, val_227, calibrated on val_orig's 20 images; README): MinMax
activations in uint8, weights in int8 per output channel and 7-bit.  8-bit weights lose 2.8
points of top-1 on x86 CPUs without VNNI, where ONNX Runtime's u8s8 kernels saturate their
int16 sums (the quantizer's own CPU guidance says to reduce the range there); 7-bit weights
per tensor lose 27 points (depthwise channels have ranges far apart).  Q/DQ nodes take a
channel ``axis`` only from opset 13, and ONNX Runtime's quantizer does not raise the opset for
it (``update_opset_version`` in onnxruntime 1.32's quant_utils.py only does so for 16-bit,
4-bit and float8 types), so a per-channel run converts the model to opset 13 first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from runner.dataset import IMAGE_SUFFIXES
from runner.preprocess import ImageError, Recipe, get_recipe, load_crop, to_tensor

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
PER_CHANNEL_OPSET = 13
#: ``CalibStridedMinMax`` (calibrate a few batches at a time) came with onnxruntime 1.19
#: (PR #20949); older releases ignore it, and their histogram methods then keep every
#: activation of every image (Lite0: ~62 MB per image) and fail on a short last batch.
STRIDED_CALIBRATION = (1, 19)


class QuantizeError(ValueError):
    """Bad input or a quantized model that fails its check; one line, names the file or flag."""


@dataclass(frozen=True)
class QuantSettings:
    """How to quantize: the calibration method and the weight granularity."""

    method: str = "minmax"
    per_channel: bool = True
    reduce_range: bool = True  # 7-bit weights (see --weight-bits)
    percentile: float = 99.999  # only for method "percentile"
    batch_size: int = 16

    def describe(self) -> str:
        method = (f"percentile {self.percentile:g}" if self.method == "percentile"
                  else self.method)
        weights = "per-channel" if self.per_channel else "per-tensor"
        bits = "7-bit" if self.reduce_range else "8-bit"
        return f"QDQ, uint8 activations ({method}), int8 {bits} {weights} weights"


@dataclass
class Calibration:
    """The decoded calibration crops (HWC, the recipe's wire dtype) and what failed."""

    folder: Path
    names: list[str]
    crops: np.ndarray
    errors: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Verification:
    images: int
    agree: int  # images whose INT8 top-1 equals the float model's
    min_cosine: float  # lowest per-image cosine similarity of the logits

    @property
    def agreement(self) -> float:
        return self.agree / self.images if self.images else 0.0


def list_images(folder: Path) -> list[str]:
    """Image files of ``folder`` in the runner's order (sorted names, image suffixes)."""
    if not folder.is_dir():
        raise QuantizeError(f"--calibrate: {folder} is not a directory")
    return sorted(p.name for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                  and p.is_file())


def load_calibration(folder: str | Path, recipe: Recipe, count: int) -> Calibration:
    """Decode the first ``count`` images of ``folder`` with ``recipe``; failures are listed."""
    folder = Path(folder)
    names = list_images(folder)[:count]
    crops, used, errors = [], [], []
    for name in names:
        try:
            crops.append(load_crop(folder / name, recipe))
            used.append(name)
        except ImageError as exc:
            errors.append((name, str(exc)))
    if not crops:
        why = f" ({errors[0][0]}: {errors[0][1]})" if errors else ""
        raise QuantizeError(f"--calibrate: no usable images in {folder}{why}")
    return Calibration(folder, used, np.stack(crops), errors)


class CropReader(CalibrationDataReader):
    """Feeds calibration batches; ``set_range`` (ORT >= 1.19, ``CalibStridedMinMax``) lets the
    calibrator collect one batch at a time instead of holding every activation."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self.batches = batches
        self.set_range(0, len(batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._iter = iter(self.batches[start_index:end_index])


def model_input(proto: onnx.ModelProto) -> tuple[str, int]:
    """(name, element type) of the model's only image input."""
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise QuantizeError(f"MODEL has {len(inputs)} inputs; a classifier takes one image batch")
    return inputs[0].name, inputs[0].type.tensor_type.elem_type


def feeds(calibration: Calibration, recipe: Recipe, uint8_input: bool, name: str,
          batch_size: int) -> list[dict[str, np.ndarray]]:
    """Model inputs in batches: the runner's ``to_tensor`` output, or the raw uint8 crops for
    a model that normalises inside its graph."""
    out = []
    for a in range(0, len(calibration.crops), batch_size):
        crops = calibration.crops[a : a + batch_size]
        out.append({name: crops if uint8_input else to_tensor(crops, recipe)})
    return out


def with_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``proto`` converted to at least ``opset`` of the default domain."""
    current = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if current >= opset:
        return proto
    try:
        return version_converter.convert_version(proto, opset)
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError and others
        raise QuantizeError(f"cannot convert MODEL from opset {current} to {opset} for "
                            f"per-channel weights: {str(exc).splitlines()[0]}") from None


def quantize(model: str | Path, out: str | Path, calibration: Calibration, recipe: Recipe,
             settings: QuantSettings) -> dict[str, str]:
    """Write the INT8 model to ``out``; return the metadata written into it."""
    proto = onnx.load(str(model))
    meta = {p.key: p.value for p in proto.metadata_props}
    name, elem = model_input(proto)
    if settings.per_channel:
        proto = with_opset(proto, PER_CHANNEL_OPSET)
    batches = feeds(calibration, recipe, elem == onnx.TensorProto.UINT8, name,
                    settings.batch_size)
    # One batch per collect call: the histogram methods stack a call's batches into one array,
    # which fails on a short last batch, and hold every activation of the call.  Not
    # CalibMaxIntermediateOutputs: MinMaxCalibrater drops the collected outputs without
    # computing their ranges (onnxruntime issue #18893; still so in 1.32's calibrate.py).
    extra = {"CalibStridedMinMax": 1}
    if settings.method == "percentile":
        extra["CalibPercentile"] = settings.percentile
    with tempfile.TemporaryDirectory(prefix="cardrunner-quant.") as tmp:
        raw, src = Path(tmp) / "float.onnx", Path(tmp) / "prepared.onnx"
        onnx.save(proto, str(raw))
        # ORT's own preparation: shape inference, constant folding, and Pad folded into Conv.
        # Lite0's TF-"SAME" Pads left in float cut the int8 chain: without this step its
        # INT8 model ran 1.16x the fp32 one (1 thread, bs16), with it 1.91x.
        quant_pre_process(str(raw), str(src))
        quantize_static(
            str(src), str(out), CropReader(batches),
            quant_format=QuantFormat.QDQ,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            # Set both explicitly: the default activation type changed across releases.
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=METHODS[settings.method],
            extra_options=extra,
        )
    quantized = onnx.load(str(out))
    opset = next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx"))
    meta.update({
        "cardrunner.precision": "int8",
        "cardrunner.quantization": f"{settings.describe()}; calibrated on "
        f"{len(calibration.names)} images of {calibration.folder.name}/ (recipe {recipe.name})",
    })
    if "cardrunner.opset" in meta:
        meta["cardrunner.opset"] = str(opset)
    del quantized.metadata_props[:]
    onnx.helper.set_model_props(quantized, meta)
    onnx.save(quantized, str(out))
    return meta


def session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def verify(float_model: str | Path, int8_model: str | Path, calibration: Calibration,
           recipe: Recipe, batch_size: int = 16) -> Verification:
    """Top-1 agreement and logit cosine of the INT8 model vs the float one on the
    calibration images (both run in ONNX Runtime on the CPU)."""
    try:
        onnx.checker.check_model(str(int8_model))
    except onnx.checker.ValidationError as exc:
        raise QuantizeError(f"onnx checker: {str(exc).strip().splitlines()[0]}") from None
    ref, q = session(float_model), session(int8_model)
    inp = ref.get_inputs()[0]
    batches = feeds(calibration, recipe, inp.type == "tensor(uint8)", inp.name, batch_size)
    agree, cosines = 0, []
    for feed in batches:
        a, b = ref.run(None, feed)[0], q.run(None, feed)[0]
        agree += int(np.sum(a.argmax(1) == b.argmax(1)))
        cosines.append(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    return Verification(len(calibration.names), agree, float(np.min(np.concatenate(cosines))))


EPILOG = """\
example:
  python -m convert.quantize runs/models/efficientnet_lite0.onnx \\
      runs/models/efficientnet_lite0_int8.onnx --calibrate CALIBRATION_IMAGES --count 512

The recipe comes from the model's cardrunner.recipe metadata unless --preprocess names one.
The INT8 model is checked with onnx.checker and compared with the float model on the
calibration images; below --min-agreement it is removed.  Errors exit with status 2.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert.quantize",
        description="Static INT8 (QDQ) quantization with ONNX Runtime, calibrated on real images "
        "decoded by the model's own recipe.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="float .onnx (fp32)")
    p.add_argument("out", metavar="OUT", help="INT8 .onnx to write")
    p.add_argument("--calibrate", required=True, metavar="IMAGES",
                   help="folder of calibration images (keep them apart from the evaluation set)")
    p.add_argument("--count", type=int, default=512,
                   help="calibration images: the first N in sorted order (default 512)")
    p.add_argument("--method", choices=sorted(METHODS), default="minmax",
                   help="activation calibration (default minmax)")
    p.add_argument("--percentile", type=float, default=99.999,
                   help="--method percentile: the percentile kept (default 99.999)")
    p.add_argument("--per-tensor", action="store_true",
                   help="one scale per weight tensor instead of per output channel")
    p.add_argument("--weight-bits", type=int, choices=(7, 8), default=7,
                   help="7 (default) avoids the int16 saturation of ONNX Runtime's u8s8 kernels "
                   "on x86 CPUs without VNNI (Lite0: 8-bit weights lost 2.8 points there)")
    p.add_argument("--preprocess", dest="recipe",
                   help="recipe override (default: the model's cardrunner.recipe)")
    p.add_argument("--batch-size", type=int, default=16, help="calibration batch (default 16)")
    p.add_argument("--min-agreement", type=float, default=0.8,
                   help="least top-1 agreement with the float model on the calibration images "
                   "(default 0.8)")
    return p


def convert(args: argparse.Namespace) -> None:
    model, out = Path(args.model), Path(args.out)
    if not model.is_file():
        raise QuantizeError(f"MODEL: {model} does not exist")
    if args.count < 1 or args.batch_size < 1:
        raise QuantizeError("--count and --batch-size must be at least 1")
    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    if meta.get("cardrunner.precision", "fp32") != "fp32":
        raise QuantizeError(f"MODEL: {model} is {meta['cardrunner.precision']}; quantize the "
                            "fp32 model")
    name = args.recipe or meta.get("cardrunner.recipe")
    if not name:
        raise QuantizeError(f"MODEL: {model} names no cardrunner.recipe; pass --preprocess")
    recipe = get_recipe(name)
    version = tuple(int(v) for v in ort.__version__.split(".")[:2])
    if args.method != "minmax" and version < STRIDED_CALIBRATION:
        raise QuantizeError(f"--method {args.method} needs onnxruntime >= 1.19 (strided "
                            f"calibration); this is {ort.__version__}")
    settings = QuantSettings(args.method, not args.per_tensor, args.weight_bits == 7,
                             args.percentile, args.batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    calibration = load_calibration(args.calibrate, recipe, args.count)
    used = len(calibration.names)
    short = f" (fewer than --count {args.count})" if used < args.count else ""
    print(f"calibration: {used} images of {calibration.folder}{short}, "
          f"recipe {recipe.name}, decoded in {time.perf_counter() - start:.1f} s")
    for image, reason in calibration.errors:
        print(f"  not used: {image}: {reason}")
    start = time.perf_counter()
    written = quantize(model, out, calibration, recipe, settings)
    quantized = time.perf_counter()
    try:
        check = verify(model, out, calibration, recipe, args.batch_size)
        if check.agreement < args.min_agreement:
            raise QuantizeError(
                f"INT8 top-1 agrees with the float model on {check.agreement:.1%} of the "
                f"calibration images, below --min-agreement {args.min_agreement:.0%}")
    except Exception:
        out.unlink(missing_ok=True)
        raise
    print(f"wrote {out} ({written['cardrunner.quantization'].split(';')[0]}) in "
          f"{quantized - start:.1f} s")
    print(f"verified: INT8 vs float top-1 agreement {check.agreement:.1%} "
          f"({check.agree}/{check.images} calibration images), lowest logit cosine "
          f"{check.min_cosine:.4f} in {time.perf_counter() - quantized:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        convert(args)
    except (ValueError, RuntimeError, OSError) as exc:  # incl. QuantizeError
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"quantize: error: {lines[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
