"""Attribution maps: every method on a model, every kind of run, the report's gallery and the
`medtl explain` command."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import medtl
from medtl.explain import METHODS, Explainer
from medtl.explain.cam import logreg_as_linear, overlay, positive_part, spearman
from medtl.explain.runs import model_input

from ..conftest import write_blob_images
from ..test_cli import one_line_error, run_cli


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_regression_pipeline_as_a_linear_layer_gives_sklearns_probabilities(
        n_classes):
    rng = np.random.default_rng(0)
    x = rng.normal(3, 5, (120, 16))
    y = rng.integers(0, n_classes, 120)
    x[np.arange(120), y] += 4
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000)).fit(x, y)
    linear = logreg_as_linear(pipe)
    ours = torch.softmax(linear(torch.from_numpy(x).float()), 1).double().numpy()
    np.testing.assert_allclose(ours, pipe.predict_proba(x), atol=1e-5)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    backbone = medtl.create_backbone("mobilenet_v2", weights="imagenet")
    backbone.reset_classifier(2)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return Explainer.for_backbone(backbone.eval()), x


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_one_finite_map_per_image_on_the_input_grid(small_model, method):
    explainer, x = small_model
    images = x[:1] if method == "scorecam" else x  # Score-CAM: 1,280 masked forward passes
    maps = explainer.maps(images, [1] * len(images), method)
    assert maps.shape == (len(images), 64, 64) and maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert np.ptp(maps[0]) > 0, "a constant map shows nothing"
    if method in ("gradcam", "gradcam++", "scorecam"):
        assert maps.min() >= 0 and maps.max() <= 1


def test_maps_differ_between_classes_and_follow_the_input(small_model):
    explainer, x = small_model
    a = explainer.maps(x[:1], [0], "integrated-gradients")
    b = explainer.maps(x[:1], [1], "integrated-gradients")
    assert not np.allclose(a, b)
    shifted = explainer.maps(torch.roll(x[:1], 16, dims=3), [1], "gradcam")
    assert not np.allclose(explainer.maps(x[:1], [1], "gradcam"), shifted)


def test_randomised_copy_changes_every_backbone_weight_and_keeps_the_head(small_model):
    explainer, _ = small_model
    before = {k: v.clone() for k, v in explainer.model.state_dict().items()}
    twin = explainer.randomised(seed=3)
    after = explainer.model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"the original changed: {k}"
    twin_state = twin.model.state_dict()
    for name, p in explainer.backbone.blocks.named_parameters():
        assert not torch.equal(p, twin_state[f"blocks.{name}"]), name
    assert torch.equal(twin.model.classifier.weight, explainer.model.classifier.weight)
    assert twin.target_layer is twin.model.get_submodule(explainer.target_layer_name)


def test_overlay_keeps_the_image_where_the_map_is_zero_and_colours_it_where_it_is_not():
    image = np.full((40, 60, 3), 90, np.uint8)
    heat = np.zeros((16, 16), np.float32)
    assert np.array_equal(overlay(image, heat), image)
    heat[:, 8:] = 1.0
    out = overlay(image, heat)
    assert out.shape == image.shape
    assert np.array_equal(out[:, :20], image[:, :20])
    assert np.abs(out[:, 45:].astype(int) - 90).max() > 40


def test_displayed_map_fades_with_the_target_probability():
    from medtl.explain.runs import display_map

    raw = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)
    np.testing.assert_allclose(display_map(raw, "gradcam", 1.0), raw)
    np.testing.assert_allclose(display_map(raw, "gradcam", 0.2), raw * 0.2)
    assert not display_map(raw, "gradcam", 0.0).any()
    signed = np.array([[-2.0, 0.0], [1.0, 2.0]])
    np.testing.assert_allclose(display_map(signed, "occlusion", 0.5), [[0, 0], [0.25, 0.5]],
                               atol=0.01)


def test_positive_part_and_spearman():
    raw = np.array([[-5.0, 0.0], [1.0, 2.0]])
    shown = positive_part(raw, percentile=100)
    np.testing.assert_allclose(shown, [[0, 0], [0.5, 1]])
    assert spearman(np.zeros((4, 4)), np.random.default_rng(0).random((4, 4))) == 0.0
    a = np.arange(16.0)
    assert spearman(a, a ** 2) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


# ------------------------------------------------------------------ runs of every kind
@pytest.fixture(scope="module")
def blob_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    data = write_blob_images(root / "blobs", n_per_class=16, size=64)
    common = dict(image_size=64, quiet=True)
    runs = {
        "logreg": medtl.train(data, strategy="hybrid", head="logreg", out=root / "logreg",
                              **common),
        "svm": medtl.train(data, strategy="hybrid", head="svm", out=root / "svm", **common),
        "linear": medtl.train(data, strategy="feature-extractor", out=root / "fe", **common),
        "fine-tune": medtl.train(data, strategy="fine-tune", epochs=1, augment="none",
                                 out=root / "ft", **common),
    }
    return data, runs


@pytest.mark.parametrize("kind", ["logreg", "linear", "fine-tune"])
def test_differentiable_runs_explain_the_probabilities_they_predict(blob_runs, kind):
    data, runs = blob_runs
    clf = runs[kind].load_model(quiet=True)
    explainer = Explainer.for_classifier(clf)
    assert explainer.differentiable and explainer.method_for("gradcam") == "gradcam"
    test = medtl.load_dataset(data).split("test")
    pixels = model_input(clf.model_.preprocessing, [test.read(i) for i in range(6)])
    expected = clf.predict_proba(test.subset(range(6)), calibrated=False)
    np.testing.assert_allclose(explainer.scores(pixels).double().numpy(), expected, atol=1e-4)
    maps = explainer.maps(pixels, [1] * 6, "gradcam")
    assert maps.shape == (6, 64, 64) and np.isfinite(maps).all()


def test_svm_hybrid_falls_back_to_occlusion_and_says_why(blob_runs, tmp_path, capsys):
    data, runs = blob_runs
    clf = runs["svm"].load_model(quiet=True)
    explainer = Explainer.for_classifier(clf)
    assert not explainer.differentiable
    assert explainer.method_for("gradcam") == "occlusion"
    images = sorted((data / "test" / "disc").glob("*.png"))[:2]
    code, out, _ = run_cli(["explain", runs["svm"].path, *images, "--out", tmp_path / "maps",
                            "--quiet"], capsys)
    assert code == 0
    assert "occlusion maps" in out
    log = (tmp_path / "maps" / "log.txt").read_text()
    assert "svm head of this hybrid run has no gradient" in log
    maps = [np.load(p) for p in sorted((tmp_path / "maps").glob("*.npy"))]
    assert len(maps) == 2 and all(m.shape == (64, 64) and np.ptp(m) > 0 for m in maps)


def test_medtl_explain_writes_an_overlay_and_a_map_per_image(blob_runs, tmp_path, capsys):
    data, runs = blob_runs
    images = [data / "test" / "disc", data / "test" / "bar" / "p000_test_bar.png"]
    out = tmp_path / "maps"
    code, stdout, _ = run_cli(["explain", runs["fine-tune"].path, *images, "--out", out,
                               "--target", "disc", "--sanity-check", "--quiet"], capsys)
    assert code == 0, stdout
    with open(out / "explanations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 17
    assert {r["target"] for r in rows} == {"disc"} and {r["method"] for r in rows} == {"gradcam"}
    from PIL import Image

    # Named relative to what was given (the folder, or the file's own name): no folders shown.
    where = {p.name: p for p in (data / "test").rglob("*.png")}
    for r in rows:
        assert "/" not in r["path"]
        source = np.asarray(Image.open(where[r["path"]]))
        picture = Image.open(out / r["overlay"])
        assert picture.size == (source.shape[1], source.shape[0])
        raw = np.load(out / r["map"])
        assert raw.shape == (64, 64) and np.isfinite(raw).all()
        assert 0 <= float(r["probability_target"]) <= 1
    assert "model randomisation check: median Spearman" in stdout
    assert (out / "sanity_check.json").is_file()


def test_medtl_explain_user_errors_are_one_line(blob_runs, tmp_path, capsys):
    data, runs = blob_runs
    image = next((data / "test" / "disc").glob("*.png"))
    run = runs["logreg"].path
    code, _, err = run_cli(["explain", run, image, "--target", "tumour", "--out", tmp_path],
                           capsys)
    assert code == 2 and "--target tumour: not a class of this run" in one_line_error(err)
    code, _, err = run_cli(["explain", run, image, "--method", "lime", "--out", tmp_path],
                           capsys)
    assert code == 2 and "unknown method 'lime'" in one_line_error(err)
    code, _, err = run_cli(["explain", tmp_path, image, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "not a medtl run directory" in one_line_error(err)
    code, _, err = run_cli(["explain", run, tmp_path / "nope.png", "--out", tmp_path / "o"],
                           capsys)
    assert code == 2 and "nope.png: no such file" in one_line_error(err)


def test_run_report_has_a_gallery_of_hits_and_misses(blob_runs):
    _, runs = blob_runs
    for kind in ("logreg", "svm"):
        page = (runs[kind].path / "report.html").read_text()
        assert ">Where the model looks, test" in page
        section = page.split(">Where the model looks", 1)[1]
        predictions = [r for r in runs[kind].predictions() if r["split"] == "test"]
        # Binary: maps for the positive class; each card's kind matches its label and call.
        positive = runs[kind].config["positive_class"]
        assert f"positive class <b>{positive}</b>" in section
        cards = section.split("<figure class=cam>")[1:]
        assert 2 <= len(cards) <= 8
        expected = {("true" if r["label"] == r["prediction"] else "false") + " " +
                    ("positive" if r["prediction"] == positive else "negative")
                    for r in predictions}
        shown = {c.split("<b>", 1)[1].split("</b>", 1)[0] for c in cards}
        assert shown <= expected and len(shown) == len(expected)
        assert all(c.count("<img src=\"data:image/png;base64,") == 2 for c in cards)
    assert "occlusion replaces Grad-CAM" in (runs["svm"].path / "report.html").read_text()
