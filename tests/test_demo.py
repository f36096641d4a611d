"""The README's demo command, shrunk: synthetic JPEGs + random-init EN-B3 on two devices."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_ray_lifecycle import ANSI, DEFAULT_ENV, RAY_LINE

pytest.importorskip("torch")  # the demo builds its model with the converter
ROOT = Path(__file__).resolve().parents[1]
DEVICE_COLOURS = [(31, 119, 180), (255, 127, 14)]  # matplotlib C0, C1: device rows 0, 1


def run_demo(cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    # Ray's own defaults, as in a user's shell (DEFAULT_ENV has no RAY_* variable).
    env = dict(DEFAULT_ENV, CARDRUNNER_CACHE=str(cache), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "runner.evaluate", "--demo", "--devices", "0-1", "--limit",
           "24", "--batch-size", "4", "--no-progress"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_demo_writes_every_file_and_runs_again(tmp_path):
    first = run_demo(tmp_path, tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    assert "UNTRAINED" in first.stdout
    # A quiet first screen: every line is cardrunner's (Ray 2.60 printed "Token
    # authentication is enabled for this Ray cluster..." on every run).
    lines = [ANSI.sub("", line) for line in re.split(r"[\r\n]+", first.stdout + first.stderr)]
    assert [line for line in lines if RAY_LINE.search(line)] == []
    out = tmp_path / "runs" / "demo"
    written = {p.name for p in out.iterdir()}
    assert {"result.json", "perf.json", "predictions.csv", "per_class.csv", "errors.csv",
            "journal.jsonl", "perf_vision_batchsize_4_device_0.txt",
            "perf_vision_batchsize_4_device_1.txt"} <= written
    perf = json.loads((out / "perf.json").read_text())
    assert perf["accuracy"]["scored"] == 24
    assert len(perf["devices"]) == 2 and all(d["images"] > 0 for d in perf["devices"])
    assert sum(d["images"] for d in perf["devices"]) == 24
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("timeline.png skipped" in n for n in perf["notes"])
    else:
        pixels = np.asarray(Image.open(out / "timeline.png").convert("RGB"))
        upper = pixels[: pixels.shape[0] // 2].reshape(-1, 3)  # the busy-interval panel
        for colour in DEVICE_COLOURS:
            assert (upper == colour).all(axis=1).sum() > 100, f"no bars of colour {colour}"

    again = run_demo(tmp_path, tmp_path / "cache")  # the demo replaces its own folder
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "perf.json").read_text())["accuracy"]["scored"] == 24
