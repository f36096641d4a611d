"""End-to-end runs through Ray: every image scored exactly once, figures consistent."""

import csv
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import tiny_classifier

from runner.backends.emulated import batch_latency_ms, emulated_logits
from runner.classes import class_table, short_name
from runner.config import ConfigError, RunConfig
from runner.devices import NodeInfo
from runner.evaluation import run_evaluation
from runner.metrics import topk_indices
from runner.pipeline import plan_batches, plan_shards
from runner.preprocess import get_recipe, load_crop, to_tensor
from runner.report import format_examples, write_outputs
from runner.score import score_outputs


def test_plan_batches_interleaves_shards_and_covers_everything():
    batches = plan_batches([5, 3], 2)
    assert [(b.shard, b.start, b.stop) for b in batches] == [
        (0, 0, 2), (1, 0, 2), (0, 2, 4), (1, 2, 3), (0, 4, 5)]
    assert [b.id for b in batches] == list(range(5))


def test_plan_shards_keeps_each_hosts_images_on_that_host():
    host1 = NodeInfo("id1", "host1", "h1", "10.0.0.1", cpus=4, devices=3)
    host2 = NodeInfo("id2", "host2", "h2", "10.0.0.2", cpus=2, devices=1)
    todo = [(i, f"img{i}.jpg") for i in range(100)]
    planned = plan_shards(todo, [host1, host1, host1, host2], batch_size=4, workers=None)
    by_node = {}
    for node, shard, cpus in planned:
        by_node.setdefault(node.name, []).append(shard)
        assert 0 < cpus <= 1
    # 3 of 4 devices on host1: 3/4 of the images, cut at a whole batch (19 x 4 = 76).
    assert sum(map(len, by_node["host1"])) == 76 and sum(map(len, by_node["host2"])) == 24
    assert len(by_node["host1"]) == 4 and len(by_node["host2"]) == 2  # one actor per core
    assert [item for _, shard, _ in planned for item in shard] == todo  # each image once
    assert all(len(shard) % 4 == 0 for shards in by_node.values() for shard in shards[:-1])

    sizes = [len(shard) for _, shard, _ in planned]
    batches = plan_batches(sizes, 4, [node.name for node, _, _ in planned])
    assert sum(b.stop - b.start for b in batches if b.node == "host1") == 76
    assert plan_shards(todo, [host1], 4, workers=1, cpu_inference=True)[0][2] == 1.0


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
