"""Who computes a cache key: one machine of the team (LeaseLockManager), or one process of this clone.

Prefect's file lock manager, made safe to read while another process takes the lock:

Prefect 3.8.8's FileSystemLockManager creates the lock file empty and writes its JSON a moment later; a
second run reading it in between gets `ValueError: EOF while parsing` and its task fails (seen when two
runs in one clone reach the same stage together). Here an unreadable lock file is read again until its
holder has written it; one still empty after `WRITE_GRACE_S` was left by a process that died between the
two steps, and is removed so the key does not stay locked forever.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager
from prefect.locking.protocol import LockManager

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


class LeaseLockManager(LockManager):
    """One lock per cache key for the whole team, held as a lease on the Prefect server every machine talks to.

    Each key is a global concurrency limit of one slot (`fewstep-key-<key>`, created on first use). Taking
    the lock takes that slot with a lease the holder keeps renewing; a holder that dies stops renewing, and
    the server frees the slot when the lease runs out (`lease_s`, at least the server's minimum of 60 s),
    so the next waiter computes the key. Prefect's SERIALIZABLE cache isolation calls this around each
    cache miss: lock, look for a record again (another machine may have written it while we waited), compute
    only if there is none, write the record, unlock.
    """

    def __init__(self, lease_s: float = 60.0):
        self.lease_s = max(60.0, lease_s)
        self._held: dict[str, tuple[str, threading.Event, threading.Thread]] = {}

    @staticmethod
    def limit_name(key: str) -> str:
        return f"fewstep-key-{key}"

    def _ensure_limit(self, name: str) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.exceptions import ObjectAlreadyExists

        with get_client(sync_client=True) as client:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        from prefect.concurrency.sync import concurrency

        if self.is_lock_holder(key, holder):
            return True
        name = self.limit_name(key)
        self._ensure_limit(name)
        if self.is_locked(key):
            _log(f"key {key[:12]}: another run holds its lease on the Prefect server; waiting for its record "
                 f"(a holder that dies frees it within {self.lease_s:.0f} s)")
        acquired, release, failure = threading.Event(), threading.Event(), []

        def hold() -> None:  # the public context manager keeps the lease renewed while its block runs
            try:
                with concurrency(name, occupy=1, timeout_seconds=acquire_timeout, lease_duration=self.lease_s,
                                 strict=True, raise_on_lease_renewal_failure=False):
                    acquired.set()
                    release.wait()
            except BaseException as exc:  # reported to the caller, not lost in a thread
                failure.append(exc)
                acquired.set()

        thread = threading.Thread(target=hold, name=f"lease-{key[:12]}", daemon=True)
        thread.start()
        acquired.wait()
        if failure:
            if isinstance(failure[0], TimeoutError) or "timed out" in str(failure[0]):
                return False
            raise failure[0]
        self._held[key] = (holder, release, thread)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        import asyncio

        return await asyncio.to_thread(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        held = self._held.get(key)
        if held is None or held[0] != holder:
            raise ValueError(f"cannot release the lock on {key}: not held by {holder}")
        del self._held[key]
        held[1].set()
        held[2].join(timeout=30)

    def is_locked(self, key: str) -> bool:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                return client.read_global_concurrency_limit_by_name(self.limit_name(key)).active_slots > 0
            except ObjectNotFound:
                return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        held = self._held.get(key)
        return held is not None and held[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(1.0)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        import asyncio

        return await asyncio.to_thread(self.wait_for_lock, key, timeout)


def _log(message: str) -> None:
    from prefect.logging import get_logger, get_run_logger

    try:
        get_run_logger().info(message)
    except Exception:  # outside a run
        get_logger("fewstep").info(message)


def team_server() -> str | None:
    """The Prefect server every machine of the team talks to (PREFECT_API_URL), or None for a local run
    (Prefect's temporary server lives and dies with this process: its leases would guard nothing)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def lock_manager(lock_dir: Path):
    """Team-wide leases when a Prefect server is configured, else this clone's lock files."""
    if team_server():
        return LeaseLockManager(float(os.environ.get("FEWSTEP_LEASE_S", "60")))
    return SafeReadLockManager(lock_files_directory=lock_dir)
