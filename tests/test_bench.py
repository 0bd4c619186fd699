"""medtl bench: a 2 x 2 grid killed mid-way and rerun recomputes nothing it had finished."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medtl.bench import grid
from medtl.errors import MedtlError

from .conftest import write_blob_images

ARGS = ["--backbones", "mobilenet_v2,efficientnet_lite0",
        "--strategies", "feature-extractor,hybrid:logreg", "--image-size", "64",
        "--patient-regex", r"(p\d+)", "--quiet"]


def _bench_process(data: Path, out: Path, env: dict, *, block_cell: int | None = None,
                   marker: Path | None = None) -> subprocess.Popen:
    """``medtl bench`` in a child process. With ``block_cell=K``, the K-th cell to train
    (1-based) creates ``marker`` once its run has started, then blocks until killed: the kill
    lands mid-cell whatever the machine's speed, with no race against a sleep."""
    code = "import sys; from medtl.cli import main; main(sys.argv[1:])"
    if block_cell is not None:
        code = (
            "import sys, threading, pathlib, medtl\n"
            "real_fit, fits = medtl.TransferClassifier.fit, []\n"
            "def fit(self, *args, **kwargs):\n"
            "    fits.append(1)\n"
            f"    if len(fits) == {block_cell}:\n"
            f"        pathlib.Path({str(marker)!r}).touch()\n"
            "        threading.Event().wait()\n"
            "    return real_fit(self, *args, **kwargs)\n"
            "medtl.TransferClassifier.fit = fit\n"
            "from medtl.cli import main; main(sys.argv[1:])\n")
    return subprocess.Popen([sys.executable, "-c", code, "bench", str(data), "--out", str(out),
                             *ARGS], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def blobs(tmp_path, monkeypatch) -> Path:
    """A tiny two-class image tree, and a feature cache of this test's own (in the
    environment, so that worker processes use it too)."""
    monkeypatch.setenv("MEDTL_CACHE_DIR", str(tmp_path / "cache"))
    return write_blob_images(tmp_path / "blobs", n_per_class=12)


def test_a_killed_bench_reruns_only_its_unfinished_cells(tmp_path):
    data = write_blob_images(tmp_path / "blobs", n_per_class=12)
    out = tmp_path / "bench"
    env = {**os.environ, "MEDTL_CACHE_DIR": str(tmp_path / "cache"), "MEDTL_OFFLINE": "1"}
    marker = tmp_path / "second-cell-started"
    proc = _bench_process(data, out, env, block_cell=2, marker=marker)
    cells = out / "cells"
    # Generous: the first cell may take minutes on a busy machine. The child cannot get past
    # the second cell's start, so there is nothing to race.
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not marker.exists():
        proc.kill()
        pytest.fail(f"the second cell never started (exit {proc.wait()}): "
                    f"{proc.communicate()[1].decode()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in cells.glob("[!.]*/config.json")}
    assert len(finished) == 1
    assert not (out / "leaderboard.csv").exists()

    rerun = _bench_process(data, out, env)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err.decode()[-2000:]
    after = {p.parent.name: p.stat().st_mtime_ns for p in cells.glob("[!.]*/config.json")}
    assert len(after) == 4
    for name, mtime in finished.items():
        assert after[name] == mtime, f"{name} was computed again"
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["cell"] for r in rows) == sorted(after)
    assert all(float(r["auc"]) > 0.5 for r in rows)
    # Ranked on validation AUC (the test AUC is shown, never used to rank).
    chosen_on = [float(r["val_value"]) for r in rows]
    assert chosen_on == sorted(chosen_on, reverse=True) and rows[0]["chosen"] == "yes"
    page = (out / "report.html").read_text()
    assert "Best run per strategy" in page and "AUC by transfer approach" in page


def test_the_grid_is_validated_before_anything_runs():
    assert len(grid(["mobilenet_v2"], ["hybrid:svm", "full"], seeds=3)) == 6
    with pytest.raises(MedtlError, match="unknown strategy"):
        grid(["mobilenet_v2"], ["finetune"])
    with pytest.raises(MedtlError, match="only hybrid takes a head"):
        grid(["mobilenet_v2"], ["full:svm"])
    with pytest.raises(MedtlError):
        grid(["no_such_net"], ["full"])


def test_the_bench_report_renders_in_chromium_and_requests_nothing(tmp_path):
    import numpy as np
    from PIL import Image

    from medtl.bench import bench

    from .reporting.chromium import screenshot

    data = write_blob_images(tmp_path / "blobs", n_per_class=12)
    out = bench(data, backbones=["mobilenet_v2"], strategies=["feature-extractor",
                                                               "hybrid:logreg"],
                out=tmp_path / "bench", image_size=64, patient_regex=r"(p\d+)", quiet=True)
    png = tmp_path / "bench.png"
    assert screenshot(out / "report.html", png) == []
    shot = np.asarray(Image.open(png).convert("L"))
    assert (shot < 128).mean() > 0.005


# 14 s: tests/test_ray_cluster.py runs bench cells as Ray tasks on a two-node cluster in make test
@pytest.mark.slow
def test_cells_run_as_ray_tasks_on_a_local_ray(tmp_path, blobs):
    pytest.importorskip("ray", reason="Ray is optional: pip install 'medtl[ray]'")
    from medtl.bench import bench

    data = blobs  # Ray's workers are new processes: the fixture's cache is in the environment
    out = bench(data, backbones=["mobilenet_v2"], strategies=["hybrid:logreg", "hybrid:knn"],
                out=tmp_path / "bench", image_size=64, patient_regex=r"(p\d+)", ray="local",
                quiet=True)
    cells = sorted(p.parent.name for p in (out / "cells").glob("[!.]*/config.json"))
    assert cells == ["mobilenet_v2-hybrid-knn-seed0", "mobilenet_v2-hybrid-logreg-seed0"]
    with open(out / "leaderboard.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2


@pytest.mark.slow  # 18 s (make test-all); the cells' own results are tested serially above
def test_jobs_run_cells_in_parallel_processes(tmp_path, blobs):
    from medtl.bench import bench

    data = blobs
    out = bench(data, backbones=["mobilenet_v2"], strategies=["hybrid:logreg", "hybrid:knn"],
                out=tmp_path / "bench", image_size=64, patient_regex=r"(p\d+)", jobs=2,
                quiet=True)
    assert len(list((out / "cells").glob("[!.]*/config.json"))) == 2
    assert (out / "report.html").is_file()


def test_cross_validated_cells_rank_on_their_out_of_fold_predictions(tmp_path, blobs):
    from medtl.bench import bench

    data = blobs
    out = bench(data, backbones=["mobilenet_v2"], strategies=["hybrid:logreg", "hybrid:knn"],
                out=tmp_path / "bench", image_size=64, patient_regex=r"(p\d+)", folds=2,
                quiet=True)
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        cv = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["cv"]
        assert float(r["auc"]) == pytest.approx(cv["mean"]["auc"])
    page = (out / "report.html").read_text()
    assert "compared on out-of-fold" in page and "p = " in page


def test_a_bad_path_is_one_error_before_any_cell_runs(tmp_path, capsys):
    from medtl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", str(tmp_path / "nope"), "--out", str(tmp_path / "bench")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.count("no such file or folder") == 1
    assert not (tmp_path / "bench").exists()


def test_each_worker_gets_its_share_of_the_cores(monkeypatch):
    from medtl.bench import worker_options

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert worker_options({"epochs": 2}, 2) == {"epochs": 2, "threads": 4}
    assert worker_options({}, 3)["threads"] == 2
    assert worker_options({}, 16)["threads"] == 1  # never zero
    assert worker_options({"threads": 6}, 2)["threads"] == 6  # the user's choice wins
    assert worker_options({"threads": None}, 4)["threads"] == 2
