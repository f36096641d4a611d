"""runner.runlock: one writer per folder across real processes, the kind of lock, its scope."""

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from runner import runlock
from runner.runlock import (
    LOCK_NAME,
    LOCK_OFFSET,
    BusyError,
    LockError,
    RunFolders,
    hold_run_folder,
    local_only,
    mount_of,
)

ROOT = Path(__file__).resolve().parents[1]
HOLD = textwrap.dedent("""
    import sys, time
    from runner.runlock import hold_run_folder
    lock = hold_run_folder(sys.argv[1])
    print("held", flush=True)
    time.sleep(120)
""")
TRY = "import sys; from runner.runlock import hold_run_folder; hold_run_folder(sys.argv[1])"


@contextmanager
def holding(folder: Path) -> Iterator[subprocess.Popen]:
    """Another process that holds ``folder`` until it is killed (at the latest on exit)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.fixture
def holder(tmp_path):
    with holding(tmp_path / "run") as proc:
        yield tmp_path / "run", proc


def try_in_another_process(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRY, str(folder)], cwd=ROOT,
                          capture_output=True, text=True)


def test_a_live_holder_is_named_and_its_death_frees_the_folder(holder):
    folder, proc = holder
    with pytest.raises(BusyError) as refused:
        hold_run_folder(folder)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"--out: {folder} is in use by another run (pid {proc.pid} on "
                              f"{socket.gethostname()}, started ")
    assert message.endswith("; wait for it to end or choose another --out")
    assert "hold_run_folder(sys.argv[1])" in message  # the holder's command line

    proc.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
    proc.wait()
    assert f'"pid": {proc.pid}' in (folder / LOCK_NAME).read_text()  # a stale line stays
    with hold_run_folder(folder):
        assert f'"pid": {os.getpid()}' in (folder / LOCK_NAME).read_text()


def test_other_descriptors_of_the_lock_file_do_not_drop_it(tmp_path):
    # The trap of process-owned POSIX locks (fcntl.lockf): closing ANY descriptor of the file
    # drops them.  Reading the lock file here must leave the folder locked.
    folder = tmp_path / "run"
    with hold_run_folder(folder):
        for _ in range(3):
            (folder / LOCK_NAME).read_text()
        with pytest.raises(BusyError, match=f"pid {os.getpid()} "):
            hold_run_folder(folder)  # another open file in this same process is kept out too
        other = try_in_another_process(folder)
        assert other.returncode == 1 and "BusyError" in other.stderr
    assert try_in_another_process(folder).returncode == 0  # released


@pytest.mark.skipif(runlock._ofd_setlk is None or not Path("/proc/locks").exists(),
                    reason="open file description locks are Linux-only")
def test_it_is_an_ofd_lock_on_one_byte_past_the_holder_line(tmp_path):
    folder = tmp_path / "run"
    with hold_run_folder(folder):
        st = (folder / LOCK_NAME).stat()
        inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        mine = [line.split() for line in Path("/proc/locks").read_text().splitlines()
                if f" {inode} " in line]
        assert st.st_size < LOCK_OFFSET  # readers of the holder line never touch the locked byte
    assert [fields[1:4] + fields[-2:] for fields in mine] == [
        ["OFDLCK", "ADVISORY", "WRITE", str(LOCK_OFFSET), str(LOCK_OFFSET)]]


def test_flock_where_the_platform_has_no_ofd_locks(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "_ofd_setlk", None)  # what macOS / BSD Python lacks
    folder = tmp_path / "run"
    with hold_run_folder(folder):
        with pytest.raises(BusyError):
            hold_run_folder(folder)
    hold_run_folder(folder).release()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL])
def test_a_filesystem_that_refuses_locks_stops_the_run(tmp_path, monkeypatch, code):
    # Stand-in for NFS without lockd (ENOLCK), Lustre without -o flock (ENOSYS), ...: the
    # lock call fails the way fcntl(2) documents, nothing is run unlocked.
    def refuse(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(runlock, "_lock", refuse)
    with pytest.raises(LockError) as refused:
        hold_run_folder(tmp_path / "run")
    assert not isinstance(refused.value, BusyError)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--out: cannot lock {tmp_path}/run/")
    assert errno.errorcode[code] in message and "refuses file locks" in message
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""  # no holder line was written


def test_a_file_in_the_way_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(LockError, match=r"^OUT: .*/file exists and is not a directory$"):
        hold_run_folder(tmp_path / "file", "OUT")


def test_run_folders_hold_each_folder_once_and_release_all(tmp_path):
    folders = RunFolders()
    a, b = tmp_path / "a", tmp_path / "b"
    folders.hold(a)
    folders.hold(tmp_path / "b" / ".." / "a")  # the same folder: already held, not refused
    folders.hold(b)
    assert try_in_another_process(a).returncode == 1
    assert try_in_another_process(b).returncode == 1
    folders.release()
    assert try_in_another_process(a).returncode == 0
    assert try_in_another_process(b).returncode == 0


def test_a_folder_the_lock_made_goes_with_it_unless_a_run_used_it(tmp_path):
    folders = RunFolders()
    empty, wrote, started, old = (tmp_path / n for n in ("empty", "wrote", "started", "old"))
    old.mkdir()
    for folder in (empty, wrote, started, old):
        folders.hold(folder)
    (wrote / "journal.jsonl").write_text("{}\n")
    folders.used(started)  # e.g. a pure-infer run whose reports are written after release
    folders.release()
    assert not empty.exists()  # a run refused before it started leaves no trace
    assert (wrote / "journal.jsonl").exists() and started.is_dir() and old.is_dir()


def test_a_lock_won_on_a_file_its_holder_removed_is_taken_again(tmp_path, monkeypatch):
    opened = []
    real = runlock.FileLock._open_and_lock

    def open_then_lose_the_race(path, *args):
        fd = real(path, *args)
        if not opened:  # the holder removed its folder between our open and our lock
            os.unlink(path)
        opened.append(os.fstat(fd).st_ino)
        return fd

    monkeypatch.setattr(runlock.FileLock, "_open_and_lock", staticmethod(open_then_lose_the_race))
    lock = hold_run_folder(tmp_path / "run")
    assert len(opened) == 2 and os.stat(tmp_path / "run" / LOCK_NAME).st_ino == opened[1]
    monkeypatch.undo()
    assert try_in_another_process(tmp_path / "run").returncode == 1
    lock.release()


MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
36 27 0:32 / /mnt/gcs rw,nosuid,nodev,relatime shared:5 - fuse.gcsfuse bucket rw,user_id=0
37 27 0:33 / /mnt/blk rw,relatime - fuseblk /dev/sdb1 rw,user_id=0
40 27 0:40 / /data rw,relatime shared:7 - nfs srv:/export rw,vers=3,local_lock=all,addr=10.0.0.1
41 40 0:41 / /data/v4 rw,relatime - nfs4 srv:/x rw,vers=4.2,local_lock=none,addr=10.0.0.1
42 27 0:42 / /mnt/my\\040share rw - cifs //srv/share rw,vers=3.1.1,nobrl
43 27 0:43 / /mnt/smb rw - cifs //srv/other rw,vers=3.1.1
44 27 0:44 / /data/v4 rw - tmpfs tmpfs rw
"""


@pytest.mark.parametrize("path, fstype, reason", [
    ("/home/u/runs/x", "ext4", None),
    ("/mnt/gcs/runs/x", "fuse.gcsfuse", "FUSE filesystem"),
    ("/mnt/gcsx/runs", "ext4", None),  # a longer name is not inside /mnt/gcs
    ("/mnt/blk/runs", "fuseblk", None),  # a local disk through FUSE: no other host sees it
    ("/data/runs/x", "nfs", "nfs mounted with local_lock=all"),
    ("/data/v4", "tmpfs", None),  # the last mount on a point hides the earlier one
    ("/mnt/my share/runs", "cifs", "cifs mounted with nobrl"),
    ("/mnt/smb/runs", "cifs", None),
])
def test_mounts_whose_locks_stay_on_this_host(path, fstype, reason):
    found, options = mount_of(Path(path), MOUNTINFO)
    assert found == fstype
    said = runlock.local_only_reason(found, options)
    assert (said is None) if reason is None else (reason in said)


def test_a_local_only_mount_is_warned_about(tmp_path, monkeypatch, caplog):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"50 1 0:50 / {tmp_path} rw - fuse.sshfs host:/runs rw,user_id=0\n")
    monkeypatch.setattr(runlock, "MOUNTINFO", mountinfo)
    with caplog.at_level(logging.WARNING, logger="cardrunner"):
        hold_run_folder(tmp_path / "run").release()
    assert f"--out: {tmp_path}/run is on fuse.sshfs" in caplog.text
    assert "a run on another host would not be kept out" in caplog.text


@pytest.mark.skipif(not runlock.MOUNTINFO.exists(), reason="no /proc/self/mountinfo")
def test_this_machine_s_mount_is_found(tmp_path):
    fstype, options = mount_of(tmp_path, runlock.MOUNTINFO.read_text())
    assert fstype and options
    assert local_only(tmp_path) == runlock.local_only_reason(fstype, options)
