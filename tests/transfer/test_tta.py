"""Test-time augmentation (medtl.data.tta): the probabilities are the mean over views built here
independently with numpy; flips are refused where the run's augmentation forbids them; the run
records its TTA and evaluate/predict use it by default; TTA off changes nothing."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

import medtl
from medtl.data import load_dataset
from medtl.data.tta import ZOOM_IN, ZOOM_OUT, shift_pixels, view_names
from medtl.errors import MedtlError
from medtl.run import load_run
from medtl.training.options import TrainOptions
from medtl.workflow import evaluate, predict
from tests.conftest import write_blob_images

SIZE = 64
FAST = dict(backbone="mobilenet_v2", weights="imagenet", image_size=SIZE, quiet=True,
            strategy="hybrid", head="logreg")


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blob_images(tmp_path_factory.mktemp("tta") / "blobs", n_per_class=4,
                             size=SIZE, splits=("train", "val", "test"))


@pytest.fixture(scope="module")
def runs(blobs, tmp_path_factory):
    root = tmp_path_factory.mktemp("tta_runs")
    return {"plain": medtl.train(blobs, out=root / "plain", **FAST).path,
            # --no-hflip: standard leaves the flip out, and flip is refused
            "std": medtl.train(blobs, out=root / "std", tta="standard", hflip=False,
                               **FAST).path}


# ---------------------------------------------------------------------- views, by numpy
def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, half-pixel centres, no antialiasing, on the last two axes."""
    def weights(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = weights(x.shape[-2])
    x0, x1, wx = weights(x.shape[-1])
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def _numpy_views(x: np.ndarray, fill: np.ndarray, flip: bool) -> list[np.ndarray]:
    """The standard views of normalised (N, C, S, S) images, written from the docs."""
    s = x.shape[-1]
    black = np.broadcast_to(fill.reshape(1, -1, 1, 1), x.shape).copy()
    views = [x] + ([x[..., ::-1]] if flip else [])
    c = round(s / ZOOM_IN)
    lo = (s - c) // 2
    views.append(_resize(x[..., lo:lo + c, lo:lo + c], s))
    c = round(s * ZOOM_OUT)
    lo = (s - c) // 2
    out = black.copy()
    out[..., lo:lo + c, lo:lo + c] = _resize(x, c)
    views.append(out)
    d = shift_pixels(s)
    plus, minus = black.copy(), black.copy()
    plus[..., d:, d:] = x[..., :s - d, :s - d]
    minus[..., :s - d, :s - d] = x[..., d:, d:]
    return views + [plus, minus]


def test_tta_probabilities_are_the_mean_over_the_views(runs, blobs):
    model = load_run(runs["std"]).load_model(quiet=True).model_
    assert model.tta == "standard"
    assert "hflip" not in model.tta_views().names  # the run said --no-hflip
    test = load_dataset(blobs).split("test")
    pre = model.preprocessing
    x = pre.normalise(np.stack([pre.resize_uint8(test.read(i)) for i in range(len(test))]))
    fill = -np.asarray(pre.model_mean, np.float32) / np.asarray(pre.model_std, np.float32)
    views = _numpy_views(x.astype(np.float64), fill, flip=False)
    assert len(views) == len(view_names("standard", flip=False)) == 5
    with torch.no_grad():
        feats = [model.backbone.cpu().forward_features(torch.from_numpy(v.astype(np.float32)))
                 for v in views]
    want = np.mean([model.predict_proba_features(f.numpy(), calibrated=False) for f in feats],
                   axis=0)
    got = model.predict_proba(test, cache=False)
    np.testing.assert_allclose(got, want, atol=1e-5)
    plain = model.predict_proba_features(feats[0].numpy(), calibrated=False)
    assert np.abs(got - plain).max() > 1e-4  # the views do change the probabilities
    # The OOD score is the unaugmented view's
    _, scores = model.predict_proba_ood(test)
    np.testing.assert_allclose(scores, model.ood.score(feats[0].numpy()), rtol=1e-4)


# ---------------------------------------------------------------------- flips and policy
def test_flip_is_refused_where_the_augmentation_forbids_it(blobs, tmp_path):
    with pytest.raises(MedtlError, match="no-hflip"):
        TrainOptions(tta="flip", hflip=False).check()
    with pytest.raises(MedtlError, match="augment none"):
        TrainOptions(tta="flip", augment="none").check()
    with pytest.raises(MedtlError, match="tta"):
        TrainOptions(tta="sideways").check()
    with pytest.raises(MedtlError, match="unknown tta") as bad:  # as from a crafted model.json
        TrainOptions(tta="x" * 100_000).check()
    assert len(str(bad.value)) < 200
    TrainOptions(tta="flip").check()  # basic augmentation flips: allowed
    assert "hflip" in view_names("standard", flip=True)
    assert "hflip" not in view_names("standard", flip=False)
    # Refused before any training, and no run is left behind
    with pytest.raises(MedtlError, match="no-hflip"):
        medtl.train(blobs, out=tmp_path / "r", **{**FAST, "tta": "flip", "hflip": False})
    assert not (tmp_path / "r" / "model").exists()


def test_run_records_tta_and_evaluate_predict_use_it(runs, blobs):
    run = load_run(runs["std"])
    assert run.config["options"]["tta"] == "standard"
    model = run.load_model(quiet=True).model_
    test = load_dataset(blobs).split("test")
    want = model.predict_proba(test, cache=False)
    result = evaluate(runs["std"], split="test", quiet=True)
    assert result["tta"] == "standard"
    got = np.array([[r["prob_bar"], r["prob_disc"]] for r in result["rows"]])
    np.testing.assert_allclose(got, want, atol=1e-6)
    with open(runs["std"] / "predictions.csv", newline="") as fh:
        recorded = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    np.testing.assert_allclose([[float(r["prob_bar"]), float(r["prob_disc"])]
                                for r in recorded], want, atol=1e-6)
    rows = predict(runs["std"], [blobs / "test"], quiet=True)
    by_path = {r["path"]: (r["prob_bar"], r["prob_disc"]) for r in rows}
    mine = {str(Path(p).relative_to(blobs / "test")): tuple(w) for p, w in zip(
        test.paths, want, strict=True)}
    assert by_path.keys() == mine.keys()
    np.testing.assert_allclose([by_path[k] for k in mine], [mine[k] for k in mine], atol=1e-6)
    # An override is used and said; flip stays refused for this --no-hflip run
    off = evaluate(runs["std"], split="test", quiet=True, tta="none")
    assert off["tta"] == "none"
    assert not np.allclose([[r["prob_bar"]] for r in off["rows"]], want[:, :1], atol=1e-4)
    with pytest.raises(MedtlError, match="no-hflip"):
        predict(runs["std"], [blobs / "test"], quiet=True, tta="flip")


def test_tta_none_is_byte_identical_to_no_option(runs, tmp_path):
    from medtl.run import write_csv

    assert load_run(runs["plain"]).config["options"]["tta"] == "none"
    # The TTA run told none writes, byte for byte, the test rows of the run without the option
    # (hybrid heads never augment: the two runs learnt the same head)
    rows = evaluate(runs["std"], split="test", quiet=True, tta="none")["rows"]
    write_csv(tmp_path / "none.csv", rows)
    lines = (runs["plain"] / "predictions.csv").read_text().splitlines(keepends=True)
    plain_test = "".join(lines[:1] + [x for x in lines[1:] if ",test," in x])
    assert (tmp_path / "none.csv").read_text() == plain_test


def test_the_ood_fit_reads_plain_features_without_building_views(runs, blobs, monkeypatch):
    """The detector uses the plain image's features, so fitting it on a TTA run must not pay
    for the views' forward passes (up to 5,000 training images at the run's size)."""
    from medtl.transfer.estimator import fit_ood
    from medtl.transfer.fitted import FittedModel

    model = load_run(runs["std"]).load_model(quiet=True).model_
    assert model.tta == "standard"
    ds = load_dataset(blobs)

    def no_views(self):
        raise AssertionError("TTA views built while fitting the OOD detector")

    monkeypatch.setattr(FittedModel, "tta_views", no_views)
    detector = fit_ood(model, ds.split("train"), ds.split("val"))
    assert detector is not None and model.tta == "standard"  # the run's own setting restored
    plain = load_run(runs["plain"]).load_model(quiet=True).model_.ood
    np.testing.assert_allclose(detector.location_, plain.location_, rtol=1e-5, atol=1e-6)
