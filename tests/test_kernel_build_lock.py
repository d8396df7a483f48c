"""A kernel build killed mid-way leaves torch's `lock` file behind; qwenkit must not wait on it forever."""

from __future__ import annotations

import os
import time

from qwenkit.kernels import cpu


def test_a_stale_build_lock_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - cpu.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    cpu._drop_stale_lock(tmp_path)
    assert not lock.exists()


def test_a_fresh_build_lock_is_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()  # another process is building right now: wait for it, as torch does
    cpu._drop_stale_lock(tmp_path)
    assert lock.exists()
    cpu._drop_stale_lock(tmp_path / "missing")  # no build directory yet: nothing to do
