"""medtl adapt and evaluate --adapt-bn (AdaBN) on a trained run: what changes, what is said."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import medtl
from medtl.cli import main
from medtl.run import load_run

from .conftest import write_blob_images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    data = write_blob_images(root / "blobs", n_per_class=8, size=40,
                             splits=("train", "val", "test"))
    # the "new scanner": the same kind of images, brighter and with more contrast
    target = root / "scanner2"
    write_blob_images(target, n_per_class=6, size=40, seed=5, splits=("test",))
    for p in target.rglob("*.png"):
        from PIL import Image

        img = np.asarray(Image.open(p), dtype=np.float32)
        Image.fromarray(np.clip(img * 1.6 + 40, 0, 255).astype(np.uint8)).save(p)
    run = medtl.train(data, backbone="mobilenet_v2", weights="random", strategy="fine-tune",
                      unfreeze=2, image_size=32, epochs=1, augment="none",
                      out=root / "run", quiet=True)
    return run, data, target


def _run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    return out


def test_adapt_writes_a_run_whose_model_differs_only_in_batchnorm_statistics(
        trained, tmp_path, capsys, caplog):
    run, data, target = trained
    _run(["adapt", run.path, target, "--out", tmp_path / "adapted", "--quiet"], capsys)
    adapted = load_run(tmp_path / "adapted")
    record = adapted.config["adapted_bn"]
    assert record["method"] == "adabn" and record["images"] == 12
    assert "test" not in adapted.metrics and "test" in adapted.metrics["before_adaptation"]
    assert adapted.metrics["thresholds"] == run.metrics["thresholds"]  # chosen on val, kept
    a = run.load_model(quiet=True).model_.network.state_dict()
    b = adapted.load_model(quiet=True).model_.network.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith(("running_mean", "running_var",
                                       "num_batches_tracked")) for k in changed)
    # only the two trained blocks' layers: the frozen blocks keep ImageNet's statistics,
    # which the trained layers above them learned on
    top = list(adapted.load_model(quiet=True).model_.network.blocks)[-2:]
    assert all(any(f"blocks.{b}." in k for b in top) for k in changed), changed
    assert record["layers"] > 0 and record["layers_frozen_kept"] > 0
    # the adapted model is what evaluate scores and export ships
    out = _run(["evaluate", tmp_path / "adapted", data, "--json", "--quiet"], capsys)
    assert json.loads(out)["n"] == 16
    _run(["export", tmp_path / "adapted", "--out", tmp_path / "bundle"], capsys)
    rows_run = medtl.predict(tmp_path / "adapted", [target], quiet=True)
    rows_bundle = medtl.predict(tmp_path / "bundle", [target], quiet=True)
    rows_before = medtl.predict(run.path, [target], quiet=True)
    col = [k for k in rows_run[0] if k.startswith("prob_")][0]
    p_run = np.array([float(r[col]) for r in rows_run])
    assert np.allclose(p_run, [float(r[col]) for r in rows_bundle], atol=1e-4)
    assert not np.allclose(p_run, [float(r[col]) for r in rows_before], atol=1e-4)
    # predict --adapt-bn: the same adaptation for one prediction, the run left as it was
    _run(["predict", run.path, target, "--adapt-bn", target, "--output", tmp_path / "p.csv",
          "--quiet"], capsys)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medtl"):
        rows_once = medtl.predict(run.path, [target], adapt_bn=[target], quiet=True)
    assert np.allclose(p_run, [float(r[col]) for r in rows_once], atol=1e-5)
    # the guard is off for the adapted prediction, and the log says why (not "saved before")
    assert "fitted on the unadapted features" in caplog.text
    assert "saved before" not in caplog.text
    with pytest.raises(medtl.MedtlError, match="medtl adapt"):
        medtl.predict(tmp_path / "bundle", [target], adapt_bn=[target], quiet=True)


def test_evaluate_adapt_bn_says_when_it_is_transductive(trained, capsys):
    run, data, target = trained
    out = _run(["evaluate", run.path, data, "--adapt-bn", data / "test", "--json", "--quiet"],
               capsys)
    record = json.loads(out)["adapted_bn"]
    assert record["transductive"] and record["scored_images_adapted_on"] == 16
    out = _run(["evaluate", run.path, data, "--adapt-bn", target, "--json", "--quiet"],
               capsys)
    assert json.loads(out)["adapted_bn"]["transductive"] is False
    assert load_run(run.path).config.get("adapted_bn") is None  # the run itself untouched


def test_a_frozen_backbone_has_nothing_to_adapt(trained, tmp_path, capsys):
    _, data, target = trained
    frozen = medtl.train(data, backbone="mobilenet_v2", weights="random",
                         strategy="feature-extractor", image_size=32, out=tmp_path / "fx",
                         quiet=True)
    with pytest.raises(SystemExit) as exc:
        main(["adapt", str(frozen.path), str(target), "--out", str(tmp_path / "a")])
    assert exc.value.code == 2
    assert "frozen ImageNet" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
