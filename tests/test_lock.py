"""The run-directory lock (issue 15): one holder named by host and pid; a dead holder's lock is taken over on the
same machine, an expired lease anywhere; the holder renews its lease; two takers of one stale lock cannot both win."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from unitrain.errors import RunLockedError
from unitrain.train.lock import LOCK, RunLock, _machine


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(run_dir, **fields) -> dict:
    held = {"host": socket.gethostname(), "pid": os.getpid(), "machine": _machine(), "token": "other",
            "since": time.time() - 60, "since_text": "2026-01-01 10:00:00 UTC", "renewed": time.time(), "lease_s": 300,
            **fields}
    (run_dir / LOCK).write_text(json.dumps(held))
    return held


def test_held_while_running_named_in_the_error_released_at_the_end(tmp_path):
    with RunLock(tmp_path) as lock:
        held = json.loads((tmp_path / LOCK).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["token"] == lock.token
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path).acquire()
        msg = str(e.value)
        assert f"run directory {tmp_path} is in use by another unitrain run: pid {os.getpid()} on host " \
               f"{socket.gethostname()}, since {held['since_text']}" in msg
        assert "name=<new name>" in msg
    assert not (tmp_path / LOCK).exists() and sorted(os.listdir(tmp_path)) == []


def test_a_live_holder_in_another_process_blocks(tmp_path):
    code = (f"import time; from unitrain.train.lock import RunLock; l = RunLock({str(tmp_path)!r}).acquire(); "
            f"print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    said = []
    with RunLock(tmp_path, said.append):  # killed: its pid is dead now, the lock is taken over
        pass
    assert f"took over the lock of pid {holder.pid}" in said[0] and "that process is no longer running" in said[0]


def test_a_dead_pid_on_this_machine_is_taken_over_with_a_message(tmp_path):
    pid = _dead_pid()
    _plant(tmp_path, pid=pid)
    said = []
    with RunLock(tmp_path, said.append) as lock:
        assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.token
    assert said == [f"run directory {tmp_path}: took over the lock of pid {pid} on host {socket.gethostname()} "
                    f"(since 2026-01-01 10:00:00 UTC): that process is no longer running"]


def test_a_live_pid_on_this_machine_holds_even_with_an_old_lease(tmp_path):
    _plant(tmp_path, renewed=time.time() - 10_000)  # e.g. stopped with Ctrl-Z: it will write again
    with pytest.raises(RunLockedError):
        RunLock(tmp_path).acquire()


def test_another_host_holds_until_its_lease_expires(tmp_path):
    _plant(tmp_path, host="node-7", machine="node-7:boot:ns", pid=1234, renewed=time.time() - 200)
    with pytest.raises(RunLockedError) as e:
        RunLock(tmp_path).acquire()
    assert "pid 1234 on host node-7" in str(e.value) and "lease renewed 200 s ago" in str(e.value)
    assert "once its lease of 300 s expires unrenewed" in str(e.value)
    _plant(tmp_path, host="node-7", machine="node-7:boot:ns", pid=1234, renewed=time.time() - 400)
    said = []
    with RunLock(tmp_path, said.append):
        pass
    assert "took over the lock of pid 1234 on host node-7" in said[0] and "last renewed 400 s ago" in said[0]


def test_the_holder_renews_its_lease(tmp_path):
    with RunLock(tmp_path, renew_s=0.05) as lock:
        first = json.loads((tmp_path / LOCK).read_text())["renewed"]
        time.sleep(0.4)
        later = json.loads((tmp_path / LOCK).read_text())
        assert later["renewed"] > first and later["since"] == json.loads(json.dumps(lock._since))
        assert not lock.lost


def test_a_holder_that_lost_its_lock_notices_and_does_not_delete_the_new_one(tmp_path):
    lock = RunLock(tmp_path, renew_s=3600).acquire()
    _plant(tmp_path, host="node-7", machine="node-7:boot:ns", token="thief")
    assert lock.renew() is False and lock.lost
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "thief"


def test_two_takers_of_one_stale_lock_cannot_both_win(tmp_path):
    stale = _plant(tmp_path, pid=_dead_pid())
    first = RunLock(tmp_path)
    first._since = time.time()
    # the second taker judged the same lock stale, but the first replaced it before the second took the guard
    first._take_over(stale, "gone")
    second = RunLock(tmp_path)
    second._since = time.time()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        second._take_over(stale, "gone")
    assert json.loads((tmp_path / LOCK).read_text())["token"] == first.token
    # and while a takeover is in progress (guard present, fresh), nobody else takes over
    (tmp_path / (LOCK + ".takeover")).write_text("{}")
    with pytest.raises(RunLockedError):
        RunLock(tmp_path)._take_over(json.loads((tmp_path / LOCK).read_text()), "gone")


def test_an_unreadable_lock_blocks_until_it_is_old(tmp_path):
    (tmp_path / LOCK).write_text("{torn")
    with pytest.raises(RunLockedError, match="is unreadable"):
        RunLock(tmp_path).acquire()
    old = time.time() - 1000
    os.utime(tmp_path / LOCK, (old, old))
    said = []
    with RunLock(tmp_path, said.append):
        pass
    assert "the lock file is unreadable and 1000 s old" in said[0]
