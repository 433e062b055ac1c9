"""Prefect's file lock manager, made safe to read while another process takes the lock.

Prefect 3.8.8's FileSystemLockManager creates the lock file empty and writes its JSON a moment later; a
second run reading it in between gets `ValueError: EOF while parsing` and its task fails (seen when two
runs in one clone reach the same stage together). Here an unreadable lock file is read again until its
holder has written it; one still empty after `WRITE_GRACE_S` was left by a process that died between the
two steps, and is removed so the key does not stay locked forever.
"""
from __future__ import annotations

import time
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager

WRITE_GRACE_S = 2.0
_POLL_S = 0.01


class SafeReadLockManager(FileSystemLockManager):
    def _get_lock_info(self, key: str, use_cache: bool = True):
        deadline = time.monotonic() + WRITE_GRACE_S
        while True:
            try:
                return super()._get_lock_info(key, use_cache=use_cache)
            except ValueError:  # created, JSON not written yet
                if time.monotonic() >= deadline:
                    Path(self._lock_path_for_key(key)).unlink(missing_ok=True)
                    self._locks.pop(key, None)
                    return None
                time.sleep(_POLL_S)
