"""Nothing lost (issue 14, acceptance 4), each through the command line in a subprocess:
--overwrite and demo leave a folder that is not a run alone; a retrain killed mid-epoch leaves
the old run whole; a second writer of the same run is refused, naming the first."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medtl
from medtl import run as bundle

from .processes import wait_for

# Many epochs, no early stop: the process is surely still training when the test acts on it.
LONG_TRAINING = ["--strategy", "full", "--weights", "random", "--image-size", "32",
                 "--epochs", "500", "--patience", "500", "--augment", "none", "--quiet"]


def _medtl(*args: str) -> list[str]:
    return [sys.executable, "-m", "medtl.cli", *args]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Two classes a small network tells apart (a disc, a bar), train/val/test, 32 px."""
    root = tmp_path_factory.mktemp("loss") / "shapes"
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:32, :32]
    for split in ("train", "val", "test"):
        for cls in ("bar", "disc"):
            (root / split / cls).mkdir(parents=True)
            for i in range(6):
                img = rng.integers(0, 60, (32, 32), dtype=np.uint8)
                cy, cx = rng.integers(8, 24, 2)
                if cls == "disc":
                    img[(yy - cy) ** 2 + (xx - cx) ** 2 < 20] = 230
                else:
                    img[cy - 2:cy + 2, 3:29] = 230
                Image.fromarray(img).save(root / split / cls / f"{split}{i}.png")
    return root


def _not_a_run(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    (folder / "drafts").mkdir(parents=True)
    (folder / "config.json").write_text('{"lr": 0.1, "note": "my own experiment"}\n')
    (folder / "notes.txt").write_text("results to keep\n")
    (folder / "drafts" / "figure.png").write_bytes(b"\x89PNG not really")
    return folder


@pytest.mark.parametrize("command", ["demo", "train"])
def test_a_folder_that_is_not_a_run_is_refused_and_left_intact(tmp_path, shapes, command):
    folder = _not_a_run(tmp_path)
    before = _snapshot(folder)
    args = (["demo", "--out", str(folder), "--quiet"] if command == "demo" else
            ["train", str(shapes), "--strategy", "hybrid", "--out", str(folder), "--overwrite",
             "--quiet"])
    done = subprocess.run(_medtl(*args), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "not a medtl run" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no draft, no lock left


def test_a_retrain_killed_mid_epoch_leaves_the_old_run_whole(tmp_path, shapes):
    out = tmp_path / "run"
    medtl.train(shapes, strategy="hybrid", weights="random", image_size=32, out=out, quiet=True)
    before = _snapshot(out)
    retrain = subprocess.Popen(_medtl("train", str(shapes), *LONG_TRAINING, "--out", str(out),
                                      "--overwrite"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = bundle.partial_dir(out) / bundle.CHECKPOINTS
    try:
        # A checkpoint of the new run exists: an epoch is over and the next one is running.
        wait_for(lambda: any(checkpoints.glob("*.pt")), retrain, "a checkpoint")
    finally:
        retrain.send_signal(signal.SIGKILL)
        retrain.communicate()
    assert retrain.returncode == -signal.SIGKILL
    assert _snapshot(out) == before
    run = medtl.load_run(out)
    saved = {r["path"]: r for r in run.predictions()}
    for split in ("val", "test"):
        rows = medtl.evaluate(run, split=split, quiet=True)["rows"]
        assert len(rows) == 12
        for row in rows:
            for c in run.config["classes"]:
                assert row[f"prob_{c}"] == float(saved[row["path"]][f"prob_{c}"])
    assert bundle.resumable(out)  # and the killed retrain can be continued with --resume


def test_a_second_writer_of_a_run_is_refused_naming_the_first(tmp_path, shapes):
    out = tmp_path / "run"
    first = subprocess.Popen(_medtl("train", str(shapes), *LONG_TRAINING, "--out", str(out)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = bundle.lock_file(out)

    def holder() -> dict:
        try:
            return json.loads(lock.read_text())
        except (OSError, ValueError):
            return {}

    try:
        wait_for(lambda: holder().get("pid") == first.pid, first, "the first writer's lock")
        second = subprocess.run(_medtl("train", str(shapes), "--strategy", "hybrid", "--out",
                                       str(out), "--overwrite", "--quiet"),
                                capture_output=True, text=True, timeout=300)
        assert first.poll() is None  # the first one held the run all along
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert second.returncode == 2, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert f"in use by pid {first.pid} on " in second.stderr and "medtl" in second.stderr
    assert not out.exists()  # the second one wrote nothing
