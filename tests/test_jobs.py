import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner.config import ConfigError
from runner.evaluate import build_parser, job_from_args
from runner.jobs import Gates, check_gates, load_job

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_b3_job_loads_with_guide_settings():
    job = load_job(ROOT / "jobs" / "efficientnet_b3_ascend310.toml")
    assert job.batch_sizes == [1, 16]
    assert job.gates == Gates(top1=77.53, top5=93.486, tolerance=1.0)
    cfg = job.config_for(16)
    assert (cfg.backend, cfg.devices, cfg.recipe, cfg.batch_size) == ("acl", "0-3", "huawei", 16)
    assert cfg.images == "/root/datasets/imagenet/val"
    assert cfg.out.endswith("bs16") and Path(cfg.model).name == "manifest.json"


def test_job_rejects_unknown_keys_and_bad_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\ndevise = '0-3'\n")
    with pytest.raises(ConfigError, match="unknown key.*devise"):
        load_job(bad)
    bad.write_text("[run\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_job(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "missing.toml")
    bad.write_text("[run]\nmax_errors = 'x'\n")
    with pytest.raises(ConfigError, match="invalid literal"):
        load_job(bad)
    bad.write_text("[model.by_batch_size]\na = 'x.om'\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_job(bad)


def test_gates_name_the_gap():
    gates = Gates(top1=77.53, top5=93.486, tolerance=1.0, min_fps=100)
    assert check_gates(gates, {"top1": 76.6, "top5": 93.0}, 120) == []
    assert gates.describe() == "top1 >= 76.53%, top5 >= 92.486%, card >= 100 img/s"
    assert Gates().describe() == ""
    failures = check_gates(gates, {"top1": 75.0, "top5": 93.0}, 50)
    assert failures[0] == "top1 gate failed: 75.00% is 2.53 points below 77.53 (tolerance 1.0)"
    assert failures[1].startswith("speed gate failed: card 50.00 img/s is 50.00 below")


def test_missed_top1_gate_exits_3(ray_session, tiny_model, images64, tmp_path):
    folder, labels = images64
    job = tmp_path / "job.toml"
    job.write_text(f"""
[run]
devices = "0-1"
batch_sizes = [8]
out = "run"
[model]
path = "{tiny_model}"
[data]
images = "{folder}"
labels = "{labels}"
[gates]
top1 = 77.53
""")
    proc = subprocess.run([sys.executable, "-m", "runner.evaluate", "--job", str(job),
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr
    assert "top1 gate failed" in proc.stderr and "points below 77.53" in proc.stderr
    assert (tmp_path / "run" / "result.json").exists()
    # A flag overrides the job's gate: the same accuracy then passes.
    perf = json.loads((tmp_path / "run" / "perf.json").read_text())
    assert check_gates(job_from_args(build_parser().parse_args(["--job", str(job)])).gates,
                       perf["accuracy"], None)
    flagged = job_from_args(build_parser().parse_args(["--job", str(job), "--expect-top1", "0"]))
    assert flagged.gates.top1 == 0 and check_gates(flagged.gates, perf["accuracy"], None) == []


def test_a_job_whose_model_is_not_made_yet_names_the_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runner.evaluate", "--job",
                           str(ROOT / "jobs" / "lite0_imagenet_sample.toml"), "--model",
                           str(tmp_path / "missing.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2 and "python -m convert" not in proc.stderr  # not the job's model
    job = load_job(ROOT / "jobs" / "lite0_imagenet_sample.toml")
    assert job.missing_model(str(tmp_path / "nope.onnx")) == (
        f"--model: {tmp_path / 'nope.onnx'} does not exist yet; the job "
        f"{ROOT / 'jobs' / 'lite0_imagenet_sample.toml'} makes it with: "
        "python -m convert.lite2onnx --variant lite0 runs/models/efficientnet_lite0.onnx")
    b3 = load_job(ROOT / "jobs" / "efficientnet_b3_ascend310.toml")
    assert [c.split()[2] for c in b3.make_model] == ["convert.pth2onnx", "convert.onnx2om"]
    assert b3.missing_model(str(ROOT / "jobs")) is None  # it exists
