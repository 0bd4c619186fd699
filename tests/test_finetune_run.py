"""Trainable strategies end to end through medtl.train on small synthetic data (CPU)."""

from __future__ import annotations

import numpy as np
import pytest

import medtl

from .conftest import write_blob_images


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blob_images(tmp_path_factory.mktemp("ft") / "blobs", n_per_class=16, size=48)


@pytest.mark.parametrize("strategy,extra", [
    ("fine-tune", {"unfreeze": 1}),
    ("full", {}),
    ("scratch", {}),
    ("truncated", {"keep": 4}),
])
def test_trainable_strategy_writes_a_run_that_reloads_exactly(blobs, tmp_path, strategy, extra):
    run = medtl.train(blobs, backbone="mobilenet_v2", strategy=strategy, image_size=48,
                      epochs=2, augment="none", out=tmp_path / strategy, quiet=True, **extra)
    m = run.metrics
    assert m["test"]["n"] == 32 and np.isfinite(m["test"]["accuracy"])
    assert m["params"]["trainable"] <= m["params"]["total"]
    if strategy == "fine-tune":
        assert m["params"]["trainable"] < m["params"]["total"] / 2
    else:
        assert m["params"]["trainable"] == m["params"]["total"]
    assert (run.path / "model" / "model.safetensors").is_file()
    assert not (run.path / "checkpoints").exists()
    assert run.config["weights"]["kind"] == ("random" if strategy == "scratch" else "imagenet")
    saved = {r["path"]: r for r in run.predictions() if r["split"] == "test"}
    again = medtl.evaluate(run.path, quiet=True)
    for row in again["rows"]:
        for c in run.config["classes"]:
            assert row[f"prob_{c}"] == float(saved[row["path"]][f"prob_{c}"])
    assert "epoch" in (run.path / "history.csv").read_text().splitlines()[0]


def test_resume_needs_a_checkpoint(blobs, tmp_path):
    with pytest.raises(medtl.MedtlError, match="nothing to resume"):
        medtl.train(blobs, strategy="fine-tune", out=tmp_path / "r", resume=True, quiet=True)
