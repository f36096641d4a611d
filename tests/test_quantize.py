"""convert.quantize: real Lite0 weights calibrated on real ImageNet images, and its errors."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import VAL_ORIG, needs_val_orig, tiny_classifier
from onnx import numpy_helper

from convert.lite2onnx import main as lite2onnx
from convert.quantize import feeds, load_calibration, main, session
from runner.preprocess import get_recipe, reference_tensor


def lite0_models(tmp_path_factory) -> tuple[Path, Path, str]:
    """(fp32 Lite0, its INT8 model calibrated on val_orig, what quantize printed), made once
    per session and shared with test_compare."""
    root = tmp_path_factory.getbasetemp() / "lite0_precision"
    fp32, int8, log = root / "lite0.onnx", root / "lite0_int8.onnx", root / "quantize.log"
    if not int8.exists():
        root.mkdir(exist_ok=True)
        assert lite2onnx(["--variant", "lite0", str(fp32)]) == 0
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main([str(fp32), str(int8), "--calibrate", str(VAL_ORIG)])
        log.write_text(printed.getvalue())
        assert code == 0, printed.getvalue()
    return fp32, int8, log.read_text()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A real (random-weight) 300 px classifier without cardrunner metadata."""
    return tiny_classifier(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _opset(path: Path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain == "")


@needs_val_orig
def test_lite0_int8_carries_the_metadata_and_agrees_with_fp32(tmp_path_factory):
    fp32, int8, log = lite0_models(tmp_path_factory)
    lines = log.splitlines()
    assert lines[0].startswith(f"calibration: 20 images of {VAL_ORIG} (fewer than --count 512)")
    assert "int8 7-bit per-channel weights" in lines[1]
    assert lines[2].startswith("verified: INT8 vs float top-1 agreement ")

    before, after = _meta(fp32), _meta(int8)
    changed = {"cardrunner.precision": "int8", "cardrunner.opset": "13"}
    assert {k: after[k] for k in before} == {**before, **changed}
    assert after["cardrunner.quantization"].endswith("calibrated on 20 images of val_orig/ "
                                                     "(recipe tf-lite)")
    assert _opset(fp32) == 11 and _opset(int8) == 13

    proto = onnx.load(str(int8))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 49
    dq = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    for conv in convs:  # every conv weight: int8, one scale per output channel, 7 bits
        weight = dq[conv.input[1]]
        q, scale = inits[weight.input[0]], inits[weight.input[1]]
        assert q.dtype == np.int8 and scale.shape == (q.shape[0],)
        assert q.min() >= -64 and q.max() <= 64
    assert int8.stat().st_size < fp32.stat().st_size / 3

    # Independently of the tool's own check: both models on the images' reference tensors.
    recipe = get_recipe("tf-lite")
    x = np.stack([reference_tensor(p, recipe) for p in sorted(VAL_ORIG.glob("*.JPEG"))])
    a = session(fp32).run(None, {"image": x})[0]
    b = session(int8).run(None, {"image": x})[0]
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.8
    assert 0 < np.max(np.abs(a - b)) < 5  # really quantized, not broken


@needs_val_orig
def test_calibration_feeds_the_runners_tensors():
    recipe = get_recipe("tf-lite")
    calibration = load_calibration(VAL_ORIG, recipe, 3)
    names = sorted(p.name for p in VAL_ORIG.glob("*.JPEG"))[:3]
    assert calibration.names == names
    (batch,) = feeds(calibration, recipe, False, "image", 16)
    want = np.stack([reference_tensor(VAL_ORIG / n, recipe) for n in names])
    np.testing.assert_array_equal(batch["image"], want)
    (raw,) = feeds(calibration, recipe, True, "image", 16)  # a uint8-input model: the crops
    assert raw["image"].dtype == np.uint8 and raw["image"].shape == (3, 224, 224, 3)


@needs_val_orig
@pytest.mark.parametrize(("flags", "opset", "words"), [
    (["--per-tensor"], 11, "(minmax), int8 7-bit per-tensor"),
    (["--method", "percentile", "--weight-bits", "8"], 13, "(percentile 99.999), int8 8-bit "
     "per-channel"),
    (["--method", "entropy"], 13, "(entropy), int8 7-bit per-channel"),
])
def test_settings_are_applied_and_recorded(tiny, tmp_path, capsys, flags, opset, words):
    out = tmp_path / "q.onnx"
    assert main([str(tiny), str(out), "--calibrate", str(VAL_ORIG), "--count", "6",
                 "--preprocess", "huawei", "--min-agreement", "0", *flags]) == 0
    assert words in capsys.readouterr().out
    assert _opset(out) == opset
    meta = _meta(out)
    assert meta["cardrunner.precision"] == "int8" and words in meta["cardrunner.quantization"]
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@needs_val_orig
def test_broken_calibration_images_are_listed_and_skipped(tiny, tmp_path, capsys):
    images = tmp_path / "calib"
    images.mkdir()
    for p in sorted(VAL_ORIG.glob("*.JPEG"))[:2]:
        shutil.copy(p, images)
    (images / "ILSVRC2012_val_00000000.JPEG").write_bytes(b"not a jpeg")
    assert main([str(tiny), str(tmp_path / "q.onnx"), "--calibrate", str(images),
                 "--preprocess", "huawei", "--min-agreement", "0"]) == 0
    out = capsys.readouterr().out
    assert f"calibration: 2 images of {images}" in out
    assert "  not used: ILSVRC2012_val_00000000.JPEG: cannot decode" in out


@needs_val_orig
def test_below_min_agreement_the_model_is_removed(tiny, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main([str(tiny), str(out), "--calibrate", str(VAL_ORIG), "--count", "4",
                 "--preprocess", "huawei", "--min-agreement", "1.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below --min-agreement 101%" in err[0]
    assert not out.exists()


def test_errors_exit_2_with_one_line(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.JPEG").write_bytes(b"")
    fp16 = tmp_path / "fp16.onnx"
    proto = onnx.load(str(tiny))
    onnx.helper.set_model_props(proto, {"cardrunner.precision": "fp16",
                                        "cardrunner.recipe": "huawei"})
    onnx.save(proto, str(fp16))
    cases = [
        ([str(tmp_path / "no.onnx"), "o.onnx", "--calibrate", str(empty)],
         f"MODEL: {tmp_path / 'no.onnx'} does not exist"),
        ([str(tiny), "o.onnx", "--calibrate", str(empty)],
         f"MODEL: {tiny} names no cardrunner.recipe; pass --preprocess"),
        ([str(tiny), "o.onnx", "--calibrate", str(tmp_path / "none"), "--preprocess", "huawei"],
         f"--calibrate: {tmp_path / 'none'} is not a directory"),
        ([str(tiny), "o.onnx", "--calibrate", str(empty), "--preprocess", "huawei"],
         f"--calibrate: no usable images in {empty} (broken.JPEG: empty file (0 bytes))"),
        ([str(fp16), "o.onnx", "--calibrate", str(empty)],
         f"MODEL: {fp16} is fp16; quantize the fp32 model"),
        ([str(tiny), "o.onnx", "--calibrate", str(empty), "--preprocess", "nope"],
         "unknown preprocessing recipe 'nope'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"quantize: error: {message}"), err

