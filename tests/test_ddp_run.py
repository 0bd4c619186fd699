"""``medtl train --devices 2`` end to end: two gloo processes started by torchrun on CPU.

Rank 0 alone writes (every file operation of each process is audited), the run records how it
was trained, and a DDP run SIGKILLed after an epoch resumes to the same weights, bit for bit, as
the one never interrupted (every process's generator state travels in the checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from medtl.run import CHECKPOINTS, partial_dir

from .conftest import write_blob_images
from .processes import wait_for

# About 60 s of torchrun processes: slow (make test-all). DDP's arithmetic (two gloo processes
# against one on the same global batch) stays in make test: tests/training/test_distributed.py.
pytestmark = pytest.mark.slow

# Installed in every process through PYTHONPATH: an audit hook that records each file a
# process creates, writes, renames or removes under WATCH, reported at exit as
# "AUDIT <rank> <event> <path>" on stderr.
SITECUSTOMIZE = textwrap.dedent("""
    import atexit, os, sys

    WATCH = os.environ.get("MEDTL_TEST_WATCH")
    RANK = os.environ.get("RANK")
    found = []
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                      else bool((flags or 0) & WRITE_FLAGS))
            paths = [path] if writes else []
        elif event in ("os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir",
                       "shutil.rmtree", "os.truncate", "os.symlink", "os.link"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for p in paths:
            p = os.fsdecode(p) if not isinstance(p, int) else ""
            if p and os.path.abspath(p).startswith(WATCH):
                found.append(f"{event} {p}")

    def report():
        for line in found:
            sys.stderr.write(f"AUDIT {RANK} {line}\\n")

    if WATCH and RANK is not None:
        sys.addaudithook(hook)
        atexit.register(report)
""")

ARGS = ["--strategy", "fine-tune", "--unfreeze", "2", "--epochs", "4", "--patience", "4",
        "--image-size", "32", "--batch-size", "8", "--augment", "basic", "--quiet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-run")
    data = write_blob_images(root / "data", n_per_class=10, size=40,
                             splits=("train", "val", "test"))
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get(
        "PYTHONPATH", "")]), "MEDTL_TEST_WATCH": str(root.resolve()),
        "MEDTL_CACHE_DIR": str(root / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    return root, data, env


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medtl", "train", str(data), *ARGS, "--devices", "2",
            "--out", str(out), *extra]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _audit(stderr: str, rank: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"AUDIT {rank} ")]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    root, data, env = setup
    out = root / "whole"
    proc = subprocess.run(_cmd(data, out), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_rank_zero_alone_writes(uninterrupted):
    out, proc = uninterrupted
    # The audit sees rank 0 write the run (so it does watch), and nothing from rank 1.
    assert any(str(out.name) in line for line in _audit(proc.stderr, "0")), proc.stderr[-2000:]
    assert _audit(proc.stderr, "1") == []
    # One process printed the results.
    assert proc.stdout.count("run: ") == 1


def test_the_run_records_its_processes(uninterrupted):
    out, _ = uninterrupted
    config = json.loads((out / "config.json").read_text())
    assert config["distributed"] == {"processes": 2, "backend": "gloo", "sync_bn": False}
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 4


def test_a_killed_ddp_run_resumes_to_the_same_weights(setup, uninterrupted):
    root, data, env = setup
    whole, _ = uninterrupted
    out = root / "killed"
    ckpt = partial_dir(out) / CHECKPOINTS / "checkpoint.pt"
    proc = subprocess.Popen(_cmd(data, out), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(ckpt.exists, proc, "the first epoch's checkpoint")
    # The launcher and both training processes (torchrun starts each in a session of its own).
    for pid in [proc.pid, *_descendants(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    assert not (out / "config.json").exists(), "the run finished before it was killed"
    resumed = subprocess.run(_cmd(data, out, "--resume"), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(whole / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name
    assert (whole / "history.csv").read_text().splitlines()[1:] != []
    # The epochs' losses match too (the seconds column aside).
    strip = [line.split(",")[:4] for line in (whole / "history.csv").read_text().splitlines()]
    again = [line.split(",")[:4] for line in (out / "history.csv").read_text().splitlines()]
    assert strip == again


def test_auto_climbs_under_ddp_with_rank_zero_alone_on_the_frozen_stage(setup):
    """auto's frozen stage (features, the feature cache, the heads) is rank 0's alone; the
    others take its outcome and climb in step. Rank 1 writes nothing, the cache included."""
    root, data, env = setup
    out = root / "auto"
    cmd = [sys.executable, "-m", "medtl", "train", str(data), "--strategy", "auto",
           "--epochs", "2", "--image-size", "32", "--batch-size", "8", "--quiet",
           "--devices", "2", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["strategy"] == "auto" and config["distributed"]["processes"] == 2
    assert [s["stage"] for s in config["stages"]][0] == "feature-extractor"
    assert any("cache" in line for line in _audit(proc.stderr, "0"))
    assert _audit(proc.stderr, "1") == []


def test_a_strategy_without_a_network_is_refused_before_any_process_starts(setup, tmp_path):
    _, data, env = setup
    proc = subprocess.run([sys.executable, "-m", "medtl", "train", str(data), "--strategy",
                           "hybrid", "--devices", "2", "--out", str(tmp_path / "r")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "trains no network" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
