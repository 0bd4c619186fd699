"""medtl.files: the one atomic, durable writer, and the lock that keeps a run to one process."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from medtl import files
from medtl.files import LockHeldError, atomic_open, atomic_path, atomic_write, hold_lock


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_the_file_with_ordinary_permissions(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write(target, "first")
    atomic_write(target, b"second \xff")
    assert target.read_bytes() == b"second \xff"
    assert _listing(target.parent) == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    # mkstemp would give 0600; a run directory shared with colleagues needs the umask's mode.
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(error), atomic_open(target) as f:
        f.write(b"half of the new")
        raise error("killed mid-write")
    assert target.read_bytes() == b"old"
    assert _listing(tmp_path) == ["model.bin"]


def test_a_library_that_writes_to_a_path_gets_the_same_guarantees(tmp_path):
    target = tmp_path / "model.onnx"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"exported")
        assert not target.exists()
    assert target.read_bytes() == b"exported"
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_bytes(b"broken export")
        raise ValueError("export failed")
    assert target.read_bytes() == b"exported"
    assert _listing(tmp_path) == ["model.onnx"]


def test_the_file_and_then_its_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write(tmp_path / "x.txt", "data")
    assert synced == ["file", "dir"]
    synced.clear()
    with atomic_path(tmp_path / "y.bin") as tmp:
        tmp.write_bytes(b"data")
    assert synced == ["file", "dir"]


def test_write_csv_and_write_json_bytes(tmp_path):
    files.write_csv(tmp_path / "p.csv", [{"path": "a.png", "prob": 0.1 + 0.2, "n": 3},
                                         {"path": "b,c.png", "prob": 1e-20, "extra": "x"}])
    assert (tmp_path / "p.csv").read_bytes() == (
        b'path,prob,n,extra\na.png,0.30000000000000004,3,\n"b,c.png",1e-20,,x\n')
    files.write_csv(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_bytes() == b""
    files.write_json(tmp_path / "m.json", {"auc": np.float32(0.5), "cm": np.array([[1, 2]]),
                                           "n": np.int64(3), "where": tmp_path})
    assert json.loads((tmp_path / "m.json").read_text()) == {
        "auc": 0.5, "cm": [[1, 2]], "n": 3, "where": str(tmp_path)}
    assert (tmp_path / "m.json").read_text().endswith("}\n")


def test_a_second_holder_is_refused_with_the_first_ones_identity(tmp_path):
    lock = tmp_path / ".run.lock"
    with hold_lock(lock) as holder:
        assert holder["pid"] == os.getpid()
        with pytest.raises(LockHeldError) as err, hold_lock(lock):
            pass
        assert err.value.holder["pid"] == os.getpid()
        assert f"pid {os.getpid()}" in str(err.value)
    assert not lock.exists()  # released and removed
    with hold_lock(lock):  # free again
        pass


def test_a_killed_holder_does_not_block_the_next(tmp_path):
    lock = tmp_path / ".run.lock"
    code = ("import sys, time; from medtl.files import hold_lock\n"
            "with hold_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"held\n"
        with pytest.raises(LockHeldError, match=f"pid {proc.pid}"), hold_lock(lock):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock.exists()  # left behind by the killed process...
    with hold_lock(lock) as holder:  # ...and no obstacle: the kernel dropped its lock
        assert holder["pid"] == os.getpid()
