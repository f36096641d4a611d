"""ONNX export in the guide's layout (opset 11, ``image`` -> ``class``, dynamic batch) + checks.

The legacy TorchScript exporter (``dynamo=False``) is used because the torch.export-based one
silently produces opset 18+, which ATC and older runtimes reject.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from runner.modelfile import file_sha256
from runner.preprocess import Recipe, get_recipe

INPUT_NAME = "image"
OUTPUT_NAME = "class"
FLOAT_INPUT = "float32-nchw"
UINT8_INPUT = "uint8-nhwc"


#: ONNX Runtime vs fp32 torch, max abs logit difference allowed after --fp16: half-precision
#: weights and activations cannot reach the fp32 bound of 1e-4 (Lite0 measures 0.022-0.037).
FP16_ATOL = 0.1


class ExportVerificationError(RuntimeError):
    """ONNX Runtime disagrees with torch on the exported model."""


class UsageError(ValueError):
    """Wrong combination of command-line arguments."""


class Uint8Input(nn.Module):
    """Moves the recipe's ``to_tensor`` into the graph: uint8 NHWC RGB in, logits out.

    Feeding uint8 quarters the bytes each batch moves; the float32 operations are those of
    ``runner.preprocess.normalise_float`` (x / scale, then (x - mean) / std per RGB channel),
    followed by the reorder to the recipe's channel order and NCHW.
    """

    def __init__(self, model: nn.Module, recipe: Recipe) -> None:
        super().__init__()
        if recipe.wire_dtype != "uint8":
            raise ValueError(f"recipe {recipe.name} does not take uint8 crops")
        self.model = model
        self.scale = float(recipe.scale)
        order = [2, 1, 0] if recipe.channels == "BGR" else [0, 1, 2]
        self.register_buffer("order", torch.tensor(order), persistent=False)
        self.register_buffer("mean", torch.tensor(recipe.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(recipe.std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.scale != 1.0:
            x = x / self.scale
        x = (x - self.mean) / self.std
        x = torch.index_select(x, 3, self.order).permute(0, 3, 1, 2)
        return self.model(x)


def export_onnx(
    model: nn.Module,
    out_path: str | Path,
    *,
    input_size: int = 300,
    opset: int = 11,
    metadata: dict[str, str],
    uint8_input: bool = False,
    recipe: Recipe | None = None,
    dummy_batch: int = 2,
) -> None:
    """Export ``model`` (eval mode) to ``out_path`` with cardrunner metadata.

    ``cardrunner.input``, ``cardrunner.opset`` and (given ``recipe``) ``cardrunner.recipe``
    are filled in here; ``metadata`` supplies the rest (``cardrunner.arch``, ``.weights``).
    The dummy batch only sets example shapes: batch 2 gives a byte-identical graph to the
    guide's 16 (tested) and traces 20x faster.
    """
    model = model.eval()
    if uint8_input:
        if recipe is None:
            raise ValueError("uint8 input needs a preprocessing recipe")
        model = Uint8Input(model, recipe).eval()
        dummy = torch.zeros(dummy_batch, input_size, input_size, 3, dtype=torch.uint8)
    else:
        dummy = torch.zeros(dummy_batch, 3, input_size, input_size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter: on purpose
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    props = dict(metadata)
    props["cardrunner.input"] = UINT8_INPUT if uint8_input else FLOAT_INPUT
    props["cardrunner.opset"] = str(opset)
    if recipe is not None:
        props["cardrunner.recipe"] = recipe.name
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(out_path))


def read_metadata(onnx_path: str | Path) -> dict[str, str]:
    """The model's metadata_props as a dict."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def verify_onnx(
    onnx_path: str | Path,
    model: nn.Module,
    *,
    batch: int = 2,
    atol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Check the file and compare ONNX Runtime with torch; return the max abs difference.

    ``model`` is the float network that was exported; for a uint8 export it is wrapped as
    the file's metadata says.  Batches of ``batch``, 1 and 3 are run to prove the dynamic
    batch axis.  Raises ``ExportVerificationError`` when the difference exceeds ``atol``.
    """
    try:
        onnx.checker.check_model(str(onnx_path))
    except onnx.checker.ValidationError as exc:
        raise ExportVerificationError(f"onnx checker: {str(exc).strip()}") from None
    meta = read_metadata(onnx_path)
    if meta.get("cardrunner.input") == UINT8_INPUT:
        model = Uint8Input(model, get_recipe(meta["cardrunner.recipe"]))
    model = model.eval()
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportVerificationError(
            "verifying the export needs ONNX Runtime: pip install -e '.[cpu]' (or '.[cuda]', "
            "'.[cann]': any build has the CPU provider)") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's Fail/InvalidGraph are not public
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportVerificationError(f"ONNX Runtime cannot load the export: {first}") from None
    inp = session.get_inputs()[0]
    shape = inp.shape[1:]
    rng = np.random.default_rng(seed)
    worst = 0.0
    for n in dict.fromkeys((batch, 1, 3)):
        if inp.type == "tensor(uint8)":
            x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        else:
            x = rng.standard_normal((n, *shape), dtype=np.float32)
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        if got.shape != want.shape:
            raise ExportVerificationError(
                f"ONNX output shape {got.shape} != torch {want.shape} at batch {n}"
            )
        worst = max(worst, float(np.max(np.abs(got - want))))
    if worst > atol:
        raise ExportVerificationError(
            f"ONNX Runtime differs from torch by {worst:.3g} (max abs), above {atol:g}"
        )
    return worst


def sha256_16(path: Path) -> str:
    """First 16 hex digits of a file's SHA-256: names the weights in the model's metadata."""
    return file_sha256(path)[:16]


def make_output_dir(out: Path) -> None:
    """Create the output's folder (like ``runs/models``) or say in one line why not."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out.parent}: {exc.strerror}") from None


def add_export_options(p: argparse.ArgumentParser) -> None:
    """The options every exporter CLI shares."""
    p.add_argument("--opset", type=int, default=11, help="ONNX opset (default 11, as the guide)")
    p.add_argument("--uint8-input", action="store_true",
                   help="take uint8 NHWC RGB crops; normalisation runs inside the graph")
    p.add_argument("--fp16", action="store_true",
                   help="float16 weights and activations, input and output types unchanged "
                   "(needs onnxconverter-common)")


def _float16_converter():
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
    around them, which is slower than fp32 (Lite0: 0.6-0.7x its img/s on 2 cores).  Casts of
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


def export_verified(
    model: nn.Module, out: Path, args: argparse.Namespace, recipe: Recipe, arch: str,
    weights: str,
) -> None:
    """Export, optionally convert to fp16, verify against torch, print; remove on failure.

    ``arch`` and ``weights`` (where the weights came from) go into the ONNX metadata."""
    print(f"{arch}: {sum(p.numel() for p in model.parameters()):,} parameters; {weights}")
    metadata = {"cardrunner.arch": arch, "cardrunner.weights": weights}
    if args.fp16:
        _float16_converter()  # fail before the export, not after it
    precision = "fp16" if args.fp16 else "fp32"
    start = time.perf_counter()
    export_onnx(model, out, input_size=recipe.crop, opset=args.opset,
                metadata={**metadata, "cardrunner.precision": precision},
                uint8_input=args.uint8_input, recipe=recipe)
    try:
        if args.fp16:
            convert_to_fp16(out)
        exported = time.perf_counter()
        diff = verify_onnx(out, model, atol=FP16_ATOL if args.fp16 else 1e-4)
    except Exception:
        out.unlink(missing_ok=True)
        raise
    layout = "uint8 [batch,%d,%d,3]" if args.uint8_input else "float32 [batch,3,%d,%d]"
    print(f"wrote {out} (opset {args.opset}, {precision}, input "
          f"{layout % (recipe.crop, recipe.crop)}) in {exported - start:.1f} s")
    print(f"verified: ONNX Runtime vs torch max abs diff {diff:.3g} "
          f"(batches 2, 1, 3) in {time.perf_counter() - exported:.1f} s")


def run_cli(prog: str, convert: Callable[[argparse.Namespace], None],
            parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, convert, and turn every expected failure into one line and exit status 2."""
    args = parser.parse_args(argv)
    try:
        convert(args)
    except (ValueError, RuntimeError, OSError) as exc:  # incl. ExportVerificationError
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"{prog}: error: {lines[0]}", file=sys.stderr)
        return 2
    return 0
