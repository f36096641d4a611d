"""End-to-end runs through Ray: every image scored exactly once, figures consistent."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import tiny_classifier

from runner.backends.emulated import batch_latency_ms, emulated_logits
from runner.classes import class_table, short_name
from runner.config import ConfigError, RunConfig
from runner.evaluation import Evaluator, run_evaluation
from runner.metrics import topk_indices
from runner.preprocess import get_recipe, load_crop, to_tensor
from runner.report import format_examples, format_table, write_outputs
from runner.score import score_outputs
from runner.sweep import COLUMNS


def test_onnxruntime_two_devices_score_every_image_once(ray_session, tiny_model, images64,
                                                         tmp_path):
    folder, labels = images64
    cfg = RunConfig(model=str(tiny_model), images=str(folder), labels=str(labels),
                    devices="0-1", batch_size=5, out=str(tmp_path / "run"), progress=False,
                    keep_logits=True)
    t0 = time.time()
    result = run_evaluation(cfg)
    elapsed = time.time() - t0
    perf = write_outputs(result, tmp_path / "run")
    # The timed window lies inside the call and spans every batch's runtime call.
    span = max(s.run_end for s in result.stats) - min(s.run_start for s in result.stats)
    assert span <= perf["card"]["wall_s"] + 1e-3 and perf["card"]["wall_s"] < elapsed
    written = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"result.json", "perf.json", "predictions.csv", "per_class.csv", "errors.csv",
            "journal.jsonl", "logits.npy", "timeline.png", "perf_vision_batchsize_5_device_0.txt",
            "perf_vision_batchsize_5_device_1.txt"} <= written
    five = (tmp_path / "run" / "perf_vision_batchsize_5_device_1.txt").read_text().splitlines()
    assert [line.split("]")[0] + "]" for line in five] == [
        "[e2e]", "[data read]", "[preprocess]", "[infer]", "[post]"]
    assert f"Interface throughputRate: {perf['devices'][1]['compute_fps']:.6g}" in five[3]

    with open(tmp_path / "run" / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    table = class_table()
    assert sum(int(r["images"]) for r in rows) == 64
    assert [(r["wnid"], r["name"]) for r in rows] == [table[int(r["class"])] for r in rows]
    first = format_examples(result, 1).split("  ")
    assert first[0] == result.names[result.scored[0]]
    top = result.top[result.scored[0]]
    assert first[2] == "top-5: " + ", ".join(short_name(int(c)) for c in top)

    stages = perf["stages"]
    capacity = stages["capacity_fps"]
    assert capacity["infer"] == perf["card"]["sum_compute_fps"]
    decode_s = sum(s.decode_s for s in result.stats)
    assert capacity["decode"] == pytest.approx(64 / decode_s * result.workers, rel=1e-3)
    stall_s = sum(s.stall_s for s in result.stats)
    assert all(s.stall_s >= 0 for s in result.stats)
    assert stall_s <= 2 * perf["card"]["wall_s"]  # idle time of 2 devices within the run
    assert capacity["transfer"] == (pytest.approx(64 / stall_s * 2, rel=1e-3) if stall_s else None)
    known = {k: v for k, v in capacity.items() if v}
    assert stages["bound_by"] == min(known, key=known.get)

    # runner.score on guide-style text outputs of the same logits reproduces result.json.
    dump = tmp_path / "dumpOutput_device0"
    dump.mkdir()
    logits = np.load(tmp_path / "run" / "logits.npy")
    for name, row in zip(result.names, logits, strict=True):
        (dump / f"{name.split('.')[0]}_1.txt").write_text(" ".join(f"{v}" for v in row) + " ")
    (dump / "sumary.json").write_text("{}")
    acc, skipped = score_outputs(dump, labels)
    assert acc.to_guide_json() == (tmp_path / "run" / "result.json").read_text()
    assert [Path(f).name for f, _ in skipped] == ["sumary.json"]

    journal = (tmp_path / "run" / "journal.jsonl").read_text().splitlines()[1:]
    seen = np.concatenate([json.loads(line)["indices"] for line in journal])
    assert sorted(seen.tolist()) == list(range(64))  # exactly once
    counts = {d["id"]: d["images"] for d in perf["devices"]}
    assert set(counts) == {"0", "1"} and all(c > 0 for c in counts.values())
    assert sum(counts.values()) == perf["card"]["images"] == 64

    # Predictions equal a direct single-process evaluation of the same model.
    sess = ort.InferenceSession(str(tiny_model), providers=["CPUExecutionProvider"])
    recipe = get_recipe("huawei")
    crops = np.stack([load_crop(folder / n, recipe) for n in result.names])
    expect = topk_indices(sess.run(None, {"image": to_tensor(crops, recipe)})[0])
    assert np.array_equal(result.top, expect)

    card = perf["card"]
    assert card["measured_fps"] == pytest.approx(64 / card["wall_s"], rel=1e-3)
    assert card["efficiency"] == pytest.approx(
        card["measured_fps"] / sum(d["compute_fps"] for d in perf["devices"]), abs=1e-3)
    result_json = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result_json["value"][0] == {"key": "Number of images", "value": "64"}


def test_emulated_four_chips_keep_each_image_with_its_own_logits(ray_session, images64,
                                                                   tmp_path):
    folder, labels = images64
    cfg = RunConfig(backend="emulated", images=str(folder), labels=str(labels), devices="0-3",
                    batch_size=4, out=str(tmp_path / "run"), progress=False,
                    emulated_latency_ms=2.0)
    result = run_evaluation(cfg)
    recipe = get_recipe("huawei")
    expect = np.stack([emulated_logits(load_crop(folder / n, recipe)) for n in result.names])
    assert np.array_equal(result.top, topk_indices(expect))
    perf = write_outputs(result, tmp_path / "run")
    assert perf["card"]["emulated"] and all(d["emulated"] for d in perf["devices"])
    assert len({d["id"] for d in perf["devices"] if d["images"]}) == 4


def test_pure_infer_runs_rounds_per_device(ray_session, tmp_path):
    cfg = RunConfig(backend="emulated", devices="0-1", batch_size=2, pure_infer=True, rounds=5,
                    out=str(tmp_path / "run"), progress=False, emulated_latency_ms=1.0)
    result = run_evaluation(cfg)
    assert sum(s.n for s in result.stats) == 2 * 5 * 2


def test_model_input_must_match_recipe(ray_session, tiny_model, images64, tmp_path):
    folder, labels = images64
    cfg = RunConfig(model=str(tiny_model), images=str(folder), labels=str(labels),
                    recipe="tf-lite", out=str(tmp_path / "run"), progress=False)
    with pytest.raises(ConfigError, match="224x224"):
        run_evaluation(cfg)


def test_out_dir_holding_a_run_is_refused(ray_session, tiny_model, images64, tmp_path):
    folder, labels = images64
    out = tmp_path / "run"
    out.mkdir()
    (out / "journal.jsonl").write_text("{}\n")
    cfg = RunConfig(model=str(tiny_model), images=str(folder), labels=str(labels), out=str(out),
                    progress=False)
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        run_evaluation(cfg)


def test_decoded_cache_is_built_then_hit_with_identical_predictions(ray_session, images64,
                                                                    tmp_path):
    folder, labels = images64
    runs = []
    for name in ("first", "second"):
        cfg = RunConfig(backend="emulated", images=str(folder), labels=str(labels),
                        devices="0-1", batch_size=8, out=str(tmp_path / name), progress=False,
                        emulated_latency_ms=1.0, cache=str(tmp_path / "cache"))
        runs.append(run_evaluation(cfg))
    assert [r.cache for r in runs] == ["built", "hit"]
    assert np.array_equal(runs[0].top, runs[1].top) and (runs[0].top >= 0).all()


def test_uint8_model_gets_raw_crops(ray_session, images64, tmp_path):
    folder, labels = images64
    model = tiny_classifier(tmp_path / "u8.onnx", uint8_nhwc=True)
    cfg = RunConfig(model=str(model), images=str(folder), labels=str(labels), devices="0-3",
                    batch_size=6, out=str(tmp_path / "run"), progress=False, pin_cores=True)
    result = run_evaluation(cfg)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    recipe = get_recipe("huawei")
    crops = np.stack([load_crop(folder / n, recipe) for n in result.names])
    assert np.array_equal(result.top, topk_indices(sess.run(None, {"image": crops})[0]))


def test_emulated_latency_follows_the_guides_table():
    assert batch_latency_ms(16) == 95.2 and batch_latency_ms(1) == 8.29
    assert batch_latency_ms(12) == pytest.approx(48.4 + (95.2 - 48.4) * 4 / 8)
    assert batch_latency_ms(64) == pytest.approx(186.9 + (186.9 - 95.2) * 2)


def test_a_batch_size_sweep_writes_the_guides_table(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "runner.evaluate", "--backend", "emulated", "--devices", "0-3",
         "--batch-size", "1,4,16", "--pure-infer", "--rounds", "6", "--out", str(out),
         "--no-progress"], env=dict(os.environ),
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["batch_size"] for r in rows] == [1, 4, 16]
    assert all(set(r) == set(COLUMNS) for r in rows)
    for r in rows:
        perf = json.loads((out / f"bs{r['batch_size']}" / "perf.json").read_text())
        assert r["measured_fps"] == perf["card"]["measured_fps"] and r["emulated"]
        assert r["devices"] == 4 and len(r["per_chip_compute_fps"]) == 4
        # The emulated chip sleeps the guide's latency per batch: p50 is at least that.
        assert r["p50_batch_ms"] >= batch_latency_ms(r["batch_size"]) <= r["p99_batch_ms"]
    with open(out / "sweep.csv", newline="") as f:
        assert [int(row["batch_size"]) for row in csv.DictReader(f)] == [1, 4, 16]
    assert (out / "sweep.png").stat().st_size > 0
    table = proc.stdout[proc.stdout.index("== sweep"):].splitlines()
    assert table[1].split()[:3] == ["batch", "one", "chip"]
    assert [line.split()[0] for line in table[2:5]] == ["1", "4", "16"]
    assert "EMULATED 310 latency model" in table[-2]


def test_a_sweep_keeps_its_device_actors(ray_session, tmp_path):
    with Evaluator() as evaluator:
        results = [evaluator.run(RunConfig(backend="emulated", devices="0-1", batch_size=bs,
                                           pure_infer=True, rounds=3, progress=False,
                                           emulated_latency_ms=0.0, out=str(tmp_path / str(bs))),
                                 keep_devices=True) for bs in (1, 2)]
        pids = [sorted(d["pid"] for d in r.devices) for r in results]
        assert pids[0] == pids[1]  # the same actors, warmed up again at the new size
        other = evaluator.run(RunConfig(backend="emulated", devices="0-1", batch_size=2,
                                        pure_infer=True, rounds=3, progress=False,
                                        emulated_latency_ms=1.0, out=str(tmp_path / "o")))
        assert sorted(d["pid"] for d in other.devices) != pids[0]  # another device setup
    assert evaluator.devices == []
    assert [r.batches_per_call for r in results] == [64, 64]  # free batches: the cap


def test_driver_cost_is_reported_and_can_bound_the_run(ray_session, tmp_path):
    # Free chips and one batch per call: nothing but the driver limits the card.
    cfg = RunConfig(backend="emulated", devices="0-3", batch_size=1, pure_infer=True, rounds=40,
                    batches_per_call=1, emulated_latency_ms=0.0, out=str(tmp_path / "r"),
                    progress=False)
    result = run_evaluation(cfg)
    perf = write_outputs(result, tmp_path / "r")
    driver = perf["driver"]
    assert driver["calls"] == 160 and driver["batches_per_call"] == 1
    assert driver["cpu_s"] > 0 and 0 < driver["wall_share"] <= 2  # the process's threads
    assert driver["cpu_s_per_1000_images"] == pytest.approx(1000 * driver["cpu_s"] / 160,
                                                            rel=1e-3)
    assert perf["stages"]["capacity_fps"]["orchestration"] == pytest.approx(
        160 / result.outcome.cpu_s, rel=1e-3)
    assert perf["stages"]["bound_by"] == "orchestration"
    assert "bound by orchestration" in format_table(perf, None)
    # Start-up (this run's start -> its first device call) in parts, outside every figure.
    assert {"checks and image list", "ray", "devices (actors, model load)", "warm-up",
            "payload", "other"} <= set(perf["parts"])
    assert perf["startup_s"] == pytest.approx(sum(perf["parts"].values()), abs=0.01)
    assert perf["startup_s"] > perf["parts"]["devices (actors, model load)"] > 0
    assert perf["teardown_s"] >= 0 and "start-up " in format_table(perf, None)
