"""Issue 19 end to end, with real ``runner.evaluate`` processes on emulated chips: a second
run on the --out of a live run exits 2 at once naming it, the first finishes alone, and after
a SIGKILL ``--resume`` takes the folder and completes it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import journal_indices
from test_runlock import holding

from runner.config import RunConfig
from runner.evaluate import main
from runner.evaluation import run_evaluation
from runner.report import write_outputs
from runner.runlock import LOCK_NAME

ENV = dict(os.environ)


def evaluate_cmd(folder: Path, labels: Path, out: Path, latency_ms: int, *extra: str) -> list:
    return [sys.executable, "-m", "runner.evaluate", "--backend", "emulated", "--devices", "0-1",
            "--images", str(folder), "--labels", str(labels), "--batch-size", "2",
            "--emulated-latency-ms", str(latency_ms), "--out", str(out), "--no-progress", *extra]


def start_and_wait_for_batches(cmd: list, out: Path, batches: int,
                               log: Path) -> subprocess.Popen:
    """Start a run in its own session and return once its journal holds ``batches`` lines."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    journal = out / "journal.jsonl"
    deadline = time.time() + 120
    while not (journal.exists() and journal.read_text().count("\n") > batches):
        assert proc.poll() is None, log.read_text()
        assert time.time() < deadline, "the run wrote no batch in 120 s"
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def lone(ray_session, images64, tmp_path_factory) -> Path:
    """result.json of a run that had its folder to itself (evaluate_cmd's settings, run in
    this process)."""
    folder, labels = images64
    out = tmp_path_factory.mktemp("lone") / "run"
    write_outputs(run_evaluation(RunConfig(
        backend="emulated", devices="0-1", images=str(folder), labels=str(labels),
        batch_size=2, emulated_latency_ms=5, out=str(out), progress=False)), out)
    return out / "result.json"


def test_a_second_run_on_a_live_folder_exits_2_and_the_first_finishes_alone(
        images64, lone, tmp_path):
    folder, labels = images64
    out = tmp_path / "x"
    # One batch per call at 400 ms: the first run still has seconds of work when the second
    # one starts, and the test checks that it was still running when the second gave up.
    first = start_and_wait_for_batches(
        evaluate_cmd(folder, labels, out, 400, "--batches-per-call", "1"), out, 2,
        tmp_path / "first.log")
    try:
        second = subprocess.run(evaluate_cmd(folder, labels, out, 5, "--devices", "1",
                                             "--resume"),
                                env=ENV, capture_output=True, text=True, timeout=120)
        first_alive = first.poll() is None
        assert first.wait(timeout=180) == 0, (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert second.returncode == 2, second.stderr
    assert first_alive, "the first run ended before the second gave up: nothing was tested"
    assert second.stdout == "" and len(second.stderr.splitlines()) == 1
    assert second.stderr.startswith(
        f"evaluate: error: --out: {out} is in use by another run (pid {first.pid} on "
        f"{socket.gethostname()}, started ")
    assert second.stderr.rstrip().endswith("; wait for it to end or choose another --out")
    assert journal_indices(out) == list(range(64))  # every image exactly once
    assert (out / "result.json").read_text() == lone.read_text()


def test_after_the_holder_is_killed_resume_takes_the_folder_and_completes_it(
        images64, lone, tmp_path):
    folder, labels = images64
    out = tmp_path / "killed"
    victim = start_and_wait_for_batches(
        evaluate_cmd(folder, labels, out, 100, "--batches-per-call", "1"), out, 4,
        tmp_path / "victim.log")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert f'"pid": {victim.pid}' in (out / LOCK_NAME).read_text()  # its line outlives it
    assert not (out / "result.json").exists()

    resumed = subprocess.run(evaluate_cmd(folder, labels, out, 5, "--resume"), env=ENV,
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert journal_indices(out) == list(range(64))
    assert (out / "result.json").read_text() == lone.read_text()
    perf = json.loads((out / "perf.json").read_text())
    assert 0 < perf["accuracy"]["resumed_images"] < 64


@pytest.mark.parametrize("held", ["", "bs2"])
def test_a_sweep_locks_its_folder_and_every_size_before_any_size_runs(
        images64, tmp_path, capsys, held):
    folder, labels = images64
    out = tmp_path / "sweep"
    with holding(out / held) as other:
        code = main(["--backend", "emulated", "--devices", "0-1", "--images", str(folder),
                     "--labels", str(labels), "--batch-size", "1,2", "--out", str(out),
                     "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith(f"evaluate: error: --out: {out / held if held else out} is in use "
                          f"by another run (pid {other.pid} on ")
    assert not (out / "bs1" / "journal.jsonl").exists()  # refused before the first size ran
