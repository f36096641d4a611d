"""convert.onnx2om and convert.aipp against a fake ``atc`` (tests/fake_atc/atc).

Real ATC has not been run by these tests: they check the argv we hand ATC against the
guide's command (REFERENCE.md 2), the manifest, the error paths, and that the AIPP numbers
reproduce ``runner.preprocess`` with the chip's fp16 loads and arithmetic modelled in numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from convert.aipp import aipp_config_text, aipp_params, write_aipp_config
from runner.preprocess import get_recipe, to_tensor

REPO = Path(__file__).resolve().parents[1]
FAKE_ATC_DIR = REPO / "tests" / "fake_atc"
ATC_MISSING = (
    "onnx2om: error: atc not found on PATH; "
    "source /usr/local/Ascend/ascend-toolkit/set_env.sh (CANN) first"
)


def make_onnx(path: Path, batch: int | str = "batch", recipe: str = "huawei") -> Path:
    """A tiny model with the exported EN-B3's interface: image [N,3,300,300] -> class."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 300, 300])
    out = helper.make_tensor_value_info("class", TensorProto.FLOAT, [batch, 3])
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["class"]),
        ],
        "tiny",
        [image],
        [out],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    helper.set_model_props(model, {"cardrunner.recipe": recipe, "cardrunner.arch": "tiny"})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_onnx(tmp_path / "tiny.onnx")


def run_cli(
    args: list[str], tmp_path: Path, *, atc: bool = True, cann_env: bool = True, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m convert.onnx2om`` with a controlled PATH and CANN environment."""
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FAKE_ATC_", "ASCEND_")) and k != "PATH"
    }
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    # The fake atc's shebang needs python3 on PATH; nothing else from the host PATH.
    dirs = [FAKE_ATC_DIR] if atc else [empty]
    full["PATH"] = os.pathsep.join(str(d) for d in [*dirs, Path(sys.executable).parent])
    full["PYTHONPATH"] = str(REPO)
    full["HOME"] = str(tmp_path / "home")  # where ATC's log goes by default
    full["FAKE_ATC_LOG"] = str(tmp_path / "atc.jsonl")
    if cann_env:
        full["ASCEND_TOOLKIT_HOME"] = str(tmp_path / "cann")
        full["ASCEND_OPP_PATH"] = str(tmp_path / "cann" / "opp")
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "convert.onnx2om", *args],
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )


def atc_calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "atc.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_fake_atc_is_executable() -> None:
    assert os.access(FAKE_ATC_DIR / "atc", os.X_OK)


def test_two_batch_sizes_run_the_guides_atc_commands(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "om"
    args = [str(model), "--batch-sizes", "1,16", "--soc", "Ascend310", "--out", str(out)]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr

    calls = atc_calls(tmp_path)
    assert len(calls) == 2
    for bs, argv in zip((1, 16), calls, strict=True):
        assert argv[1:] == [
            "--framework=5",
            f"--model={model}",
            "--input_format=NCHW",
            f"--input_shape=image:{bs},3,300,300",
            f"--output={out / f'tiny_bs{bs}'}",
            "--log=debug",
            "--soc_version=Ascend310",
        ]
        # Printed before it ran, as one shell-pasteable line.
        assert shlex.join(["atc", *argv[1:]]) in proc.stdout.splitlines()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"] == {"1": "tiny_bs1.om", "16": "tiny_bs16.om"}
    for name in manifest["models"].values():
        assert "FAKE" in (out / name).read_text()
    assert manifest["onnx"] == str(model.resolve())
    assert manifest["onnx_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert manifest["atc_flags"]["16"] == ["atc", *calls[1][1:]]
    assert manifest["input"] == {
        "name": "image",
        "dtype": "float32",
        "layout": "NCHW",
        "shape": [-1, 3, 300, 300],
    }
    assert manifest["recipe"] == "huawei"
    assert manifest["arch"] == "tiny"
    assert manifest["soc"] == "Ascend310"
    assert manifest["precision"] == "force_fp16"
    assert manifest["aipp"] is False
    assert manifest["created"]


def test_auto_tune_precision_and_log_flags(model: Path, tmp_path: Path) -> None:
    args = [str(model), "--batch-sizes", "1,16", "--out", str(tmp_path / "om"), "--auto-tune"]
    args += ["--precision", "allow_fp32_to_fp16", "--log", "error"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    for argv in atc_calls(tmp_path):  # a bare --auto-tune tunes every batch size
        assert argv[-4:] == [
            "--log=error",
            "--soc_version=Ascend310",
            "--auto_tune_mode=RL,GA",
            "--precision_mode=allow_fp32_to_fp16",
        ]
    manifest = json.loads((tmp_path / "om" / "manifest.json").read_text())
    assert manifest["precision"] == "allow_fp32_to_fp16"


def test_guide_command_line_for_bs16_only_tuned(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "om"
    args = [str(model), "--batch-sizes", "1,16", "--out", str(out), "--auto-tune", "16"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    bs1, bs16 = atc_calls(tmp_path)
    assert not any(a.startswith("--auto_tune_mode") for a in bs1)
    # The guide's line (REFERENCE.md section 2), flag for flag, with our paths.
    guide = ('atc --framework=5 --model=M --input_format=NCHW --input_shape="image:16,3,300,300" '
             '--output=O --log=debug --soc_version=Ascend310 --auto_tune_mode="RL,GA"')
    expected = shlex.split(guide.replace("=M ", f"={model} ").replace("=O ", f"={out}/tiny_bs16 "))
    assert ["atc", *bs16[1:]] == expected

    bad = run_cli([*args[:-1], "8"], tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "onnx2om: error: --auto-tune 8: not among --batch-sizes 1,16"


def test_aipp_flag_writes_config_and_uint8_manifest(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "om"
    proc = run_cli([str(model), "--batch-sizes", "1", "--out", str(out), "--aipp"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (argv,) = atc_calls(tmp_path)
    cfg = out / "tiny_aipp.cfg"
    assert argv[-1] == f"--insert_op_conf={cfg}"
    assert cfg.read_text() == aipp_config_text(get_recipe("huawei"), 300)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["aipp"] is True
    assert manifest["input"]["dtype"] == "uint8"
    assert manifest["input"]["layout"] == "NHWC"
    assert manifest["input"]["shape"] == [-1, 300, 300, 3]


def parse_aipp(text: str) -> dict[str, str]:
    body = re.search(r"aipp_op\s*\{(.*)\}", text, re.S)
    assert body is not None
    lines = (line.split("#")[0] for line in body.group(1).splitlines())
    return dict(re.match(r"\s*(\w+)\s*:\s*(\S+)", ln).groups() for ln in lines if ln.strip())


def chip_fp16(value: float) -> float:
    """A config value as the AIPP kernel loads it: float32 in the file, fp16 in the register
    (aipp_comm.py ``get_fp16``: numpy.float16, round to nearest even)."""
    return float(np.float16(np.float32(value)))


def chip_aipp(pixels: np.ndarray, mean_chn: int, min_chn: float, var_reci: float) -> np.ndarray:
    """One channel through AIPP's data type conversion as modelled here: the int16 mean is
    subtracted exactly, then fp16 ``- min_chn`` and ``* var_reci_chn``, each result rounded to
    fp16 (computed in float64 first, so each step is rounded once)."""
    d = pixels.astype(np.int64) - mean_chn
    t = np.float16(d.astype(np.float64) - chip_fp16(min_chn))
    return np.float16(t.astype(np.float64) * chip_fp16(var_reci)).astype(np.float64)


AIPP_RECIPES = ["huawei", "tf-lite", "tf-lite-240", "tf-lite-260"]


@pytest.mark.parametrize("name", AIPP_RECIPES)
def test_aipp_offsets_on_the_chip_are_within_0_005_levels(name: str) -> None:
    """The fixed per-channel offset, as the chip holds it, is 255 x mean (x scale) to 0.005
    pixel levels: mean_chn carries the integer part, min_chn the fraction (fp16 near 0)."""
    recipe = get_recipe(name)
    params = aipp_params(recipe)
    order = [2, 1, 0] if params["rbuv_swap_switch"] else [0, 1, 2]
    for i, src in enumerate(order):
        mean_chn = params[f"mean_chn_{i}"]
        assert isinstance(mean_chn, int) and 0 <= mean_chn <= 255
        assert 0.0 <= params[f"min_chn_{i}"] < 1.0
        on_chip = mean_chn + chip_fp16(params[f"min_chn_{i}"])
        assert abs(on_chip - recipe.scale * recipe.mean[src]) <= 0.005, (name, i)


@pytest.mark.parametrize("name", AIPP_RECIPES)
def test_aipp_reproduces_the_recipe_in_fp16_for_every_uint8_level(
    name: str, tmp_path: Path
) -> None:
    recipe = get_recipe(name)
    fields = parse_aipp(write_aipp_config(recipe, recipe.crop, tmp_path / "aipp.cfg").read_text())
    assert fields["input_format"] == "RGB888_U8"
    assert fields["src_image_size_w"] == fields["src_image_size_h"] == str(recipe.crop)
    assert fields["csc_switch"] == "false"
    swap = fields["rbuv_swap_switch"] == "true"
    assert swap == (recipe.channels == "BGR")

    # Distinct levels per channel so that a wrong swap cannot pass.
    k = np.arange(256)
    rgb = np.stack([k, 255 - k, (k * 7) % 256], axis=-1).astype(np.uint8)  # [256, 3]
    expected = to_tensor(rgb[None, None], recipe)[0, :, 0, :]  # [3, 256], model channel order

    pixels = rgb[:, ::-1] if swap else rgb  # AIPP swaps R/B before normalising
    for i in range(3):
        chip = chip_aipp(pixels[:, i], int(fields[f"mean_chn_{i}"]),
                         float(fields[f"min_chn_{i}"]), float(fields[f"var_reci_chn_{i}"]))
        # fp16 arithmetic, not the float32 host path: within one fp16 step at |y| ~ 2 (2^-9).
        np.testing.assert_allclose(chip, expected[i], rtol=0, atol=2.0**-9)


def test_aipp_params_huawei_values() -> None:
    params = aipp_params(get_recipe("huawei"))
    assert params["rbuv_swap_switch"] is True
    # Channel 0 is blue after the swap: 255 x 0.406 = 103.53 = 103 + 0.53.
    assert params["mean_chn_0"] == 103
    assert params["min_chn_0"] == pytest.approx(255 * 0.406 - 103)
    assert params["var_reci_chn_0"] == pytest.approx(1 / (255 * 0.225))
    assert (params["mean_chn_1"], params["mean_chn_2"]) == (116, 123)
    assert params["min_chn_2"] == pytest.approx(255 * 0.485 - 123)


def test_aipp_refuses_float_recipe() -> None:
    with pytest.raises(ValueError, match="uint8"):
        aipp_params(get_recipe("pycls"))


@pytest.mark.parametrize(
    ("atc", "cann_env"), [(False, True), (True, False)], ids=["no-atc", "no-set_env"]
)
def test_missing_atc_is_one_line_exit_2(
    model: Path, tmp_path: Path, atc: bool, cann_env: bool
) -> None:
    proc = run_cli(
        [str(model), "--out", str(tmp_path / "om")], tmp_path, atc=atc, cann_env=cann_env
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [ATC_MISSING]
    assert atc_calls(tmp_path) == []


def test_dry_run_needs_no_atc(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "om"
    args = [str(model), "--batch-sizes", "1,16", "--out", str(out), "--dry-run", "--aipp"]
    proc = run_cli(args, tmp_path, atc=False, cann_env=False)
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if line.startswith("atc ")]
    assert len(commands) == 2
    assert "--input_shape=image:16,3,300,300" in shlex.split(commands[1])
    assert not out.exists()


def test_atc_failure_names_the_batch_size_and_where_its_log_went(
    model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "om"
    proc = run_cli(
        [str(model), "--batch-sizes", "16", "--out", str(out)], tmp_path, FAKE_ATC_EXIT="1"
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()[-1:]
    log_root = tmp_path / "home" / "ascend" / "log"
    assert line == (
        "onnx2om: error: atc failed for batch size 16 (exit code 1); its log is under "
        f"{log_root} (ASCEND_SLOG_PRINT_TO_STDOUT=1 prints it here instead)"
    )
    assert list(log_root.rglob("plog-*.log"))  # and that is where the detailed log is
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize(
    ("env", "log_root"),
    [({"ASCEND_PROCESS_LOG_PATH": "plogs"}, "plogs"),
     ({"ASCEND_WORK_PATH": "work", "ASCEND_PROCESS_LOG_PATH": ""}, "work/log")],
)
def test_atc_log_location_follows_canns_variables(
    model: Path, tmp_path: Path, env: dict[str, str], log_root: str
) -> None:
    env = {k: str(tmp_path / v) if v else v for k, v in env.items()}
    proc = run_cli([str(model), "--batch-sizes", "1", "--out", str(tmp_path / "om")], tmp_path,
                   FAKE_ATC_EXIT="3", **env)
    assert proc.returncode == 2
    assert f"its log is under {tmp_path / log_root} (" in proc.stderr
    assert list((tmp_path / log_root).rglob("plog-*.log"))


def test_atc_log_printed_to_stdout_or_not_kept(model: Path, tmp_path: Path) -> None:
    args = [str(model), "--batch-sizes", "1", "--out", str(tmp_path / "om")]
    proc = run_cli(args, tmp_path, FAKE_ATC_EXIT="1", ASCEND_SLOG_PRINT_TO_STDOUT="1")
    assert proc.stderr.strip().endswith("its log is above (ASCEND_SLOG_PRINT_TO_STDOUT=1)")
    assert "[ERROR] GE(" in proc.stdout
    proc = run_cli([*args, "--log", "null"], tmp_path, FAKE_ATC_EXIT="1")
    assert proc.stderr.strip().endswith("ATC kept no log (--log null); rerun with --log error")
    assert not (tmp_path / "home" / "ascend").exists()


def test_om_named_for_os_and_cpu_is_accepted_and_listed(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "om"
    proc = run_cli([str(model), "--batch-sizes", "1,16", "--out", str(out)], tmp_path,
                   FAKE_ATC_OM_SUFFIX="_linux_x86_64")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"] == {"1": "tiny_bs1_linux_x86_64.om",
                                  "16": "tiny_bs16_linux_x86_64.om"}


def test_missing_om_after_atc_success_lists_what_was_written(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "om"
    args = [str(model), "--batch-sizes", "1", "--out", str(out)]
    proc = run_cli(args, tmp_path, FAKE_ATC_SKIP_OM="1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"onnx2om: error: atc exited 0 for batch size 1 but wrote no {out / 'tiny_bs1'}.om "
        f"(or tiny_bs1_<os>_<cpu>.om); in {out} it wrote nothing"
    )
    proc = run_cli(args, tmp_path, FAKE_ATC_OM_SUFFIX="-v2")
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"in {out} it wrote tiny_bs1-v2.om")
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("suffix", ["", "_linux_aarch64"])
def test_om_left_by_an_earlier_run_does_not_pass_for_this_one(
    model: Path, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / "om"
    args = [str(model), "--batch-sizes", "1", "--out", str(out)]
    assert run_cli(args, tmp_path, FAKE_ATC_OM_SUFFIX=suffix).returncode == 0
    assert (out / f"tiny_bs1{suffix}.om").is_file()
    proc = run_cli(args, tmp_path, FAKE_ATC_SKIP_OM="1")
    assert proc.returncode == 2
    assert "wrote no" in proc.stderr
    assert not (out / f"tiny_bs1{suffix}.om").exists()
    assert not (out / "manifest.json").exists()


def test_fixed_batch_onnx_refuses_other_batch_sizes(tmp_path: Path) -> None:
    fixed = make_onnx(tmp_path / "fixed.onnx", batch=16)
    proc = run_cli([str(fixed), "--batch-sizes", "1,16", "--out", str(tmp_path / "om")], tmp_path)
    assert proc.returncode == 2
    assert "batch axis is fixed at 16" in proc.stderr
    assert atc_calls(tmp_path) == []
