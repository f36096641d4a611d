"""The embedded Ray's life cycle, seen from outside: real runner.evaluate processes with Ray's
default environment (no RAY_AUTH_MODE), a driver killed by pid, and what a run prints."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Ray's own defaults: what a user's shell has, not the RAY_AUTH_MODE=disabled of the tests
# nor what an embedded instance of this process put in its environment.
DEFAULT_ENV = {k: v for k, v in os.environ.items()
               if not k.startswith("RAY_")} | {"PYTHONPATH": str(ROOT)}

# Lines Ray writes: Python loggers ("2026-11-29 18:30:05,778\tWARNING file.py:85 -- ..."),
# C++ logs ("[2026-11-29 18:59:10,169 E 20208 20208] core_worker.cc:2465: ..."), output
# forwarded from its processes ("(raylet) ...", "(Preprocessor pid=123) ...") and its links.
RAY_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s"
    r"|^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\]"
    r"|^\((raylet|\w+ pid=\d+|pid=\d+)[,)]"
    r"|docs\.ray\.io|github\.com/ray-project")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def evaluate(folder: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "runner.evaluate", "--images", str(folder), "--labels",
            str(labels), "--devices", "0-1", "--out", str(out), *extra]


def ticks(pid: int) -> int | None:
    """Start time of ``pid`` (clock ticks since boot), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of ``root``."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found and (start := ticks(pid)) is not None:
                found[pid] = start
                frontier.append(pid)
    return found


def session_dir(pids) -> str:
    """The Ray session folder, from the raylet's command line (a C++ binary: not renamed)."""
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in args:
            if arg.startswith(b"--session_dir="):
                return arg.split(b"=", 1)[1].decode()
    raise AssertionError("no raylet among the driver's processes")


def holding_files_in(folder: str) -> set[int]:
    """Live processes with a file open in ``folder`` (every Ray process of an instance
    keeps its logs there open), this test process excluded."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if any(link.startswith(folder + "/") for link in links):
            found.add(int(entry.name))
    return found


def test_a_killed_driver_leaves_no_process_of_its_ray_behind(ray_session, images64, tmp_path):
    """SIGKILL the driver mid-run: within 30 s nothing of its embedded Ray is alive (Ray 2.60
    left its dashboard and runtime-env agents for 60 s), while another Ray instance of
    this user and terminal session (the test session's own) is untouched."""
    folder, labels = images64
    out = tmp_path / "run"
    cmd = evaluate(folder, labels, out, "--backend", "emulated", "--batch-size", "2",
                   "--emulated-latency-ms", "300", "--no-progress")
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(cmd, env=DEFAULT_ENV, cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT)
    left: dict[int, int] = {}
    try:
        journal = out / "journal.jsonl"
        deadline = time.monotonic() + 120
        while not (journal.exists() and len(journal.read_text().splitlines()) >= 3):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no batch journaled in 120 s"
            time.sleep(0.05)
        snapshot = descendants(driver.pid)  # actors, agents, raylet, GCS ... while it lives
        session = session_dir(snapshot)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        assert driver.returncode == -signal.SIGKILL  # killed mid-run, not finished

        deadline = time.monotonic() + 30
        while True:
            left = {pid: start for pid, start in snapshot.items() if ticks(pid) == start}
            left.update({pid: start for pid in holding_files_in(session) - set(left)
                         if (start := ticks(pid)) is not None})
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in left
                 if Path(f"/proc/{pid}/comm").exists()}
        assert not left, f"alive 30 s after the driver's SIGKILL: {names}"
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid, start in left.items():  # never leak them into the next test
            if ticks(pid) == start:
                os.kill(pid, signal.SIGKILL)

    # The test session's own embedded Ray (same user, same terminal session) still works.
    assert ray_session.get(ray_session.remote(lambda: 41).remote()) + 1 == 42


def dashboard_missing() -> str | None:
    import ray._private.utils

    return ray._private.utils.get_dashboard_dependency_error()  # what ray.init checks


@pytest.mark.parametrize("dashboard", [
    False,
    pytest.param(True, marks=pytest.mark.skipif(
        bool(dashboard_missing()), reason=f"Ray's dashboard needs ray[default] (the cluster "
        f"extra): {dashboard_missing()}")),
])
def test_the_embedded_instance_keeps_token_authentication_on(dashboard, tmp_path):
    """The embedded instance refuses a client without its token, whatever the user's
    ~/.ray/auth_token holds; without --dashboard its token is its own and no file is
    written, with --dashboard it is Ray's file (what `ray get-auth-token` prints)."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    script = f"""
import os, subprocess, sys
from runner.ray_start import start_ray
start_ray(None, {{}}, dashboard={dashboard})
import ray
gcs = ray.get_runtime_context().gcs_address
stranger = [sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1])", gcs]
env = {{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}}
for extra in ({{}}, {{"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}}):
    p = subprocess.run(stranger, env=env | extra | {{"RAY_gcs_server_port_wait_time_s": "2"}},
                       capture_output=True, text=True, timeout=120)
    print("stranger", p.returncode, "InvalidAuthToken" in p.stderr)
print("mode", os.environ["RAY_AUTH_MODE"], "own token", "RAY_AUTH_TOKEN" in os.environ)
"""
    proc = subprocess.run([sys.executable, "-c", script], env=DEFAULT_ENV | {"HOME": str(home)},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["stranger 1 True", "stranger 1 True",
                                        f"mode token own token {not dashboard}"]
    assert (home / ".ray" / "auth_token").exists() == dashboard
