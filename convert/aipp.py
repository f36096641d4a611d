"""Static AIPP config for ATC: move a recipe's normalisation onto the Ascend chip.

With ``--insert_op_conf`` ATC puts an AIPP stage in front of the model, so the host sends the
uint8 RGB crop (NHWC, 4x fewer bytes than float32) and the chip does the channel swap and
``(x - mean_chn - min_chn) * var_reci_chn`` per channel.  CANN documents that the swap
(``rbuv_swap_switch``) runs *before* normalisation, so channel ``i`` of every mean/min/var
field refers to the order after the swap (B, G, R for a BGR model fed RGB888_U8).

The config file stores ``min_chn``/``var_reci_chn`` as float32 (insert_op.proto, graphengine),
but the AIPP kernel loads them as fp16 and ``mean_chn`` as an int16 (aipp_comm.py ``get_fp16``
into SPR6/SPR7, ``mean_chn & 0xffff`` into SPR5; gekowa/ascend-opp tbe/impl).  fp16 has steps
of 1/16 near 100, so ``min_chn = 255 x mean`` alone would shift every pixel by up to 0.03
levels (103.53 -> 103.5).  The integer part of ``255 x mean`` therefore goes into
``mean_chn`` (exact) and only the fraction into ``min_chn`` (fp16 steps <= 2^-11 there): the
per-channel offset is then within 3e-4 levels.  ``var_reci_chn`` keeps fp16's relative
rounding (<= 2^-11) and the arithmetic itself stays fp16 -- the remaining difference from the
float32 host path.

These numbers are checked against ``runner.preprocess`` with the chip's fp16 loads and
arithmetic modelled in numpy; real ATC and a real AIPP stage have not been run by the tests.
"""

from __future__ import annotations

import math
from pathlib import Path

from runner.preprocess import Recipe

#: AIPP's var_reci_chn is applied in fp16, so it must fit fp16's finite range.
_FP16_MAX = 65504.0


def aipp_params(recipe: Recipe) -> dict[str, float | int | bool]:
    """AIPP fields that reproduce ``recipe``'s normalisation on RGB888_U8 input.

    Keys: ``rbuv_swap_switch`` and ``mean_chn_i``/``min_chn_i``/``var_reci_chn_i`` for
    i = 0..2 in the channel order after the swap; ``mean_chn_i + min_chn_i`` is the channel's
    offset in pixel levels, split into an integer and a fraction in [0, 1) (module docstring).
    Raises ``ValueError`` for a recipe whose crop is not uint8 (AIPP takes integer pixels).
    """
    if recipe.wire_dtype != "uint8":
        raise ValueError(
            f"recipe {recipe.name!r} produces {recipe.wire_dtype} crops; AIPP takes uint8 "
            "pixels only, so it cannot reproduce this recipe"
        )
    swap = recipe.channels == "BGR"
    order = [2, 1, 0] if swap else [0, 1, 2]
    params: dict[str, float | int | bool] = {"rbuv_swap_switch": swap}
    for i, src in enumerate(order):
        # (x / scale - mean) / std == (x - scale * mean) * (1 / (scale * std))
        offset = recipe.scale * recipe.mean[src]
        var_reci = 1.0 / (recipe.scale * recipe.std[src])
        if not 0.0 <= offset <= 255.0 or abs(var_reci) > _FP16_MAX:
            raise ValueError(f"recipe {recipe.name!r} normalisation is outside AIPP's range")
        mean_chn = math.floor(offset)
        params[f"mean_chn_{i}"] = mean_chn
        params[f"min_chn_{i}"] = offset - mean_chn
        params[f"var_reci_chn_{i}"] = var_reci
    return params


def _prototxt_value(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    # The config holds these as float32 (the kernel then loads fp16): 9 significant digits
    # round-trip a float32, so the file adds no rounding of its own.
    text = format(value, ".9g")
    return text if any(c in text for c in ".e") else text + ".0"


def aipp_config_text(recipe: Recipe, size: int | tuple[int, int]) -> str:
    """The ``aipp_op`` prototxt block for a square ``size`` or ``(height, width)`` input."""
    height, width = (size, size) if isinstance(size, int) else size
    lines = [
        f"# AIPP for recipe {recipe.name!r} (cardrunner convert/aipp.py); input is",
        "# uint8 RGB NHWC, output is the recipe's normalised tensor (loaded and computed in fp16).",
        "aipp_op {",
        "    aipp_mode: static",
        "    input_format: RGB888_U8",
        f"    src_image_size_w: {width}",
        f"    src_image_size_h: {height}",
        "    crop: false",
        "    csc_switch: false",
    ]
    for key, value in aipp_params(recipe).items():
        lines.append(f"    {key}: {_prototxt_value(value)}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_aipp_config(recipe: Recipe, size: int | tuple[int, int], path: str | Path) -> Path:
    """Write the AIPP config for ``--insert_op_conf`` and return its path."""
    path = Path(path)
    path.write_text(aipp_config_text(recipe, size), encoding="utf-8")
    return path
