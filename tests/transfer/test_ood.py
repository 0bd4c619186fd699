"""The out-of-distribution guard (medtl.transfer.ood): the detector against a direct Mahalanobis
computation, its threshold chosen on validation, its file read as untrusted input, and its
wiring into a run (``medtl predict`` columns, DICOM tags, runs saved before the guard)."""

from __future__ import annotations

import logging
import zipfile

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf

import medtl
from medtl.errors import MedtlError
from medtl.transfer.ood import OOD_FILE, MahalanobisDetector, ood_columns, tag_mismatch
from medtl.workflow import predict
from tests.conftest import blob_image, write_blob_images, write_dicom

FAST = dict(backbone="mobilenet_v2", weights="imagenet", image_size=64, quiet=True)


def _features(seed: int, n: int, dim: int = 12, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(dim, dim))  # one shared correlation
    return scale * rng.normal(size=(n, dim)) @ mix + 3.0


def test_scores_are_the_mahalanobis_distance_under_ledoit_wolf():
    train, val = _features(0, 80), _features(1, 30)
    det = MahalanobisDetector().fit(train, val)
    lw = LedoitWolf().fit(train)
    precision = np.linalg.inv(lw.covariance_)
    want = np.array([mahalanobis(x, lw.location_, precision) for x in val])
    np.testing.assert_allclose(det.score(val), want, rtol=1e-5)


def test_threshold_is_the_validation_percentile_not_train():
    # Validation drawn wider than train: its distances are larger, so the two percentiles differ.
    train, val = _features(0, 200), _features(1, 60, scale=1.5)
    det = MahalanobisDetector(percentile=90.0).fit(train, val)
    assert det.fitted_on_ == "val" and det.n_threshold_ == 60 and det.n_fit_ == 200
    assert det.threshold_ == pytest.approx(np.percentile(det.score(val), 90.0))
    assert det.threshold_ > 1.1 * np.percentile(det.score(train), 90.0)
    # Without validation the training distances choose, and the detector says so.
    alone = MahalanobisDetector(percentile=90.0).fit(train)
    assert alone.fitted_on_ == "train"
    assert alone.threshold_ == pytest.approx(np.percentile(alone.score(train), 90.0))


def test_a_far_input_is_flagged_and_nan_rows_are_not():
    train, val = _features(0, 100), _features(1, 40)
    det = MahalanobisDetector().fit(train, val)
    far = val[:3] + 50.0
    scores = det.score(np.vstack([val[:5], far, np.full((1, 12), np.nan)]))
    flags = det.flag(scores)
    assert flags[5:8].all() and not flags[:5].any() and not flags[8]
    assert np.isnan(scores[8])


def test_save_load_round_trip(tmp_path):
    det = MahalanobisDetector().fit(_features(0, 50), _features(1, 20),
                                    modalities=["cr", "DX"], body_parts=["CHEST"])
    det.save(tmp_path)
    back = MahalanobisDetector.load(tmp_path, dim=12)
    assert back.modalities_ == ["CR", "DX"] and back.body_parts_ == ["CHEST"]
    assert back.threshold_ == det.threshold_ and back.fitted_on_ == "val"
    np.testing.assert_array_equal(back.score(_features(2, 5)), det.score(_features(2, 5)))
    assert MahalanobisDetector.load(tmp_path / "nothing", dim=12) is None


def _arrays(det: MahalanobisDetector) -> dict[str, np.ndarray]:
    return {"location": det.location_, "whitener": det.whitener_,
            "threshold": np.float64(det.threshold_), "percentile": np.float64(99.0),
            "n_fit": np.int64(50), "n_threshold": np.int64(20), "fitted_on": np.str_("val"),
            "modalities": np.asarray([], "<U64"), "body_parts": np.asarray([], "<U64")}


CRAFTED = {
    "wrong shape": lambda a: a.update(whitener=np.eye(11, dtype=np.float32)),
    "not finite": lambda a: a.update(location=np.full(12, np.nan, np.float32)),
    "float64": lambda a: a.update(whitener=a["whitener"].astype(np.float64)),
    "negative threshold": lambda a: a.update(threshold=np.float64(-1)),
    "unknown fitted_on": lambda a: a.update(fitted_on=np.str_("test")),
    "extra member": lambda a: a.update(extra=np.zeros(3)),
    "missing member": lambda a: a.pop("percentile"),
    "object array": lambda a: a.update(modalities=np.array(["CT", 1], dtype=object)),
    "too many tags": lambda a: a.update(modalities=np.asarray([f"M{i}" for i in range(99)])),
    "oversized member": lambda a: a.update(body_parts=np.asarray(["X" * 64] * 60000)),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_file_is_one_error_naming_it(case, tmp_path):
    arrays = _arrays(MahalanobisDetector().fit(_features(0, 50), _features(1, 20)))
    CRAFTED[case](arrays)
    np.savez(tmp_path / OOD_FILE, **arrays)
    with pytest.raises(MedtlError, match=r"ood\.npz.*refused") as caught:
        MahalanobisDetector.load(tmp_path, dim=12)
    if case == "oversized member":  # refused from the zip directory, before numpy reads it
        assert "sizes are not those of a detector" in str(caught.value)


def test_not_a_zip_nor_a_regular_file(tmp_path):
    (tmp_path / OOD_FILE).write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(MedtlError, match=r"ood\.npz.*refused"):
        MahalanobisDetector.load(tmp_path, dim=12)
    (tmp_path / OOD_FILE).unlink()
    (tmp_path / OOD_FILE).symlink_to(tmp_path / "elsewhere.npz")
    with pytest.raises(MedtlError, match=r"ood\.npz.*refused"):
        MahalanobisDetector.load(tmp_path, dim=12)
    assert zipfile  # the member check reads the zip directory before numpy does


def test_tag_mismatch_names_the_tag():
    assert tag_mismatch(("CT", "HEAD"), ["CR", "DX"], ["CHEST"]).startswith("DICOM Modality CT")
    assert "BodyPartExamined HEAD" in tag_mismatch(("CR", "HEAD"), ["CR"], ["CHEST"])
    assert tag_mismatch(("CR", "CHEST"), ["CR"], ["CHEST"]) is None
    assert tag_mismatch(("CT", None), [], []) is None  # training had no DICOM: not judged
    assert tag_mismatch(None, ["CR"], ["CHEST"]) is None  # not a DICOM


# ------------------------------------------------------------------------------ a run
@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory):
    """A frozen logreg run trained on DICOM files (Modality CR, BodyPartExamined CHEST)."""
    root = tmp_path_factory.mktemp("ood_run")
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for cls in ("disc", "bar"):
            (root / "data" / split / cls).mkdir(parents=True)
            for i in range(8):
                write_dicom(root / "data" / split / cls / f"{i}.dcm", blob_image(rng, cls, 48),
                            Modality="CR", BodyPartExamined="CHEST", PatientID=f"P{split}{i}")
    medtl.train(root / "data", out=root / "run", strategy="hybrid", head="logreg", **FAST)
    return root


def test_predict_rows_carry_ood_and_dicom_tags_flag(dicom_run, tmp_path):
    root = dicom_run
    rng = np.random.default_rng(5)
    (tmp_path / "in").mkdir()
    write_dicom(tmp_path / "in" / "ct.dcm", blob_image(rng, "disc", 48), Modality="CT",
                BodyPartExamined="CHEST", PatientID="SECRET-ID")
    write_dicom(tmp_path / "in" / "cr.dcm", blob_image(rng, "disc", 48), Modality="CR",
                BodyPartExamined="CHEST")
    # A checkerboard: nothing like a blob on noise (a plain colour or noise is nearer than
    # one would think with 16 training images and a strongly shrunk covariance).
    checker = (np.indices((48, 48)).sum(axis=0) // 4 % 2 * 255).astype(np.uint8)
    from PIL import Image

    Image.fromarray(checker).save(tmp_path / "in" / "checker.png")
    rows = {r["path"]: r for r in predict(root / "run", [tmp_path / "in"], quiet=True)}
    ct, cr = rows["ct.dcm"], rows["cr.dcm"]
    assert ct["ood"] is True and "DICOM Modality CT not among training's CR" in ct["ood_reason"]
    assert cr["ood"] is False and cr["ood_reason"] == "" and cr["ood_score"] > 0
    assert "SECRET" not in str(rows)
    assert rows["checker.png"]["ood"] is True
    assert rows["checker.png"]["ood_reason"].startswith("feature distance")
    # The same images, scored in the run's own test split, stay mostly under the threshold.
    test = predict(root / "run", [root / "data" / "test"], quiet=True)
    assert sum(r["ood"] for r in test) <= 2


def test_a_run_without_ood_file_predicts_and_says_so(dicom_run, tmp_path, caplog):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(dicom_run / "run", run)
    (run / "model" / OOD_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="medtl"):
        rows = predict(run, [dicom_run / "data" / "test" / "disc"], quiet=True)
    assert len(rows) == 8 and all(r["ood"] is None and r["ood_score"] is None for r in rows)
    assert all(r["prediction"] in ("disc", "bar") for r in rows)
    said = [m for m in caplog.messages if "no out-of-distribution detector" in m]
    assert len(said) == 1
    # A crafted detector in a run is refused with the file named.
    np.savez(run / "model" / OOD_FILE, location=np.zeros(3))
    with pytest.raises(MedtlError, match=r"ood\.npz"):
        predict(run, [dicom_run / "data" / "test" / "disc"], quiet=True)


def test_ood_columns_for_volume_rows_and_unknowns():
    cols = ood_columns(np.array([1.0, np.nan, 9.0]), 5.0, ["a.png", "b.png", "c.png"])
    assert [c["ood"] for c in cols] == [False, None, True]
    assert cols[1]["ood_score"] is None and cols[2]["ood_reason"].startswith("feature distance")
    none = ood_columns(None, None, ["a.png"])
    assert none == [{"ood_score": None, "ood": None, "ood_reason": ""}]


def test_network_features_and_proba_match_predict_proba(tmp_path):
    blobs = write_blob_images(tmp_path / "blobs", n_per_class=6, splits=("train", "val"))
    run = medtl.train(blobs, out=tmp_path / "run", strategy="fine-tune", epochs=1, **FAST)
    model = run.load_model(quiet=True).model_
    from medtl.data import load_dataset

    val = load_dataset(blobs).split("val")
    feats, proba = model.features_and_proba(val)
    np.testing.assert_array_equal(proba, model.predict_proba(val))
    assert feats.shape == (12, model.network.num_features)
    assert model.ood is not None and model.ood.fitted_on_ == "val"
    np.testing.assert_allclose(model.predict_proba_ood(val)[1], model.ood.score(feats))
