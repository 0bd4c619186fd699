"""medtl explain of a multi-label run (issue 21): one label at a time, the map of that label's
own sigmoid (never a softmax over the labels, which would mix them); ``--target LABEL`` or, by
default, each image's most probable label; the randomisation check still runs. The run is
tests/export/multilabel.py's (disc / bar, 64 px, random weights)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from medtl.errors import MedtlError
from medtl.explain import Explainer, explain_images, gallery
from medtl.explain.runs import model_input
from medtl.run import load_run
from tests.export.multilabel import LABELS, disc_bar_run, split_images, with_both


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory):
    data, run_dir = disc_bar_run(tmp_path_factory)
    clf = load_run(run_dir).load_model(quiet=True, device="cpu")
    return data, run_dir, clf


def _pixels(clf, paths):
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return model_input(clf.model_.preprocessing, images)


def test_scores_are_each_labels_sigmoid(multilabel):
    data, _, clf = multilabel
    explainer = Explainer.for_classifier(clf)
    assert explainer.multilabel
    paths = split_images(data)
    got = explainer.scores(_pixels(clf, paths)).double().numpy()
    from medtl.data import dataset_from_files

    want = clf.predict_proba(dataset_from_files([str(p) for p in paths], classes=clf.classes_))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got.sum(axis=1) - 1).max() > 0.05


def test_gradcam_of_a_label_is_its_own_output_not_a_softmax(multilabel):
    """The map of label k is Grad-CAM of k's sigmoid: the same map as of k's logit (a
    positive factor per image, scaled away), and not the map of a softmax over the labels;
    on an image with a disc and a bar, the two labels' maps differ."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    data, _, clf = multilabel
    explainer = Explainer.for_classifier(clf)
    both = _pixels(clf, [with_both(data)])
    assert np.abs(explainer.maps(both, [0])[0] - explainer.maps(both, [1])[0]).max() > 0.1

    pixels = _pixels(clf, split_images(data)[:6])

    def reference(targets) -> np.ndarray:
        x = pixels.detach().clone().requires_grad_(True)
        with GradCAM(explainer.model, [explainer.target_layer]) as cam:
            return cam(x, targets=targets)

    n = len(pixels)
    for k in (0, 1):
        maps = explainer.maps(pixels, [k] * n, "gradcam")
        np.testing.assert_allclose(maps, reference([ClassifierOutputTarget(k)] * n),
                                   atol=1e-4)
        softmax = reference([lambda out, k=k: torch.softmax(out, dim=-1)[k]] * n)
        assert np.abs(maps - softmax).max() > 0.1


def test_explain_a_label_or_each_images_most_probable(multilabel, tmp_path):
    """`medtl explain RUN IMAGES --target disc --sanity-check`: every map for disc, with
    disc's probability, and the randomisation check; without --target, each image's most
    probable label."""
    from medtl.cli import main

    data, run_dir, clf = multilabel
    paths = split_images(data)[:4]
    proba = Explainer.for_classifier(clf).scores(_pixels(clf, paths)).double().numpy()
    for target, out in (("disc", tmp_path / "disc"), (None, tmp_path / "default")):
        args = ["explain", str(run_dir), *map(str, paths), "--out", str(out), "--quiet",
                "--device", "cpu", *(["--target", target] if target else []),
                *(["--sanity-check"] if target else [])]
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code in (0, None)
        with open(out / "explanations.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        want = ["disc"] * 4 if target else [LABELS[k] for k in proba.argmax(axis=1)]
        assert [r["target"] for r in rows] == want
        for r, p in zip(rows, proba, strict=True):
            assert float(r["probability_target"]) == pytest.approx(
                p[LABELS.index(r["target"])], abs=1e-5)
            assert (out / r["overlay"]).is_file() and (out / r["map"]).is_file()
    sanity = json.loads((tmp_path / "disc" / "sanity_check.json").read_text())
    assert sanity["method"] == "gradcam" and sanity["n"] == 4


def test_explain_rows_name_the_labels_present_at_the_thresholds(multilabel, tmp_path):
    data, run_dir, clf = multilabel
    thresholds = load_run(run_dir).metrics["thresholds"]
    paths = split_images(data)
    result = explain_images(clf, paths, out=tmp_path / "maps", target="bar", quiet=True,
                            thresholds=thresholds)
    proba = Explainer.for_classifier(clf).scores(_pixels(clf, paths)).double().numpy()
    for row, p in zip(result["rows"], proba, strict=True):
        assert row["target"] == "bar"
        assert row["prediction"] == "|".join(
            label for j, label in enumerate(LABELS) if p[j] >= thresholds[label])
    with pytest.raises(MedtlError, match="not a label of this run.*disc, bar"):
        explain_images(clf, paths, out=tmp_path / "bad", target="cancer", quiet=True)


def test_report_gallery_maps_each_label(multilabel):
    from medtl.data import load_dataset

    data, _, clf = multilabel
    test = load_dataset(data / "manifest.csv").split("test")
    proba = clf.predict_proba(test)
    g = gallery(clf, test, proba, LABELS, None)
    assert g["method"] == "gradcam" and g["multilabel"]
    assert [e["kind"] for e in g["entries"]] == ["disc present", "disc absent", "bar present",
                                                "bar absent"]
    for e in g["entries"]:
        label, truth = e["kind"].split()
        row = next(i for i, r in enumerate(test.records) if r.path == e["path"])
        k = LABELS.index(label)
        assert e["target"] == label and test.labels[row, k] == (truth == "present")
        assert e["probability"] == pytest.approx(proba[row, k])
