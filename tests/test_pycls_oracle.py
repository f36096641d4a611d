"""pycls 0.1.1 (PyPI) as an independent oracle for the converter.

pycls's own EffNet is built from the EN-B3 config, given random weights and BN statistics,
written by pycls's own ``save_checkpoint``, converted by ``python -m convert.pth2onnx``, and
the ONNX output is compared with pycls's torch output on real ImageNet images.  pycls 0.1.1
predates ``MODEL.ACTIVATION_FUN`` (Swish is hard-coded), so its config dump lacks the key
and must be given ``ACTIVATION_FUN: silu`` before our loader accepts it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from conftest import VAL_ORIG, needs_val_orig

from convert.config import PRESETS, load_pycls_yaml
from convert.efficientnet import build_effnet, init_random
from runner.preprocess import get_recipe, reference_tensor

pycls_config = pytest.importorskip("pycls.core.config", reason="pycls==0.1.1 not installed")
pycls_checkpoint = pytest.importorskip("pycls.core.checkpoint")
pycls_effnet = pytest.importorskip("pycls.models.effnet")

REPO = Path(__file__).resolve().parents[1]
B3_YAML = REPO / "convert" / "configs" / "EN-B3_dds_8gpu.yaml"


@pytest.fixture
def pycls_cfg(tmp_path):
    """pycls's global cfg merged with EN-B3 (minus the key 0.1.1 lacks); restored after."""
    cfg = pycls_config.cfg
    saved = cfg.clone()
    doc = yaml.safe_load(B3_YAML.read_text())
    del doc["MODEL"]["ACTIVATION_FUN"]
    legacy = tmp_path / "EN-B3_pycls-0.1.1.yaml"
    legacy.write_text(yaml.safe_dump(doc))
    cfg.merge_from_file(str(legacy))
    cfg.NUM_GPUS = 1  # pycls only writes checkpoints from its master process
    cfg.OUT_DIR = str(tmp_path)
    yield cfg
    cfg.merge_from_other_cfg(saved)


def pycls_args(name: str) -> dict:
    e = PRESETS[name].effnet
    return {
        "stem_w": e.stem_w,
        "ds": list(e.depths),
        "ws": list(e.widths),
        "exp_rs": list(e.exp_ratios),
        "se_r": e.se_r,
        "ss": list(e.strides),
        "ks": list(e.kernels),
        "head_w": e.head_w,
        "nc": e.num_classes,
    }


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_pycls_networks(name):
    ours = build_effnet(PRESETS[name].effnet).state_dict()
    theirs = pycls_effnet.EffNet(**pycls_args(name)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }


def test_pycls_config_dump_needs_the_activation(pycls_cfg, tmp_path):
    doc = yaml.safe_load(pycls_cfg.dump())
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="ACTIVATION_FUN is missing"):
        load_pycls_yaml(dumped)
    doc["MODEL"]["ACTIVATION_FUN"] = "silu"
    dumped.write_text(yaml.safe_dump(doc))
    assert load_pycls_yaml(dumped) == PRESETS["EN-B3"]


def randomised_pycls_b3() -> torch.nn.Module:
    """pycls's EffNet with seeded random weights, affine BN and non-trivial running stats.

    The weights come from ``init_random`` (pycls's own init leaves an untrained eval-mode
    net chaotic: see its docstring), then every BN is perturbed independently.
    """
    model = pycls_effnet.EffNet()
    ours = build_effnet(PRESETS["EN-B3"].effnet)
    init_random(ours, 11)
    model.load_state_dict(ours.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            n = bn.num_features
            bn.weight.mul_(0.8 + 0.4 * torch.rand(n, generator=gen))
            bn.bias.add_(0.1 * torch.randn(n, generator=gen))
            bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn(n, generator=gen))
            bn.running_var.mul_(0.8 + 0.4 * torch.rand(n, generator=gen))
    return model.eval()


@needs_val_orig
def test_onnx_matches_pycls_on_real_images(pycls_cfg, tmp_path):
    model = randomised_pycls_b3()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.9)
    ckpt = Path(pycls_checkpoint.save_checkpoint(model, optimizer, 99))
    assert ckpt.name == "model_epoch_0100.pyth"

    doc = yaml.safe_load(pycls_cfg.dump())
    doc["MODEL"]["ACTIVATION_FUN"] = "silu"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc))
    out = tmp_path / "efficientnetB3.onnx"
    cmd = [sys.executable, "-m", "convert.pth2onnx", str(ckpt), str(config), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    recipe = get_recipe("huawei")
    images = sorted(p for p in VAL_ORIG.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    assert images
    x = np.stack([reference_tensor(p, recipe) for p in images])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert float(want.std()) > 0.05  # a non-degenerate network, or the check proves nothing
    # The graph itself, run node by node as written: equal to pycls within fp32 rounding.
    exact = ort.SessionOptions()
    exact.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    graph = ort.InferenceSession(str(out), exact, providers=["CPUExecutionProvider"])
    got = graph.run(["class"], {"image": x})[0]
    assert np.max(np.abs(got - want)) < 1e-4
    # What the runner runs: ONNX Runtime's optimised graph.  Its fused kernels differ more
    # (measured with onnxruntime 1.32 on an AMD EPYC: 3.0e-4 on logits up to 17, against
    # 1.2e-5 unoptimised and 8e-6 for pycls's fp32 torch, all vs a float64 torch run).
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    fast = session.run(["class"], {"image": x})[0]
    assert np.max(np.abs(fast - want)) < 1e-3
    assert (fast.argmax(1) == want.argmax(1)).all() and (got.argmax(1) == want.argmax(1)).all()
