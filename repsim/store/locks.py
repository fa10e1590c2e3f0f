"""The writer lock of a store (one writer per store or per shard): a lock file with the owner's host and pid,
taken with an exclusive create, released on exit, broken only when its owner is provably dead.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket

from repsim.errors import UsageError

LOCK_NAME = ".repsim-writer.lock"


def shard_lock_name(shard: tuple[int, int] | None) -> str:
    """Writer-lock file name of one shard ``(k, N)`` of a store, or of an unsharded writer (None)."""
    return LOCK_NAME if shard is None else f".repsim-writer-shard-{shard[0]}-of-{shard[1]}.lock"


class WriterLock:
    """An exclusive lock file (by default inside the store): a second concurrent writer is refused.

    A lock left by a killed process on this host (its pid no longer alive) is taken over. ``name`` picks
    another lock file in ``folder`` (per-shard writers, store creation).
    """

    def __init__(self, folder: str, name: str = LOCK_NAME):
        self.path = os.path.join(folder, name)
        self.held = False

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock; with ``wait`` > 0, poll up to that many seconds while a live process holds it."""
        import time

        me = {"pid": os.getpid(), "host": socket.gethostname()}
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner and owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)  # stale: its writer was killed
                    continue
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
                raise UsageError(
                    f"{os.path.dirname(self.path)} is being written by {who}; wait for it to finish "
                    f"(or delete {self.path} if that process is gone)"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return

    def holder_alive(self) -> bool:
        """Whether the lock file exists and names a live process (always True for another host's process)."""
        owner = self._owner()
        if owner is None:
            return os.path.exists(self.path)
        if owner.get("host") != socket.gethostname():
            return True
        return _pid_alive(int(owner.get("pid", -1)))

    def _owner(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


