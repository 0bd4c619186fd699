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


@pytest.mark.parametrize("strategy", ["fine-tune", "hybrid"])
def test_grey_models_take_one_channel_and_reload_exactly(blobs, tmp_path, strategy):
    run = medtl.train(blobs, backbone="mobilenet_v2", strategy=strategy, in_chans=1,
                      image_size=48, epochs=2, augment="none", out=tmp_path / strategy,
                      quiet=True)
    assert run.config["preprocessing"]["channels"] == 1
    clf = run.load_model(quiet=True)
    model = clf.model_.backbone
    assert model.in_chans == 1
    assert run.metrics["test"]["auc"] > 0.5
    saved = {r["path"]: r for r in run.predictions() if r["split"] == "test"}
    for row in medtl.evaluate(run.path, quiet=True)["rows"]:
        assert row["prob_disc"] == float(saved[row["path"]]["prob_disc"])


def test_balanced_sampler_replaces_class_weights(tmp_path):
    data = write_blob_images(tmp_path / "few", n_per_class=12, size=48)
    for p in sorted((data / "train" / "disc").glob("*.png"))[3:]:
        p.unlink()  # 3 discs against 12 bars
    run = medtl.train(data, strategy="fine-tune", sampler="balanced", image_size=48, epochs=1,
                      augment="none", out=tmp_path / "run", quiet=True)
    assert run.config["strategy_params"]["sampler"] == "balanced"
    assert run.config["class_weight"] is None
    assert "balanced sampler, so no class weights" in (run.path / "log.txt").read_text()
    weighted = medtl.train(data, strategy="fine-tune", image_size=48, epochs=1, augment="none",
                           out=tmp_path / "weighted", quiet=True)
    assert weighted.config["class_weight"] == "balanced"  # 3/12 < 0.5: applied automatically


def test_frozen_strategies_refuse_a_sampler(blobs, tmp_path):
    with pytest.raises(medtl.MedtlError, match="--sampler balanced: frozen strategies"):
        medtl.train(blobs, strategy="hybrid", sampler="balanced", out=tmp_path / "s", quiet=True)
