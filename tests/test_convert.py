"""convert/: the pycls EfficientNet, its configs and checkpoints, and the verified ONNX export."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from convert.checkpoint import CheckpointError, load_pycls_state, load_strict, save_pycls_checkpoint
from convert.config import PRESETS, load_pycls_yaml
from convert.efficientnet import EffNetConfig, build_effnet, init_random
from convert.export import ExportVerificationError, export_onnx, read_metadata, verify_onnx
from convert.pth2onnx import main
from runner.preprocess import get_recipe, to_tensor

REPO = Path(__file__).resolve().parents[1]
B3_YAML = REPO / "convert" / "configs" / "EN-B3_dds_8gpu.yaml"
B3 = PRESETS["EN-B3"].effnet
HUAWEI = get_recipe("huawei")
TINY = EffNetConfig(
    stem_w=8,
    depths=(1, 2),
    widths=(8, 16),
    exp_ratios=(1, 6),
    se_r=0.25,
    kernels=(3, 5),
    strides=(1, 2),
    head_w=32,
    num_classes=10,
)


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["class"], {"image": x})[0]


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- network


def test_b3_size_and_pycls_names():
    model = build_effnet(B3)
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 12_233_232
    assert len(state) == 574
    assert "s1.b1.exp.weight" not in state  # expansion ratio 1: no expansion conv
    for key, shape in {
        "stem.conv.weight": (40, 3, 3, 3),
        "s1.b1.dwise.weight": (40, 1, 3, 3),
        "s1.b1.se.f_ex.0.weight": (10, 40, 1, 1),  # SE width = 0.25 x block input width
        "s2.b1.exp.weight": (144, 24, 1, 1),
        "s2.b2.se.f_ex.0.bias": (8,),
        "s2.b2.se.f_ex.2.weight": (192, 8, 1, 1),
        "s7.b2.lin_proj_bn.running_var": (384,),
        "head.conv.weight": (1536, 384, 1, 1),
        "head.fc.weight": (1000, 1536),
        "head.fc.bias": (1000,),
    }.items():
        assert tuple(state[key].shape) == shape, key
    acts = {type(m) for m in model.modules()}
    assert torch.nn.SiLU in acts and torch.nn.ReLU not in acts
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 300, 300)).shape == (1, 1000)


def test_relu_is_refused():
    with pytest.raises(ValueError, match="SiLU"):
        build_effnet(dataclasses.replace(B3, activation="relu"))


def test_random_init_is_deterministic_and_not_degenerate():
    a, b, c = build_effnet(B3), build_effnet(B3), build_effnet(B3)
    init_random(a, 5)
    init_random(b, 5)
    init_random(c, 6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.fc.weight"], sc["head.fc.weight"])
    assert not torch.equal(sa["stem.bn.running_var"], torch.ones(40))  # BN is not identity
    crops = np.random.default_rng(0).integers(0, 256, (3, 300, 300, 3), dtype=np.uint8)
    with torch.no_grad():
        logits = a(torch.from_numpy(to_tensor(crops, HUAWEI)))
    assert torch.isfinite(logits).all()
    assert 0.05 < float(logits.std()) < 50  # neither constant nor exploding
    assert float(logits.std(dim=0).mean()) > 1e-3  # images get different outputs


# --------------------------------------------------------------------------- configs


def test_shipped_yaml_is_the_b3_preset():
    spec = load_pycls_yaml(B3_YAML)
    assert spec == PRESETS["EN-B3"]
    assert (spec.arch, spec.crop, spec.resize) == ("EN-B3", 300, 342)
    assert spec.effnet.activation == "silu"


def test_yaml_fields_and_defaults(tmp_path):
    path = write_yaml(
        tmp_path,
        "MODEL: {TYPE: effnet, ACTIVATION_FUN: swish}\n"
        "EN: {DEPTHS: [1, 2], WIDTHS: [8, 16], EXP_RATIOS: [1, 6], KERNELS: [3, 5],"
        " STRIDES: [1, 2], STEM_W: 8, HEAD_W: 32}\n"
        "BN: {EPS: 1e-3}\nRNG_SEED: 3\nDATA_LOADER: {NUM_WORKERS: 4}\n",
    )
    spec = load_pycls_yaml(path)
    assert spec.effnet == dataclasses.replace(TINY, bn_eps=1e-3, activation="swish")
    assert spec.arch == "effnet:model"
    assert (spec.crop, spec.resize) == (224, 256)  # pycls's TRAIN/TEST.IM_SIZE defaults


@pytest.mark.parametrize(
    "text, message",
    [
        ("MODEL: {TYPE: effnet, ACTIVATION_FUN: silu, WIDTH: 3}\n", "unknown key MODEL.WIDTH"),
        ("MODEL: {TYPE: effnet, ACTIVATION_FUN: silu}\nEN: {SE_RATIO: 0.25}\n", "EN.SE_RATIO"),
        ("MODEL: {TYPE: effnet}\nEN: {STEM_W: 40}\n", "ACTIVATION_FUN is missing.*relu"),
        ("MODEL: {TYPE: effnet, ACTIVATION_FUN: relu}\n", "needs silu"),
        ("MODEL: {TYPE: regnet, ACTIVATION_FUN: silu}\n", "only effnet"),
        ("MODEL: {TYPE: effnet, ACTIVATION_FUN: silu}\nEN: {DEPTHS: [1]}\n", "one length"),
        ("MODEL: {TYPE: effnet, ACTIVATION_FUN: silu}\nEN: {STEM_W: wide}\n", "STEM_W"),
        ("MODEL: [effnet\n", "cannot parse"),
        ("just text\n", "not a pycls yaml"),
    ],
)
def test_bad_yaml_is_rejected_in_one_line(tmp_path, text, message):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ValueError, match=message) as info:
        load_pycls_yaml(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_missing_yaml(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        load_pycls_yaml(tmp_path / "absent.yaml")


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_prefix(tmp_path):
    model = build_effnet(TINY)
    init_random(model, 1, 32)
    save_pycls_checkpoint(model, tmp_path / "plain.pyth", "MODEL: {}\n")
    save_pycls_checkpoint(model, tmp_path / "dp.pyth", "MODEL: {}\n", module_prefix=True)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    raw = torch.load(tmp_path / "dp.pyth", weights_only=True)
    assert set(raw) == {"epoch", "model_state", "optimizer_state", "cfg"}
    assert all(k.startswith("module.") for k in raw["model_state"])
    expected = model.state_dict()
    for name in ("plain.pyth", "dp.pyth", "bare.pth"):
        state = load_pycls_state(tmp_path / name)
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in state)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_pycls_state(tmp_path / "absent.pyth")
    (tmp_path / "junk.pyth").write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(CheckpointError, match="not a"):
        load_pycls_state(tmp_path / "junk.pyth")
    torch.save({"model_state": {"a": 1}}, tmp_path / "odd.pyth")
    with pytest.raises(CheckpointError, match="no model state"):
        load_pycls_state(tmp_path / "odd.pyth")


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["CARDRUNNER_PWNED"]),))


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CARDRUNNER_PWNED", str(marker))
    torch.save({"model_state": {"w": torch.zeros(1)}, "x": _RunsCodeWhenUnpickled()},
               tmp_path / "evil.pyth")
    with pytest.raises(CheckpointError, match="safe weights-only loading refused it"):
        load_pycls_state(tmp_path / "evil.pyth")
    assert not marker.exists()


def test_strict_load_names_the_mismatch():
    model = build_effnet(TINY)
    state = model.state_dict()
    del state["head.fc.bias"]
    state["head.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing: head\.fc\.bias.*1 unexpected"):
        load_strict(build_effnet(TINY), state)


# --------------------------------------------------------------------------- export


def test_dummy_batch_does_not_change_the_graph(tmp_path):
    model = build_effnet(TINY)
    init_random(model, 0, 32)
    for n in (2, 16):
        export_onnx(model, tmp_path / f"b{n}.onnx", input_size=32, metadata={}, dummy_batch=n)
    assert (tmp_path / "b2.onnx").read_bytes() == (tmp_path / "b16.onnx").read_bytes()


def test_verify_catches_a_wrong_model(tmp_path):
    model = build_effnet(TINY)
    init_random(model, 0, 32)
    path = tmp_path / "tiny.onnx"
    export_onnx(model, path, input_size=32, metadata={})
    assert verify_onnx(path, model) < 1e-5
    with torch.no_grad():
        model.head.fc.bias += 0.01
    with pytest.raises(ExportVerificationError, match="differs from torch by 0.01"):
        verify_onnx(path, model)


@pytest.fixture(scope="module", params=["plain", "dataparallel"])
def converted(request, tmp_path_factory):
    """An EN-B3 pycls checkpoint converted by the guide's exact command line."""
    tmp = tmp_path_factory.mktemp(f"b3-{request.param}")
    model = build_effnet(B3)
    init_random(model, 1)
    ckpt = tmp / "model_epoch_0100.pyth"
    prefix = request.param == "dataparallel"
    save_pycls_checkpoint(model, ckpt, B3_YAML.read_text(), module_prefix=prefix)
    out = tmp / "efficientnetB3.onnx"
    cmd = [sys.executable, "-m", "convert.pth2onnx", str(ckpt), str(B3_YAML), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return model, ckpt, out, proc.stdout


def test_guide_command_output_layout(converted):
    _, ckpt, out, stdout = converted
    proto = onnx.load(str(out))
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 11)]
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert (inp.name, inp.type.tensor_type.elem_type, dims) == (
        "image",
        onnx.TensorProto.FLOAT,
        ["batch", 3, 300, 300],
    )
    dims = [d.dim_param or d.dim_value for d in outp.type.tensor_type.shape.dim]
    assert (outp.name, dims) == ("class", ["batch", 1000])
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    assert read_metadata(out) == {
        "cardrunner.arch": "EN-B3",
        "cardrunner.recipe": "huawei",
        "cardrunner.weights": f"checkpoint model_epoch_0100.pyth sha256:{digest}",
        "cardrunner.input": "float32-nchw",
        "cardrunner.opset": "11",
        "cardrunner.precision": "fp32",
    }
    assert "12,233,232 parameters" in stdout and "max abs diff" in stdout


def test_guide_command_output_matches_torch(converted):
    model, _, out, _ = converted
    crops = np.random.default_rng(1).integers(0, 256, (3, 300, 300, 3), dtype=np.uint8)
    x = to_tensor(crops, HUAWEI)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = ort_run(out, x)
    assert got.shape == (3, 1000)
    assert np.max(np.abs(got - want)) < 1e-4
    assert np.max(np.abs(ort_run(out, x[:1]) - want[:1])) < 1e-4


@pytest.mark.parametrize("converted", ["plain"], indirect=True)
def test_uint8_input_matches_float_path(converted, tmp_path):
    model, _, float_onnx, _ = converted
    path = tmp_path / "u8.onnx"
    export_onnx(model, path, metadata={}, uint8_input=True, recipe=HUAWEI)
    proto = onnx.load(str(path))
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert (inp.type.tensor_type.elem_type, dims) == (
        onnx.TensorProto.UINT8,
        ["batch", 300, 300, 3],
    )
    assert read_metadata(path)["cardrunner.input"] == "uint8-nhwc"
    assert verify_onnx(path, model) < 1e-4

    crops = np.random.default_rng(2).integers(0, 256, (2, 300, 300, 3), dtype=np.uint8)
    x = to_tensor(crops, HUAWEI)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(ort_run(path, crops) - ort_run(float_onnx, x))) < 1e-5
    assert np.max(np.abs(ort_run(path, crops) - want)) < 1e-4


# --------------------------------------------------------------------------- CLI


def test_cli_random_init(tmp_path, capsys):
    out = tmp_path / "r.onnx"
    assert main([str(out), "--arch", "EN-B3", "--random-init", "--seed", "3"]) == 0
    assert read_metadata(out)["cardrunner.weights"] == "untrained (random init, seed 3)"
    assert "max abs diff" in capsys.readouterr().out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("pth2onnx: error: ") and "\n" not in err
    return err


def test_cli_errors_exit_2_in_one_line(tmp_path, capsys):
    model = build_effnet(B3)
    state = model.state_dict()
    del state["s3.b2.se.f_ex.2.bias"]
    torch.save({"epoch": 0, "model_state": state, "cfg": ""}, tmp_path / "bad.pyth")
    out = tmp_path / "x.onnx"
    assert main([str(tmp_path / "bad.pyth"), str(B3_YAML), str(out)]) == 2
    assert "1 missing: s3.b2.se.f_ex.2.bias" in _one_line_error(capsys)
    assert main([str(tmp_path / "absent.pyth"), str(B3_YAML), str(out)]) == 2
    assert "checkpoint not found" in _one_line_error(capsys)
    bad_yaml = write_yaml(tmp_path, "MODEL: {TYPE: effnet}\n")
    assert main([str(tmp_path / "bad.pyth"), str(bad_yaml), str(out)]) == 2
    assert "ACTIVATION_FUN is missing" in _one_line_error(capsys)
    assert main([str(out), "--random-init"]) == 2  # CONFIG (or --arch) left out
    assert "expected CONFIG OUT" in _one_line_error(capsys)
    assert not out.exists()


def test_cli_module_runs_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "convert.pth2onnx", str(tmp_path / "a.pyth"), str(B3_YAML), "o"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("pth2onnx: error: checkpoint not found")
    assert "Traceback" not in proc.stderr
