"""What one loaded ``.om`` takes and gives, checked against what cardrunner feeds it and reads
from it (the same checks for pyACL and ais_bench, which describe tensors differently)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import BackendError

#: aclDataType (acl_base.h); ais_bench's TensorDataType uses the same numbers (TensorBase.h).
ACL_DTYPES = {0: "float32", 1: "float16", 2: "int8", 3: "int32", 4: "uint8", 6: "int16",
              7: "uint16", 8: "uint32", 9: "int64", 10: "uint64", 11: "float64", 12: "bool"}
INPUT_DTYPES = ("float32", "uint8")  # normalised NCHW, or raw NHWC crops for an AIPP .om
LOGIT_DTYPES = ("float32", "float16")  # float16 when ATC was given --output_type=FP16


@dataclass(frozen=True)
class Tensor:
    """One model input or output as the runtime describes it."""

    name: str
    dims: list[int]
    dtype_code: int  # aclDataType
    size: int  # bytes


@dataclass(frozen=True)
class Om:
    """What one loaded .om takes and gives, as the runtime reported it."""

    path: Path
    batch: int
    input_name: str
    input_dims: tuple[int, ...]
    dtype: str
    num_classes: int
    out_dtype: str


def _dtype_name(code: int) -> str:
    return ACL_DTYPES.get(code, f"aclDataType {code}")


def describe(
    path: Path, listed_batch: int | None, declared: dict[str, Any], inp: Tensor, out: Tensor
) -> Om:
    """Check a loaded .om against what cardrunner feeds it and reads from it.

    Data types come from the runtime (as acllite_model.py reads them), not from byte sizes: a
    4-byte INT32 output would otherwise pass for float32 logits.
    """
    om, dims = path.name, tuple(int(d) for d in inp.dims)
    if len(dims) != 4 or min(dims) <= 0:
        raise BackendError(
            f"{om}: input {inp.name!r} has dims {list(dims)}; the acl backend needs one "
            "fixed-batch image input per .om (convert one .om per batch size)"
        )
    batch = dims[0]
    if listed_batch is not None and listed_batch != batch:
        raise BackendError(f"{om}: listed for batch size {listed_batch}, its input has {batch}")
    dtype = _dtype_name(int(inp.dtype_code))
    if dtype not in INPUT_DTYPES or inp.size != math.prod(dims) * np.dtype(dtype).itemsize:
        raise BackendError(
            f"{om}: input {inp.name!r} is {dtype}, {inp.size} bytes for dims {list(dims)}; "
            "the acl backend feeds float32 (NCHW) or uint8 (NHWC, AIPP)"
        )
    if declared.get("dtype", dtype) != dtype:
        raise BackendError(
            f"{om}: the manifest says input dtype {declared['dtype']}, the model takes {dtype}"
        )
    if tuple(declared.get("shape", [-1, *dims[1:]])[1:]) != dims[1:]:
        raise BackendError(
            f"{om}: the manifest says input shape {declared['shape']}, the model takes {list(dims)}"
        )
    out_dtype = _dtype_name(int(out.dtype_code))
    classes = math.prod(out.dims[1:]) if len(out.dims) >= 2 else 0
    if out_dtype not in LOGIT_DTYPES:
        raise BackendError(f"{om}: output 0 is {out_dtype}; expected float32 or float16 logits")
    if classes <= 0 or out.dims[0] != batch or out.size != batch * classes * np.dtype(
        out_dtype
    ).itemsize:
        raise BackendError(
            f"{om}: output 0 has dims {list(out.dims)} and {out.size} bytes; "
            f"expected {out_dtype} logits [{batch}, classes]"
        )
    return Om(path, batch, inp.name, dims, dtype, classes, out_dtype)


def add_model(models: dict[int, Om], om: Om) -> None:
    """File ``om`` under its batch size: two .om of one batch size cannot both be fed."""
    if om.batch in models:
        raise BackendError(
            f"{om.path.name} and {models[om.batch].path.name} both have batch size {om.batch}"
        )
    models[om.batch] = om
