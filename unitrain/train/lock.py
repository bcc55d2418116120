"""One run per run directory: rank 0 holds `<run_dir>/.lock` from before the first write to the end of the run.

The lock file (JSON) names its holder: host, pid, since when, and the lease it last renewed. A second run into the
same directory gets a RunLockedError naming the holder. A lock is taken over (with a message) only when its holder is
provably gone:
- on the same machine and pid namespace (same host name, boot id and /proc/self/ns/pid), when the pid is dead (a
  live pid holds it whatever its lease says: a process stopped with Ctrl-Z stops renewing but will write again);
- anywhere else (another host on a shared filesystem, another container), where a pid cannot be checked, when the
  lease has expired: the holder renews it every `renew_s` from a daemon thread, and a lease unrenewed for `lease_s`
  means the holder died or hangs (defaults 30 s / 300 s; env UNITRAIN_LOCK_RENEW_S / UNITRAIN_LOCK_LEASE_S). Leases
  compare the holder's clock with ours: hosts need clocks that agree to well within the lease (NTP does).
Creation is atomic and exclusive: the content is written to a private file and hard-linked to `.lock` (link fails
when `.lock` exists, on NFS too). A takeover holds `.lock.takeover` (created the same way) while it re-reads and
replaces the stale lock, so two runs that find the same stale lock cannot both take it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from unitrain.errors import RunLockedError

log = logging.getLogger("unitrain")
LOCK = ".lock"


def _machine() -> str:
    """Where a pid means something: boot id + pid namespace (containers on one host have different ones)."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(path).read_text().strip() if "boot_id" in path else str(os.stat(path).st_ino))
        except OSError:
            parts.append("?")
    return f"{socket.gethostname()}:{':'.join(parts)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _since(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


class RunLock:
    """Context manager; `say` prints takeover messages. Not reentrant."""

    def __init__(self, run_dir: Path, say=None, lease_s: float | None = None, renew_s: float | None = None):
        self.path = Path(run_dir) / LOCK
        self.say = say or (lambda msg: log.warning(msg))
        self.lease_s = float(lease_s or os.environ.get("UNITRAIN_LOCK_LEASE_S", 300))
        self.renew_s = float(renew_s or os.environ.get("UNITRAIN_LOCK_RENEW_S", 30))
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._since = 0.0

    # ---------------------------------------------------------------- file helpers
    def _content(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "machine": _machine(), "token": self.token,
                "since": self._since, "since_text": _since(self._since), "renewed": time.time(),
                "lease_s": self.lease_s}

    def _private(self, suffix: str, content: dict) -> Path:
        p = self.path.with_name(f"{self.path.name}.{suffix}-{self.token}")
        p.write_text(json.dumps(content))
        return p

    def _link_create(self, target: Path, content: dict) -> bool:
        """Create `target` with `content` iff it does not exist (atomic)."""
        src = self._private("new", content)
        try:
            os.link(src, target)
            return True
        except FileExistsError:
            return False
        finally:
            src.unlink(missing_ok=True)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale(self, held: dict) -> str | None:
        """Why the holder is provably gone, or None while it may be alive."""
        if not held:  # unreadable: judge by age
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return "it was released"
            return f"the lock file is unreadable and {age:.0f} s old" if age > self.lease_s else None
        if held.get("machine") == _machine():  # a pid can be checked: alive = held, even if stopped (Ctrl-Z)
            return None if _pid_alive(int(held.get("pid", -1))) else "that process is no longer running"
        age = time.time() - float(held.get("renewed", 0))
        lease = float(held.get("lease_s", self.lease_s))
        if age > lease:
            return f"its lease was last renewed {age:.0f} s ago (lease {lease:.0f} s)"
        return None

    def _error(self, held: dict) -> RunLockedError:
        run_dir = self.path.parent
        if not held:
            return RunLockedError(f"run directory {run_dir} is locked by another unitrain run (its lock file "
                                  f"{self.path} is unreadable). Wait for that run to finish, or remove the file if "
                                  f"you are sure none is running; or start a new run with name=<new name>")
        age = time.time() - float(held.get("renewed", 0))
        lease = float(held.get("lease_s", self.lease_s))
        when = "as soon as it is gone" if held.get("machine") == _machine() else \
            f"once its lease of {lease:.0f} s expires unrenewed"
        return RunLockedError(
            f"run directory {run_dir} is in use by another unitrain run: pid {held.get('pid')} on host "
            f"{held.get('host')}, since {held.get('since_text')} (lease renewed {age:.0f} s ago). Wait for it to "
            f"finish or stop it, or start a new run with name=<new name>. A lock whose holder died is taken over "
            f"automatically, {when}")

    # ---------------------------------------------------------------- acquire / renew / release
    def acquire(self) -> "RunLock":
        self._since = time.time()
        if self._link_create(self.path, self._content()):
            return self._start()
        held = self._read()
        if held is None:  # released between our two looks
            if self._link_create(self.path, self._content()):
                return self._start()
            held = self._read() or {}
        why = self._stale(held)
        if why is None:
            raise self._error(held)
        self._take_over(held, why)
        return self._start()

    def _take_over(self, stale: dict, why: str) -> None:
        guard = self.path.with_name(self.path.name + ".takeover")
        if not self._link_create(guard, {"pid": os.getpid(), "host": socket.gethostname()}):
            try:
                if time.time() - guard.stat().st_mtime > 60:  # a takeover takes milliseconds: this one died
                    guard.unlink(missing_ok=True)
                    return self._take_over(stale, why)
            except FileNotFoundError:
                return self._take_over(stale, why)
            raise self._error(stale)  # another run is taking it over right now
        try:
            now = self._read()
            if now is not None and now.get("token") != stale.get("token"):
                raise self._error(now)  # someone else took it between our read and our guard
            os.replace(self._private("new", self._content()), self.path)
        finally:
            guard.unlink(missing_ok=True)
        self.say(f"run directory {self.path.parent}: took over the lock of pid {stale.get('pid', '?')} on host "
                 f"{stale.get('host', '?')} (since {stale.get('since_text', '?')}): {why}")

    def _start(self) -> "RunLock":
        self._thread = threading.Thread(target=self._renew_loop, name="unitrain-run-lock", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            self.renew()

    def renew(self) -> bool:
        """Extend the lease; False (and a loud log line) when another run has taken the lock away."""
        held = self._read()
        if not held or held.get("token") != self.token:
            if not self.lost:
                log.error("the lock on %s was taken over by another run (pid %s on %s): this run stopped renewing "
                          "for longer than its lease; its next writes may collide", self.path.parent,
                          (held or {}).get("pid"), (held or {}).get("host"))
            self.lost = True
            self._stop.set()
            return False
        os.replace(self._private("renew", self._content()), self.path)
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held and held.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

