"""The lock file that keeps other processes from writing or replacing a crop store being written.

While a :class:`~mcvi_ops.data.CropWriter` is open, a file beside a local store
(``crops.zarr.lock``), created atomically, names the writing process. Stores that are not local
paths are not locked.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class StoreLockedError(FileExistsError):
    """Another process is writing the crop store (or the output folder)."""


_HELD: dict[str, tuple[int, int]] = {}  # lock file -> (pid, how many holders in that process)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """A lock file beside a local store, created atomically, naming the writing process.

    Held locks are re-entrant within one process; a lock whose process is gone (same host,
    pid no longer running) is stale and broken. Stores that are not local paths are not locked.

    Parameters
    ----------
    url
        The store (or output) being written; the lock file is ``url + ".lock"``.
    what
        What is being written, for the error (``"crop store"``, ``"output folder"``).
    path
        The lock file, when it is not ``url + ".lock"`` (e.g. a file inside an output folder).
    """

    def __init__(self, url: str, *, what: str = "crop store", path: str | None = None) -> None:
        if path is not None:
            self.path: Path | None = Path(path)
        else:
            self.path = None if "://" in url else Path(url + ".lock")
        self.url, self.what = url, what
        self._held = False

    def acquire(self) -> StoreLock:
        """Take the lock, or raise :class:`StoreLockedError` naming the process holding it."""
        if self.path is None or self._held:
            return self
        key, pid = str(self.path), os.getpid()
        if key in _HELD and _HELD[key][0] == pid:
            _HELD[key] = (pid, _HELD[key][1] + 1)
            self._held = True
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner: dict[str, Any] = {}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if self._stale(owner):
                    self._break(owner)
                    continue
                break
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": pid, "host": socket.gethostname(), "time": time.time()}, fh)
            _HELD[key] = (pid, 1)
            self._held = True
            return self
        msg = (
            f"The {self.what} {self.url} is being written by process "
            f"{owner.get('pid', '?')} on host {owner.get('host', '?')!r} (lock file {self.path}). "
            "Wait for it to finish, or write elsewhere. If that process is gone, delete the lock "
            "file."
        )
        raise StoreLockedError(msg)

    def release(self) -> None:
        """Give the lock back (the last holder in this process deletes the file)."""
        if not self._held or self.path is None:
            return
        self._held = False
        key = str(self.path)
        pid, count = _HELD.get(key, (os.getpid(), 1))
        if count > 1:
            _HELD[key] = (pid, count - 1)
            return
        _HELD.pop(key, None)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _owner(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.path.read_text()))  # type: ignore[union-attr]
        except (OSError, ValueError, TypeError):
            return {}

    def _stale(self, owner: dict[str, Any]) -> bool:
        if not owner:  # being written right now, or its writer died within microseconds
            try:
                return time.time() - self.path.stat().st_mtime > 10  # type: ignore[union-attr]
            except FileNotFoundError:
                return True
        return owner.get("host") == socket.gethostname() and not _pid_alive(int(owner["pid"]))

    def _break(self, owner: dict[str, Any]) -> None:
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")  # type: ignore[union-attr]
        try:
            os.rename(self.path, aside)  # atomic: only one process breaks a given lock
        except FileNotFoundError:
            return
        logger.warning("Removed the stale lock of process %s on %s.", owner.get("pid"), self.path)
        aside.unlink(missing_ok=True)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
