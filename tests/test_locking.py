"""The per-clone stage lock tolerates a lock file caught between its creation and its JSON."""
import threading
import time

import pydantic_core

from fewstep.pipeline import locking
from fewstep.pipeline.locking import SafeReadLockManager


def test_lock_file_read_while_its_holder_is_still_writing_it(tmp_path):
    manager = SafeReadLockManager(lock_files_directory=tmp_path)
    lock = tmp_path / "stage-key.lock"
    lock.touch()  # what another run's acquire_lock leaves for a moment

    def holder_writes():
        time.sleep(0.2)
        lock.write_bytes(pydantic_core.to_json({"holder": "other-run", "expiration": None}))

    writer = threading.Thread(target=holder_writes)
    writer.start()
    assert manager.is_locked("stage-key")
    writer.join()
    assert manager.is_lock_holder("stage-key", "other-run")
    assert not manager.is_lock_holder("stage-key", "this-run")


def test_lock_file_left_empty_by_a_dead_process_is_cleared(tmp_path, monkeypatch):
    monkeypatch.setattr(locking, "WRITE_GRACE_S", 0.1)
    manager = SafeReadLockManager(lock_files_directory=tmp_path)
    (tmp_path / "stage-key.lock").touch()
    assert manager.acquire_lock("stage-key", holder="this-run", acquire_timeout=5)
    assert manager.is_lock_holder("stage-key", "this-run")
    manager.release_lock("stage-key", holder="this-run")
    assert not (tmp_path / "stage-key.lock").exists()
