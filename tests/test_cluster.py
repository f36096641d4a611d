"""The README's `ray start` cluster commands under Ray's default token authentication, two
hosts played by two nodes on loopback (the ray.cluster_utils 2-node runs are in
tests/test_datasets.py and tests/test_faults.py)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import journal_indices

from runner.reaper import kill_processes_under, processes_under

ROOT = Path(__file__).resolve().parents[1]

RAY_CLI = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_hosts():
    """Two "hosts" on this machine, each with its own HOME (its ~/.ray/auth_token) and Ray
    temp dir (RAY_TMPDIR), in Ray's default environment; their Ray processes are killed
    afterwards, found by their temp dirs (never `ray stop`: it stops every Ray here)."""
    root = Path(tempfile.mkdtemp(prefix="crc-", dir="/tmp"))  # Ray's socket paths are short
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # Ray's defaults
    hosts = []
    for name in ("host1", "host2"):
        (root / name / "home").mkdir(parents=True)
        (root / name / "tmp").mkdir()
        hosts.append(env | {"HOME": str(root / name / "home"),
                            "RAY_TMPDIR": str(root / name / "tmp"), "PYTHONPATH": str(ROOT)})
    try:
        yield root, hosts
    finally:
        temp_dirs = [h["RAY_TMPDIR"] for h in hosts]
        kill_processes_under(temp_dirs)
        assert processes_under(temp_dirs) == []
        shutil.rmtree(root, ignore_errors=True)


def sh(command: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    """One README line, as a shell runs it (the `ray` next to this Python first on PATH)."""
    env = env | {"PATH": f"{RAY_CLI.parent}{os.pathsep}{env.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-c", command], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


@pytest.mark.skipif(not sys.platform.startswith("linux") or not RAY_CLI.exists(),
                    reason="two `ray start` nodes on one host: Linux and Ray's CLI needed")
def test_readme_cluster_commands_run_under_rays_default_token_authentication(
        two_hosts, images64):
    """The README's cluster section as written, two hosts played by two `ray start` nodes on
    loopback: a token made once on the head and copied, RAY_AUTH_MODE=token everywhere, then
    a run over both nodes.  (Ray 2.60 alone: the head turns token authentication on when it
    finds a token file and a joining node never does, so the old commands failed with
    InvalidAuthToken.)  A driver without the token gets one line saying what to set."""
    root, (head, worker) = two_hosts
    folder, labels = images64
    port = free_port()
    # Added for one shared machine: a free --port, loopback, small nodes, no dashboard.
    local = ("--node-ip-address=127.0.0.1 --num-cpus=1 --object-store-memory=100000000 "
             "--resources='{\"emulated_npu\": 2}'")
    sh("ray get-auth-token --generate >/dev/null && chmod 600 ~/.ray/auth_token", head)
    (Path(worker["HOME"]) / ".ray").mkdir()  # the copy: scp ~/.ray/auth_token host2:.ray/
    shutil.copy2(Path(head["HOME"]) / ".ray" / "auth_token", Path(worker["HOME"]) / ".ray")
    sh(f"export RAY_AUTH_MODE=token && ray start --head --port={port} {local} "
       "--include-dashboard=false --labels='{\"cardrunner.node\": \"node1\"}'", head)
    sh(f"export RAY_AUTH_MODE=token && ray start --address 127.0.0.1:{port} {local} "
       "--labels='{\"cardrunner.node\": \"node2\"}'", worker)
    out = root / "run"
    run = sh(f"export RAY_AUTH_MODE=token && python -m runner.evaluate --address auto "
             f"--backend emulated --devices node1:0-1,node2:0-1 --images {folder} "
             f"--labels {labels} --batch-size 4 --emulated-latency-ms 10 --out {out} "
             "--no-progress", head, timeout=300)
    assert "card: 4 devices, 64 images" in run.stdout

    assert journal_indices(out) == list(range(64))
    perf = json.loads((out / "perf.json").read_text())
    assert sorted(d["id"] for d in perf["devices"]) == ["node1:0", "node1:1", "node2:0",
                                                        "node2:1"]
    assert {h["name"]: h["images"] > 0 for h in perf["hosts"]} == {"node1": True, "node2": True}
    raylets = [pid for pid in processes_under([head["RAY_TMPDIR"], worker["RAY_TMPDIR"]])
               if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet"]
    assert len(raylets) == 2  # two real nodes

    stranger = subprocess.run(  # no token, no RAY_AUTH_MODE: refused, and told why
        [sys.executable, "-m", "runner.evaluate", "--address", f"127.0.0.1:{port}",
         "--backend", "emulated", "--devices", "node1:0", "--images", str(folder),
         "--labels", str(labels), "--out", str(root / "refused"), "--no-progress"],
        env=head | {"HOME": str(root), "RAY_gcs_server_port_wait_time_s": "2"}, cwd=ROOT,
        capture_output=True, text=True, timeout=120)
    assert stranger.returncode == 2, stranger.stderr[-2000:]
    assert stranger.stderr.strip().splitlines()[-1] == (
        f"evaluate: error: --address 127.0.0.1:{port}: the cluster uses token "
        "authentication: set RAY_AUTH_MODE=token and give this host the head's token "
        "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)")
