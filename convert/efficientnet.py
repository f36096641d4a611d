"""A pycls-compatible EfficientNet, for inference and ONNX export.

Module names follow pycls exactly (``stem.conv``, ``s{i}.b{j}.dwise``, ``head.fc``, ...) so a
pycls ``model_state`` loads with ``strict=True`` and no renaming.

Activation pitfall: pycls's ``MODEL.ACTIVATION_FUN`` defaults to ``relu``, yet every
EfficientNet was trained with SiLU (Swish).  A ReLU network has exactly the same parameters,
so a checkpoint loads into it strictly and silently gives wrong outputs.  ``build_effnet``
therefore refuses any activation other than SiLU.

Dropout and drop-connect are training-time regularisers and identities at evaluation, so this
inference-only build records ``dropout``/``dc_ratio`` in the config but adds no layers for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

#: Names pycls accepts for the SiLU activation.
SILU_NAMES = ("silu", "swish")


@dataclass(frozen=True)
class EffNetConfig:
    """pycls ``EN``/``MODEL`` options that define the network (one entry per stage)."""

    stem_w: int
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    exp_ratios: tuple[float, ...]
    se_r: float
    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    head_w: int
    num_classes: int
    bn_eps: float = 1e-5
    activation: str = "silu"
    dc_ratio: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        per_stage = (self.depths, self.widths, self.exp_ratios, self.kernels, self.strides)
        if not self.depths or len({len(v) for v in per_stage}) != 1:
            raise ValueError(
                "EN.DEPTHS, WIDTHS, EXP_RATIOS, KERNELS and STRIDES must be non-empty lists "
                f"of one length, got lengths {[len(v) for v in per_stage]}"
            )


def _conv(w_in: int, w_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(w_in, w_out, k, stride, padding=(k - 1) // 2, groups=groups, bias=False)


class SE(nn.Module):
    """Squeeze-and-excitation: global pool, 1x1 (bias), SiLU, 1x1 (bias), sigmoid gate."""

    def __init__(self, w: int, w_se: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.f_ex = nn.Sequential(
            nn.Conv2d(w, w_se, 1, bias=True),
            nn.SiLU(),
            nn.Conv2d(w_se, w, 1, bias=True),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.f_ex(self.avg_pool(x))


class MBConv(nn.Module):
    """Inverted bottleneck: [expand 1x1] -> depthwise kxk -> SE -> project 1x1 [+ skip]."""

    def __init__(
        self, w_in: int, exp_r: float, k: int, stride: int, se_r: float, w_out: int, eps: float
    ) -> None:
        super().__init__()
        w_exp = int(w_in * exp_r)
        # pycls drops the expansion when it would not change the width (ratio 1).
        self.exp: nn.Module | None = None
        if w_exp != w_in:
            self.exp = _conv(w_in, w_exp, 1)
            self.exp_bn = nn.BatchNorm2d(w_exp, eps=eps)
        self.dwise = _conv(w_exp, w_exp, k, stride, groups=w_exp)
        self.dwise_bn = nn.BatchNorm2d(w_exp, eps=eps)
        self.se = SE(w_exp, int(w_in * se_r))  # SE width follows the block *input* width
        self.lin_proj = _conv(w_exp, w_out, 1)
        self.lin_proj_bn = nn.BatchNorm2d(w_out, eps=eps)
        self.act = nn.SiLU()
        self.has_skip = stride == 1 and w_in == w_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.act(self.exp_bn(self.exp(x))) if self.exp is not None else x
        f = self.act(self.dwise_bn(self.dwise(f)))
        f = self.lin_proj_bn(self.lin_proj(self.se(f)))
        return x + f if self.has_skip else f


class Stem(nn.Module):
    """3x3 stride-2 conv, BN, SiLU."""

    def __init__(self, w_out: int, eps: float) -> None:
        super().__init__()
        self.conv = _conv(3, w_out, 3, stride=2)
        self.bn = nn.BatchNorm2d(w_out, eps=eps)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Head(nn.Module):
    """1x1 conv, BN, SiLU, global average pool, fully connected classifier."""

    def __init__(self, w_in: int, w_out: int, num_classes: int, eps: float) -> None:
        super().__init__()
        self.conv = _conv(w_in, w_out, 1)
        self.conv_bn = nn.BatchNorm2d(w_out, eps=eps)
        self.act = nn.SiLU()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w_out, num_classes, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avg_pool(self.act(self.conv_bn(self.conv(x))))
        return self.fc(torch.flatten(x, 1))


class EffNet(nn.Module):
    """Stem, stages ``s1..sN`` of MBConv blocks ``b1..bD``, head."""

    def __init__(self, cfg: EffNetConfig) -> None:
        super().__init__()
        eps = cfg.bn_eps
        self.stem = Stem(cfg.stem_w, eps)
        w_in = cfg.stem_w
        stages = zip(cfg.depths, cfg.widths, cfg.exp_ratios, cfg.kernels, cfg.strides, strict=True)
        for i, (d, w, exp_r, k, stride) in enumerate(stages, start=1):
            stage = nn.Sequential()
            for j in range(1, d + 1):
                # Only a stage's first block changes stride and width.
                block_stride = stride if j == 1 else 1
                stage.add_module(f"b{j}", MBConv(w_in, exp_r, k, block_stride, cfg.se_r, w, eps))
                w_in = w
            self.add_module(f"s{i}", stage)
        self.head = Head(w_in, cfg.head_w, cfg.num_classes, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x


def build_effnet(cfg: EffNetConfig) -> EffNet:
    """Build the network in eval mode; refuses non-SiLU activations (see module docstring)."""
    if cfg.activation.lower() not in SILU_NAMES:
        raise ValueError(
            f"activation {cfg.activation!r} is not supported: pycls EfficientNets use SiLU "
            "(a ReLU net loads the same checkpoint but computes wrong outputs)"
        )
    return EffNet(cfg).eval()


def init_random(model: EffNet, seed: int, input_size: int = 300) -> None:
    """Deterministic random weights whose eval-mode outputs are sane on any input.

    Starts from pycls's init (conv normal(0, sqrt(2 / (k*k*out))), BN gamma 1 beta 0, fc
    normal(0, 0.01) bias 0), which as it stands is useless untrained: with identity BN
    statistics the signal shrinks ~3x per stage to constant logits.  So the BN running
    statistics are calibrated on one seeded random batch.  An untrained eval-mode net is
    also chaotic: a slightly different input scale (real images vs noise) compounds through
    the ~80 fixed BN + SiLU layers into logits of 1e3 that differ by 1e1 between equally
    valid float kernels, which no export check can pass.  Residual branches therefore start
    at BN gamma 0.2 (a softened pycls ZERO_INIT_FINAL_GAMMA) and the SE excitation conv at
    std 0.01, which keeps logits within ~0.2-5 and kernel differences near 1e-5.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.01, generator=gen)
                m.bias.zero_()
        for bn in bns:
            bn.reset_parameters()
            bn.momentum = None  # cumulative average: one batch sets the statistics exactly
        for m in model.modules():
            if isinstance(m, SE):
                m.f_ex[2].weight.normal_(0.0, 0.01, generator=gen)
            elif isinstance(m, MBConv) and m.has_skip:
                m.lin_proj_bn.weight.fill_(0.2)
        model.train()
        model(torch.randn(2, 3, input_size, input_size, generator=gen))
    for bn in bns:
        bn.momentum = 0.1
    model.eval()
