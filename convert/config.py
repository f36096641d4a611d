"""pycls yaml configs and built-in EfficientNet presets.

Only the sections that define the network (``MODEL``, ``EN``, ``BN.EPS``) and the image sizes
(``TRAIN.IM_SIZE``, ``TEST.IM_SIZE``) are read; other sections (OPTIM, NUM_GPUS, ...) are
training settings and are ignored.  Unknown keys inside ``MODEL``/``EN`` are rejected: pycls
itself would refuse them, and silently dropping one could change the network.  Missing keys
take pycls's defaults, except ``MODEL.ACTIVATION_FUN`` (see ``load_pycls_yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from convert.efficientnet import SILU_NAMES, EffNetConfig

MODEL_KEYS = frozenset(
    {
        "TYPE",
        "DEPTH",
        "NUM_CLASSES",
        "LOSS_FUN",
        "ACTIVATION_FUN",
        "ACTIVATION_INPLACE",
        "SCALING_TYPE",
        "SCALING_FACTOR",
    }
)
EN_KEYS = frozenset(
    {
        "STEM_W",
        "DEPTHS",
        "WIDTHS",
        "EXP_RATIOS",
        "SE_R",
        "KERNELS",
        "STRIDES",
        "HEAD_W",
        "DC_RATIO",
        "DROPOUT_RATIO",
    }
)


@dataclass(frozen=True)
class ModelSpec:
    """A named network plus the image sizes it was trained and evaluated at."""

    arch: str
    effnet: EffNetConfig
    crop: int  # TRAIN.IM_SIZE: the model's input height and width
    resize: int  # TEST.IM_SIZE: short side before the centre crop


def _en(
    stem_w: int,
    depths: list[int],
    widths: list[int],
    head_w: int,
    crop: int,
    resize: int,
    name: str,
) -> ModelSpec:
    cfg = EffNetConfig(
        stem_w=stem_w,
        depths=tuple(depths),
        widths=tuple(widths),
        exp_ratios=(1.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0),
        se_r=0.25,
        kernels=(3, 3, 5, 3, 5, 5, 3),
        strides=(1, 2, 2, 2, 1, 2, 1),
        head_w=head_w,
        num_classes=1000,
    )
    return ModelSpec(name, cfg, crop, resize)


#: pycls ``configs/dds_baselines/effnet/EN-B*_dds_8gpu.yaml``.
PRESETS: dict[str, ModelSpec] = {
    s.arch: s
    for s in (
        _en(32, [1, 2, 2, 3, 3, 4, 1], [16, 24, 40, 80, 112, 192, 320], 1280, 224, 256, "EN-B0"),
        _en(32, [2, 3, 3, 4, 4, 5, 2], [16, 24, 40, 80, 112, 192, 320], 1280, 240, 274, "EN-B1"),
        _en(32, [2, 3, 3, 4, 4, 5, 2], [16, 24, 48, 88, 120, 208, 352], 1408, 260, 298, "EN-B2"),
        _en(40, [2, 3, 3, 5, 5, 6, 2], [24, 32, 48, 96, 136, 232, 384], 1536, 300, 342, "EN-B3"),
        _en(48, [2, 4, 4, 6, 6, 8, 2], [24, 32, 56, 112, 160, 272, 448], 1792, 380, 434, "EN-B4"),
        _en(48, [3, 5, 5, 7, 7, 9, 3], [24, 40, 64, 128, 176, 304, 512], 2048, 456, 522, "EN-B5"),
    )
}


def get_preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None


def _section(doc: dict, name: str, path: Path) -> dict[str, Any]:
    sec = doc.get(name) or {}
    if not isinstance(sec, dict):
        raise ValueError(f"{name} in {path} must be a mapping")
    return sec


def _check_keys(sec: dict, name: str, known: frozenset[str], path: Path) -> None:
    for key in sec:
        if key not in known:
            raise ValueError(f"unknown key {name}.{key} in {path}")


def _number(value: Any, key: str, kind: type) -> Any:
    if kind is float and isinstance(value, str):
        # PyYAML reads "1e-5" (no dot) as a string; pycls configs write floats that way.
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if kind is int and value != int(value):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return kind(value)


def _numbers(value: Any, key: str, kind: type) -> tuple:
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list, got {value!r}")
    return tuple(_number(v, key, kind) for v in value)


def load_pycls_yaml(path: str | Path) -> ModelSpec:
    """Read a pycls EfficientNet yaml; raise a one-line ``ValueError`` for anything unusable.

    A missing ``MODEL.ACTIVATION_FUN`` is rejected, not defaulted: pycls's default is relu,
    which would build a wrong network that still loads the checkpoint (pycls 0.1.1 configs
    omit the key because that version hard-codes Swish; add ``ACTIVATION_FUN: silu``).
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(f"cannot parse config {path}: {reason}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"config {path} is not a pycls yaml mapping")
    model = _section(doc, "MODEL", path)
    en = _section(doc, "EN", path)
    _check_keys(model, "MODEL", MODEL_KEYS, path)
    _check_keys(en, "EN", EN_KEYS, path)

    if str(model.get("TYPE", "")).lower() != "effnet":
        raise ValueError(f"MODEL.TYPE in {path} is {model.get('TYPE')!r}; only effnet is supported")
    act = model.get("ACTIVATION_FUN")
    if act is None:
        raise ValueError(
            f"MODEL.ACTIVATION_FUN is missing in {path}: pycls would default to relu, but "
            "EfficientNet is trained with silu; add 'ACTIVATION_FUN: silu' under MODEL"
        )
    if str(act).lower() not in SILU_NAMES:
        raise ValueError(f"MODEL.ACTIVATION_FUN in {path} is {act!r}; EfficientNet needs silu")

    bn_eps = _section(doc, "BN", path).get("EPS", 1e-5)
    train = _section(doc, "TRAIN", path)
    test = _section(doc, "TEST", path)
    try:
        cfg = EffNetConfig(
            stem_w=_number(en.get("STEM_W", 32), "EN.STEM_W", int),
            depths=_numbers(en.get("DEPTHS", []), "EN.DEPTHS", int),
            widths=_numbers(en.get("WIDTHS", []), "EN.WIDTHS", int),
            exp_ratios=_numbers(en.get("EXP_RATIOS", []), "EN.EXP_RATIOS", float),
            se_r=_number(en.get("SE_R", 0.25), "EN.SE_R", float),
            kernels=_numbers(en.get("KERNELS", []), "EN.KERNELS", int),
            strides=_numbers(en.get("STRIDES", []), "EN.STRIDES", int),
            head_w=_number(en.get("HEAD_W", 1280), "EN.HEAD_W", int),
            num_classes=_number(model.get("NUM_CLASSES", 10), "MODEL.NUM_CLASSES", int),
            bn_eps=_number(bn_eps, "BN.EPS", float),
            activation=str(act).lower(),
            dc_ratio=_number(en.get("DC_RATIO", 0.0), "EN.DC_RATIO", float),
            dropout=_number(en.get("DROPOUT_RATIO", 0.0), "EN.DROPOUT_RATIO", float),
        )
        crop = _number(train.get("IM_SIZE", 224), "TRAIN.IM_SIZE", int)
        resize = _number(test.get("IM_SIZE", 256), "TEST.IM_SIZE", int)
    except ValueError as exc:
        raise ValueError(f"{exc} (in {path})") from None
    arch = next((s.arch for s in PRESETS.values() if s.effnet == cfg), f"effnet:{path.stem}")
    return ModelSpec(arch, cfg, crop, resize)
