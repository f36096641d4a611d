"""Nothing of an embedded Ray outlives its driver, however the driver ends.

Ray fate-shares the processes ``ray.init`` starts with the driver (``PR_SET_PDEATHSIG`` =
SIGKILL: gcs_server, raylet, dashboard, monitors), and core workers exit about 2 s after
their raylet.  The raylet's agents do not: in Ray 2.60 ``ray::DashboardAgent`` and
``ray::RuntimeEnvAgent`` notice the raylet's death at once, then block their event loop
for 60 s in ``process_watcher.report_raylet_error_logs`` ->
``publish_error_to_driver(..., 60)`` (a literal timeout) towards the GCS that died with
the driver; their SIGTERM handler runs on that blocked loop, so only SIGKILL ends them
sooner.  No Ray setting shortens this (``RAY_gcs_rpc_server_reconnect_timeout_s`` does
not), so a watchdog does it.

The watchdog is one small process per driver (``python -m runner.reaper``), in a session
of its own so a terminal's Ctrl-C does not reach it.  It blocks reading a pipe whose only
writer is the driver (costing nothing while the run lasts); each line names the session
folder of an embedded instance the driver started.  At end of file (the driver has
exited, normally or not) it SIGKILLs exactly the processes of those instances.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROUNDS = 10  # rescans: a dying raylet may still have started a worker
ROUND_PAUSE_S = 0.2
LOG_NAME = "cardrunner_reaper.log"  # in the session's logs folder


@dataclass(frozen=True)
class Owner:
    """What every process of the driver's embedded instances shares with the driver."""

    sid: int  # Ray never calls setsid for its processes (workers only setpgid)
    since: int  # the driver's start time in clock ticks: older processes are not ours


def start_ticks(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def holds_file_under(pid: int, folders: tuple[str, ...]) -> bool:
    """Whether ``pid`` has a file open under one of ``folders``.

    Every Ray process of an instance keeps its logs in that instance's session folder
    open (workers and agents also inherit the raylet's ``raylet.out``), and Ray
    workers rename themselves with setproctitle, so this is what identifies them; another
    instance (a ``ray start``, another run) has another folder.
    """
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith(folders):
            return True
    return False


def processes_under(folders: list[str], owner: Owner | None = None) -> list[int]:
    """Processes of this user holding a file open under ``folders``; with ``owner``,
    only those in its session that started after it."""
    prefixes = tuple(os.path.join(os.path.realpath(f), "") for f in folders)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            if owner is not None and (os.getsid(pid) != owner.sid
                                      or start_ticks(pid) < owner.since):
                continue
        except (OSError, ValueError):
            continue
        if holds_file_under(pid, prefixes):
            found.append(pid)
    return found


def kill_exactly(pid: int, folders: tuple[str, ...]) -> bool:
    """SIGKILL ``pid`` if it still holds a file under ``folders``; through a pidfd where the
    kernel has them (Linux >= 5.3), so a pid reused between check and kill is never hit."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:
        pidfd = None
    try:
        if not holds_file_under(pid, folders):
            return False
        if pidfd is None:
            os.kill(pid, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def kill_processes_under(folders: list[str], owner: Owner | None = None) -> list[str]:
    """SIGKILL every process :func:`processes_under` finds until none is left; one line
    (pid, name) per process killed."""
    prefixes = tuple(os.path.join(os.path.realpath(f), "") for f in folders)
    killed = []
    for _ in range(ROUNDS):
        pids = processes_under(folders, owner)
        if not pids:
            break
        for pid in pids:
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                if kill_exactly(pid, prefixes):
                    killed.append(f"{pid} {name}")
            except OSError:
                continue
        time.sleep(ROUND_PAUSE_S)
    return killed


def wait_for_exit(pid: int, since: int) -> None:
    """Return once process ``pid`` (started at ``since``) has exited.

    The pipe can reach end of file while the driver still runs its exit handlers (Python
    closes it when the interpreter is torn down), and the driver itself holds its Ray log
    in the session folder, so the reaping waits for the process, not the pipe."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (Linux < 5.3): watch /proc
        while True:
            try:
                if start_ticks(pid) != since:
                    return
            except (OSError, ValueError):
                return
            time.sleep(ROUND_PAUSE_S)
    try:
        if start_ticks(pid) == since:  # the pidfd is the driver's, not a reused pid's
            select.select([pidfd], [], [])
    except (OSError, ValueError):
        pass
    finally:
        os.close(pidfd)


def watch() -> None:
    """The watchdog: collect session folders from stdin; once the driver has exited, reap
    each one and say on stdout (the first session's logs/cardrunner_reaper.log) what was
    killed."""
    driver, sid, since = (int(a) for a in sys.argv[1:4])
    folders = dict.fromkeys(line.strip() for line in sys.stdin if line.strip())  # until EOF
    wait_for_exit(driver, since)
    for folder in folders:
        killed = kill_processes_under([folder], Owner(sid, since))
        if killed:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} driver gone; SIGKILLed "
                  f"{len(killed)} leftover processes of {folder}: {', '.join(killed)}")


class Watchdog:
    """The driver's end of the pipe: started on the first embedded instance."""

    def __init__(self, session_dir: str) -> None:
        me = os.getpid()
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p))
        with open(Path(session_dir) / "logs" / LOG_NAME, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "runner.reaper", str(me), str(os.getsid(me)),
                 str(start_ticks(me))],
                stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True,
                env=env, text=True)

    def add(self, session_dir: str) -> None:
        """Reap ``session_dir``'s processes once this process has exited."""
        self.process.stdin.write(session_dir + "\n")
        self.process.stdin.flush()


_watchdog: Watchdog | None = None


def reap_after_exit(session_dir: str) -> None:
    """Make sure the embedded instance in ``session_dir`` dies with this process (Linux)."""
    global _watchdog
    if not sys.platform.startswith("linux"):
        return
    if _watchdog is None:
        _watchdog = Watchdog(session_dir)
    _watchdog.add(session_dir)


if __name__ == "__main__":
    watch()
