"""Nothing lost: dying devices, a killed driver, broken images, bad configuration."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import journal_indices, write_images
from PIL import Image

from runner.actors import Device, Part, Payload
from runner.backends.emulated import emulated_logits
from runner.config import RunConfig
from runner.devices import DeviceRef, NodeInfo
from runner.driver import DeviceState, Driver
from runner.evaluation import run_evaluation
from runner.metrics import topk_indices
from runner.planning import plan_batches
from runner.preprocess import get_recipe, load_crop
from runner.report import write_outputs

ROOT = Path(__file__).resolve().parents[1]
LOCAL = NodeInfo("local", "local", "localhost", "127.0.0.1", cpus=2, devices=1)


def expected_top(folder, names):
    recipe = get_recipe("huawei")
    return topk_indices(np.stack([emulated_logits(load_crop(folder / n, recipe)) for n in names]))


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_a_failing_chip_is_dropped_and_its_batches_move(ray_session, images64, tmp_path, mode):
    folder, labels = images64
    out = tmp_path / "run"
    cfg = RunConfig(backend="emulated", images=str(folder), labels=str(labels), devices="0-3",
                    batch_size=2, batches_per_call=1, out=str(out), progress=False,
                    emulated_latency_ms=5.0,
                    backend_extra={"2": {"fault": {"after": 4, "mode": mode}}})  # 2 warm-up + 2
    result = run_evaluation(cfg)
    perf = write_outputs(result, out)
    assert journal_indices(out) == list(range(64))  # every image exactly once
    assert np.array_equal(result.top, expected_top(folder, result.names))
    dead = {d["id"]: d for d in perf["devices"]}["2"]
    assert dead["failed_at_s"] is not None and dead["moved_batches"] >= 1
    assert ("injected fault" in dead["failure"]) if mode == "raise" else dead["failure"]
    # Its two good batches; when the process dies, the second one's reply may still be on
    # the wire: then that batch moves too and is scored elsewhere (exactly once, checked above).
    assert dead["images"] == 4 if mode == "raise" else dead["images"] in (2, 4)
    assert perf["accuracy"]["not_scored"] == 0


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_a_call_whose_chip_fails_midway_is_rerun_elsewhere_and_scored_once(
        ray_session, images64, tmp_path, mode):
    folder, labels = images64
    out = tmp_path / "run"
    # bs1, 4 batches per call: chip 2 runs its first call (4 batches), then the first batch
    # of its second call, and fails on that call's second batch (2 warm-up + 5 batches).
    cfg = RunConfig(backend="emulated", images=str(folder), labels=str(labels), devices="0-3",
                    batch_size=1, batches_per_call=4, out=str(out), progress=False,
                    emulated_latency_ms=5.0,
                    backend_extra={"2": {"fault": {"after": 7, "mode": mode}}})
    result = run_evaluation(cfg)
    perf = write_outputs(result, out)
    assert journal_indices(out) == list(range(64))  # every image exactly once
    assert np.array_equal(result.top, expected_top(folder, result.names))
    dead = {d["id"]: d for d in perf["devices"]}["2"]
    assert dead["failed_at_s"] is not None
    # The batch it finished inside the failed call is not scored from there: the whole call
    # moves (its first call's reply may be lost with the process when it exits).
    assert dead["images"] == 4 if mode == "raise" else dead["images"] in (0, 4)
    assert dead["moved_batches"] >= 4
    assert perf["driver"]["batches_per_call"] == 4
    assert perf["driver"]["calls"] < 64  # calls carried several batches


def test_a_hung_chip_is_killed_while_its_peers_are_still_busy(ray_session, images64, tmp_path):
    folder, labels = images64
    out = tmp_path / "run"
    # Chip 2 never returns its 3rd batch (t ~ 0.6 s); it is dropped within two timeouts of
    # that (a batch's clock starts once the driver has seen it decoded), while its peers need
    # about 6 s for the other 62 batches.
    cfg = RunConfig(backend="emulated", images=str(folder), labels=str(labels), devices="0-3",
                    batch_size=1, out=str(out), progress=False, emulated_latency_ms=300.0,
                    batch_timeout_s=0.8,
                    backend_extra={"2": {"fault": {"after": 4, "mode": "hang"}}})
    result = run_evaluation(cfg)
    perf = write_outputs(result, out)
    assert journal_indices(out) == list(range(64))
    assert np.array_equal(result.top, expected_top(folder, result.names))
    hung = {d["id"]: d for d in perf["devices"]}["2"]
    assert "hung" in hung["failure"] and hung["images"] == 2
    # Noticed soon after the hang, not only once every other chip had gone quiet.
    assert hung["failed_at_s"] < 4.0 < perf["card"]["wall_s"]  # measured: 2.4 and 6.3 s


def test_a_failed_teardown_is_reported_not_lost(ray_session, images64, tmp_path):
    folder, labels = images64
    out = tmp_path / "run"
    cfg = RunConfig(backend="emulated", images=str(folder), labels=str(labels), devices="0-1",
                    batch_size=8, out=str(out), progress=False, emulated_latency_ms=1.0,
                    backend_extra={"1": {"fault": {"mode": "close"}}})
    result = run_evaluation(cfg)
    perf = write_outputs(result, out)
    assert perf["accuracy"]["not_scored"] == 0
    (line,) = [note for note in perf["notes"] if note.startswith("device ")]
    assert line.startswith("device 1: teardown failed: ") and "injected teardown fault" in line


def test_a_killed_device_actor_mid_run(ray_session, images64, tmp_path):
    folder, labels = images64
    out = tmp_path / "run"
    cfg = RunConfig(backend="emulated", images=str(folder), labels=str(labels), devices="0-3",
                    batch_size=2, out=str(out), progress=False, emulated_latency_ms=50.0)

    def killer():
        deadline = time.time() + 30
        while time.time() < deadline:
            names = [a for a in ray.util.list_named_actors() if a.endswith("-device-1")]
            lines = (out / "journal.jsonl").read_text().count("\n") if (
                out / "journal.jsonl").exists() else 0
            if names and lines > 4:
                ray.kill(ray.get_actor(names[0]))
                return
            time.sleep(0.01)

    t = threading.Thread(target=killer)
    t.start()
    result = run_evaluation(cfg)
    t.join()
    perf = write_outputs(result, out)
    assert journal_indices(out) == list(range(64))
    assert np.array_equal(result.top, expected_top(folder, result.names))
    assert {d["id"]: d for d in perf["devices"]}["1"]["failed_at_s"] is not None


def evaluate_cmd(folder, labels, out, *extra):
    return [sys.executable, "-m", "runner.evaluate", "--backend", "emulated", "--devices", "0-1",
            "--images", str(folder), "--labels", str(labels), "--batch-size", "2",
            "--emulated-latency-ms", "60", "--out", str(out), "--no-progress", *extra]


def test_killed_driver_resumes_to_an_identical_result(ray_session, images64, tmp_path):
    folder, labels = images64
    env = dict(os.environ)
    # The uninterrupted reference, in this process: the same settings as evaluate_cmd's.
    whole = run_evaluation(RunConfig(backend="emulated", devices="0-1", images=str(folder),
                                     labels=str(labels), batch_size=2, emulated_latency_ms=60,
                                     out=str(tmp_path / "whole"), progress=False))
    write_outputs(whole, tmp_path / "whole")

    out = tmp_path / "crashed"  # 3 batches per call; the whole run chose its own call size
    proc = subprocess.Popen(evaluate_cmd(folder, labels, out, "--batches-per-call", "3"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    journal = out / "journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if journal.exists() and journal.read_text().count("\n") > 8:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(journal, "a") as f:
        f.write('{"batch": 99, "device": "0", "indi')  # a torn last line
    assert not (out / "result.json").exists()

    refused = subprocess.run(evaluate_cmd(folder, labels, out), env=env, capture_output=True,
                             text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    no_logits = subprocess.run(evaluate_cmd(folder, labels, out, "--resume", "--save-logits"),
                               env=env, capture_output=True, text=True)
    assert no_logits.returncode == 2 and "(save_logits changed)" in no_logits.stderr
    resumed = subprocess.run(evaluate_cmd(folder, labels, out, "--resume",
                                          "--batches-per-call", "3"), env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "result.json").read_text() == (tmp_path / "whole" / "result.json").read_text()
    assert journal_indices(out) == list(range(64))
    perf = json.loads((out / "perf.json").read_text())
    assert 0 < perf["accuracy"]["resumed_images"] < 64
    assert any("this session only" in note for note in perf["notes"])

    # Resuming a finished run has nothing to time: accuracy rewritten, speed files kept.
    before = (out / "perf.json").read_bytes()
    again = subprocess.run(evaluate_cmd(folder, labels, out, "--resume", "--min-fps", "1e9"),
                           env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "nothing left to run" in again.stdout
    assert "speed gate not checked" in again.stdout and "gates passed" not in again.stdout
    assert (out / "perf.json").read_bytes() == before
    assert (out / "result.json").read_text() == (tmp_path / "whole" / "result.json").read_text()


def broken_folder(root: Path) -> tuple[Path, Path, dict[str, str]]:
    """Good images plus every kind of bad input; returns (folder, labels, bad name -> reason)."""
    folder = root / "broken"
    labels = write_images(folder, 6)
    lines = labels.read_text().splitlines()
    rgb = Image.new("RGB", (400, 320), (120, 40, 200))
    scored = {
        "ILSVRC2012_val_00000101.JPEG": lambda p: rgb.convert("CMYK").save(p, "JPEG"),
        "ILSVRC2012_val_00000102.JPEG": lambda p: rgb.convert("L").save(p, "JPEG"),
        "ILSVRC2012_val_00000103.JPEG": lambda p: rgb.save(p, "JPEG", progressive=True),
        "ILSVRC2012_val_00000104.JPEG": lambda p: rgb.save(p, "PNG"),
    }
    for name, save in scored.items():
        save(folder / name)
    good = (folder / "ILSVRC2012_val_00000001.JPEG").read_bytes()
    (folder / "ILSVRC2012_val_00000201.JPEG").write_bytes(b"")
    (folder / "ILSVRC2012_val_00000202.JPEG").write_bytes(good[: len(good) // 3])
    (folder / "ILSVRC2012_val_00000203.JPEG").write_text("not an image at all\n")
    Image.new("1", (9000, 9000)).save(folder / "ILSVRC2012_val_00000204.JPEG", "PNG")
    (folder / "ILSVRC2012_val_00000206.JPEG").write_bytes(good)  # no label
    names = list(scored) + [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (201, 202, 203, 204)]
    lines += [f"{n} 7" for n in names] + ["ILSVRC2012_val_00000205.JPEG 3"]  # 205: missing
    labels.write_text("\n".join(lines) + "\n")
    bad = {"ILSVRC2012_val_00000201": "empty", "ILSVRC2012_val_00000202": "decode",
           "ILSVRC2012_val_00000203": "decode", "ILSVRC2012_val_00000204": "decompression",
           "ILSVRC2012_val_00000205": "no file", "ILSVRC2012_val_00000206": "no label"}
    return folder, labels, bad


def test_broken_inputs_are_named_in_errors_csv_and_the_run_finishes(tmp_path):
    folder, labels, bad = broken_folder(tmp_path)
    out = tmp_path / "run"
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "runner.evaluate", "--backend", "emulated", "--devices", "0-1",
         "--images", str(folder), "--labels", str(labels), "--batch-size", "4", "--out",
         str(out), "--no-progress"], env=env, capture_output=True, text=True)
    assert proc.returncode == 4, proc.stderr  # 6 errors > --max-errors 0
    assert "6 images were not scored" in proc.stderr
    rows = [line.split(",", 2) for line in (out / "errors.csv").read_text().splitlines()[1:]]
    reasons = {r[0].split(".")[0]: r[2] for r in rows}
    assert set(reasons) == set(bad)
    for key, word in bad.items():
        assert word in reasons[key].lower(), (key, reasons[key])
    perf = json.loads((out / "perf.json").read_text())
    acc = perf["accuracy"]
    counts = (acc["scored"], acc["not_scored"], acc["unlabelled_or_missing"], acc["errors"])
    assert counts == (10, 4, 2, 6)
    result = json.loads((out / "result.json").read_text())
    assert result["value"][0]["value"] == "10"
    ok = subprocess.run(proc.args + ["--overwrite", "--max-errors", "6"], env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"devices": "0-11"}, "emulated chips (--emulated-chips) exist"),
        ({"labels": "/nonexistent/val_label.txt"}, "does not exist"),
        ({"backend": "acl", "model": "__om__"}, "pyACL"),
        ({"backend": "onnxruntime", "model": "__om__"}, "--backend acl"),
    ],
)
def test_bad_configuration_is_one_line(ray_session, images64, tmp_path, kwargs, message):
    folder, labels = images64
    om = tmp_path / "model_bs16.om"
    om.write_bytes(b"not really an om")
    settings = {"backend": "emulated", "images": str(folder), "labels": str(labels),
                "out": str(tmp_path / "run"), "progress": False, "emulated_chips": 4} | kwargs
    if settings.get("model") == "__om__":
        settings["model"] = str(om)
    from runner.evaluate import CONFIG_ERRORS

    with pytest.raises(CONFIG_ERRORS) as err:
        run_evaluation(RunConfig(**settings))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_batches_are_given_up_and_listed_when_every_chip_fails(ray_session, images64, tmp_path):
    folder, labels = images64
    fault = {"fault": {"after": 2, "mode": "raise"}}  # each chip fails right after warm-up
    cfg = RunConfig(backend="emulated", images=str(folder), labels=str(labels), devices="0-1",
                    batch_size=8, out=str(tmp_path / "run"), progress=False,
                    emulated_latency_ms=1.0, backend_extra={"0": fault, "1": fault})
    result = run_evaluation(cfg)
    assert result.scored.size == 0
    assert sorted(i.index for i in result.issues) == list(range(64))  # every image listed once
    reasons = {i.reason.split(":")[0] for i in result.issues}
    assert reasons <= {"batch failed", "no device left"}
    assert len(result.outcome.given_up) == 8


@pytest.mark.parametrize("flags, message", [
    (["--in-flight", "0"], "--in-flight must be positive"),
    (["--limit", "-1"], "--limit must be positive"),
    (["--emulated-chips", "0"], "--emulated-chips must be at least 1"),
    (["--resume", "--overwrite"], "exclude each other"),
])
def test_bad_numbers_exit_2_with_one_line(images64, tmp_path, flags, message):
    folder, labels = images64
    proc = subprocess.run(evaluate_cmd(folder, labels, tmp_path / "run", *flags),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_out_that_is_a_file_is_one_line(images64, tmp_path):
    folder, labels = images64
    (tmp_path / "file").write_text("x")
    proc = subprocess.run(evaluate_cmd(folder, labels, tmp_path / "file"), capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


@ray.remote
def _slow_payload(delay_s: float, sizes: list[int]) -> Payload:
    time.sleep(delay_s)
    parts = [Part(np.arange(n)) for n in sizes]
    return Payload(np.zeros((sum(sizes), 1, 1, 3), np.uint8), parts, time.time())


@ray.remote
class _EchoDevice:
    def infer(self, payload: Payload, picks: list, keep_logits: bool) -> list:
        return [(batch, len(payload.part_pixels(part))) for batch, part in picks]


def test_slow_preprocessing_is_not_blamed_on_the_device(ray_session):
    # Each call takes 1.5 s to decode, three times the batch timeout: the device that waits
    # for it is healthy and must stay, since a call's clock starts once it is decoded.
    device = DeviceState(Device(DeviceRef(None, 0), _EchoDevice.remote(), LOCAL))
    replies = []
    outcome = Driver([device], plan_batches([4], 2),
                     submit_prep=lambda call: (_slow_payload.remote(
                         1.5, [b.stop - b.start for b in call]), None),
                     on_replies=replies.extend, batch_timeout_s=0.5).run()
    assert device.alive and not outcome.given_up
    assert sorted(replies) == [(0, 2), (1, 2)]
