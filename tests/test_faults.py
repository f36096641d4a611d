"""Faults a run survives on its own: a preprocessing actor killed, a node lost, Ctrl-C.

Real processes are killed by pid and real signals are sent to real runs.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import VAL_227, journal_indices, needs_val_227

from runner.config import RunConfig
from runner.evaluation import run_evaluation
from runner.report import write_outputs

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
#: ray.cluster_utils test clusters run without authentication (the runner's own embedded
#: instance sets it up; see tests/test_ray_lifecycle.py).
CLUSTER_ENV = dict(ENV, RAY_AUTH_MODE="disabled")


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process below ``pid``."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(
                b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = commands[child]
                frontier.append(child)
    return found


def journal_lines(out: Path) -> int:
    path = out / "journal.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def wait_for_progress(proc: subprocess.Popen, out: Path, lines: int, timeout: float = 120):
    deadline = time.time() + timeout
    while journal_lines(out) < lines:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.05)


def evaluate_cmd(images, labels, out, *extra):
    return [sys.executable, "-m", "runner.evaluate", "--backend", "emulated", "--devices", "0-3",
            "--images", str(images), "--labels", str(labels), "--out", str(out),
            "--no-progress", *extra]


def lone_run(tmp_path, **settings) -> Path:
    """An uninterrupted run of the same settings, in this process: the reference."""
    out = tmp_path / "lone"
    write_outputs(run_evaluation(RunConfig(backend="emulated", devices="0-3", out=str(out),
                                           progress=False, **settings)), out)
    return out


@needs_val_227
def test_a_killed_preprocessor_is_replaced_and_every_image_scored_once(ray_session, tmp_path):
    labels = VAL_227 / "val_label.txt"
    settings = dict(images=str(VAL_227), labels=str(labels), limit=1000, batch_size=8,
                    emulated_latency_ms=40.0, workers=2)
    reference = lone_run(tmp_path, **settings)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        evaluate_cmd(VAL_227, labels, out, "--limit", "1000", "--batch-size", "8",
                     "--emulated-latency-ms", "40", "--workers", "2"),
        env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_progress(proc, out, 6)
    victims = [pid for pid, cmd in descendants(proc.pid).items()
               if cmd.startswith("ray::Preprocessor")]
    assert len(victims) == 2, descendants(proc.pid)
    os.kill(victims[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert journal_indices(out) == list(range(1000))  # every image, exactly once, in this one run
    assert (out / "predictions.csv").read_text() == (reference / "predictions.csv").read_text()
    assert json.loads((out / "perf.json").read_text())["accuracy"]["errors"] == 0


NODE_LOSS = r"""
import json, sys, threading, time
from pathlib import Path
from runner.devices import EMULATED_RESOURCE
from runner.ray_start import bind_ray_to_loopback
bind_ray_to_loopback()
import ray
from ray.cluster_utils import Cluster
from runner.config import RunConfig
from runner.evaluation import run_evaluation
from runner.report import write_outputs

images, labels, out = sys.argv[1:4]
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "resources": {EMULATED_RESOURCE: 2}, "labels": {"cardrunner.node": "node1"}})
node2 = cluster.add_node(num_cpus=1, resources={EMULATED_RESOURCE: 2},
                         labels={"cardrunner.node": "node2"})

def remove_node2():
    journal = Path(out) / "journal.jsonl"
    while not journal.exists() or journal.read_text().count("\n") < 6:
        time.sleep(0.05)
    cluster.remove_node(node2, allow_graceful=False)

try:
    threading.Thread(target=remove_node2, daemon=True).start()
    cfg = RunConfig(backend="emulated", address=cluster.address, devices="node1:0-1,node2:0-1",
                    images=images, labels=labels, batch_size=2, out=out, progress=False,
                    emulated_latency_ms=30.0)
    result = run_evaluation(cfg)
    perf = write_outputs(result, Path(out))
    print(json.dumps({"perf": perf, "unscored": int((result.top[:, 0] < 0).sum())}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_a_node_lost_mid_run_leaves_its_images_to_the_others(images64, tmp_path):
    folder, labels = images64
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", NODE_LOSS, str(folder), str(labels), str(out)],
                          capture_output=True, text=True, env=CLUSTER_ENV, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(line for line in proc.stdout.splitlines()
                             if line.startswith('{"perf"')))
    assert journal_indices(out) == list(range(64)) and report["unscored"] == 0  # every image, once
    perf = report["perf"]
    assert [n["node"] for n in perf["nodes_lost"]] == ["node2"]
    assert 0 < perf["nodes_lost"][0]["at_s"] < perf["card"]["wall_s"]
    lost = [d for d in perf["devices"] if d["node"] == "node2"]
    assert len(lost) == 2 and all(d["failed_at_s"] is not None for d in lost)
    assert all(d["failed_at_s"] is None for d in perf["devices"] if d["node"] == "node1")
    assert "node node2 lost at" in proc.stderr


@pytest.mark.parametrize("kind", ["once", "twice"])
def test_ctrl_c_leaves_a_resumable_run(ray_session, images64, tmp_path, kind):
    folder, labels = images64
    settings = dict(images=str(folder), labels=str(labels), batch_size=2,
                    emulated_latency_ms=60.0)
    out = tmp_path / "run"
    proc = subprocess.Popen(evaluate_cmd(folder, labels, out, "--batch-size", "2",
                                         "--emulated-latency-ms", "60"),
                            env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_progress(proc, out, 4)
    proc.send_signal(signal.SIGINT)
    if kind == "twice":
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    ours = [line for line in stderr.splitlines() if line.startswith("evaluate:")]
    if kind == "once":
        (line,) = ours
        assert line.startswith("evaluate: interrupted after ") and "of 64 images" in line
        assert line.endswith(f"the journal in {out} is intact: continue with --resume")
        done = int(line.split("after ")[1].split(" of")[0])
        assert 0 < done < 64 and done == sum(
            len(json.loads(rec)["indices"]) for rec in
            (out / "journal.jsonl").read_text().splitlines()[1:])
    else:
        assert ours[-1] == "evaluate: interrupted again: exiting now"
        return  # what it left is a crashed run's: tests/test_reliability.py resumes one
    resumed = subprocess.run(evaluate_cmd(folder, labels, out, "--batch-size", "2",
                                          "--emulated-latency-ms", "60", "--resume"),
                             env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = lone_run(tmp_path, **settings)
    assert (out / "result.json").read_text() == (reference / "result.json").read_text()
