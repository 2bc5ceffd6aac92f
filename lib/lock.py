"""One run per output directory: a lock file naming its holder.

    with DirLock("runs/pretrain"):      # writes runs/pretrain/.lock = {"host", "pid", "since"}
        ...

A second run on the same directory stops with an error naming the holder's host and pid
(two runs would interleave their checkpoints and logs). A lock left by a process that no longer
exists on this host (killed with SIGKILL, a crashed node restarted) is stale: it is taken over
with a warning. A lock held from another host cannot be checked from here; the error says how to
remove it once that run is known to be gone.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from lib.errors import UserError

LOCK_NAME = ".lock"
_UNREADABLE_GRACE_S = 10.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class DirLock:
    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LOCK_NAME
        self._held = False

    def acquire(self) -> None:
        try:
            self._acquire()
        except OSError as e:
            raise UserError(f"cannot write to {self.path.parent}: {e.strerror or e}") from None

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder, me["host"], self.path):
                    raise UserError(self._busy_message(holder)) from None
                print(f"warning: {self.path.parent} was locked by pid {holder.get('pid')} on "
                      f"{holder.get('host')}, which no longer runs; taking the lock over",
                      file=sys.stderr, flush=True)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return
        raise UserError(f"cannot take the lock {self.path}: another run took it at the same time")

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):  # half-written by a holder killed while writing it
            return {}

    @staticmethod
    def _stale(holder: dict, host: str, path: Path) -> bool:
        pid = holder.get("pid")
        if not holder or not isinstance(pid, int):
            # Unreadable: its writer died before finishing it, or is writing it right now.
            try:
                return time.time() - path.stat().st_mtime > _UNREADABLE_GRACE_S
            except FileNotFoundError:
                return True
        return holder.get("host") == host and not _alive(pid)

    def _busy_message(self, holder: dict) -> str:
        return (f"{self.path.parent} is in use by another run (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, since {holder.get('since')}): wait for it, choose another "
                f"out_dir, or, if that run is gone, delete {self.path}")

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
