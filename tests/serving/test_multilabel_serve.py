"""medtl serve of a multi-label model (issue 21): /v1/model says the task and each label's
threshold, /v1/predict answers per label (probability, threshold, present) with no arg-max
class, /v1/explain maps the label asked for (default: the most probable one). The model is the
multi-label run of tests/export/multilabel.py, served as its exported bundle (ONNX, occlusion)
and as the run itself (Grad-CAM)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medtl.export.bundle import load_bundle
from medtl.export.writer import export_run
from medtl.run import load_run
from medtl.serving import create_app
from tests.export.multilabel import LABELS, disc_bar_run, split_images, with_both
from tests.serving.conftest import wait_ready


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory):
    return disc_bar_run(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle(multilabel, tmp_path_factory):
    return export_run(load_run(multilabel[1]), tmp_path_factory.mktemp("ml-serve") / "bundle")


@pytest.fixture(scope="module")
def client(bundle):
    with TestClient(create_app(bundle)) as c:
        wait_ready(c, 120)
        yield c


def _files(paths):
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def test_model_says_multilabel_and_lists_the_thresholds(client, multilabel):
    thresholds = load_run(multilabel[1]).metrics["thresholds"]
    model = client.get("/v1/model").json()
    assert model["task"] == "multilabel" and model["classes"] == LABELS
    assert model["thresholds"] == {label: thresholds[label] for label in LABELS}
    assert model["thresholds_chosen"] == {"chosen_on": "val", "rule": "youden"}
    assert model["positive_class"] is None and model["operating_points"] == {}
    assert model["card"]["metrics"]["task"] == "multi-label"


def test_predict_answers_per_label_at_the_recorded_thresholds(client, bundle, multilabel):
    data, run_dir = multilabel
    paths = split_images(data)
    answer = client.post("/v1/predict", files=_files(paths))
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    thresholds = load_run(run_dir).metrics["thresholds"]
    want = load_bundle(bundle).predict_proba(paths)
    decided = set()
    for r, p in zip(results, want, strict=True):
        assert r["task"] == "multilabel"
        assert "predicted_class" not in r and "decisions" not in r
        assert list(r["labels"]) == LABELS
        for j, label in enumerate(LABELS):
            got = r["labels"][label]
            assert got["probability"] == pytest.approx(p[j], abs=1e-6)
            assert got["threshold"] == thresholds[label]
            assert got["present"] is bool(p[j] >= thresholds[label])
            assert r["probabilities"][label] == got["probability"]
            decided.add(got["present"])
        assert r["present"] == [c for c in LABELS if r["labels"][c]["present"]]
    assert decided == {True, False}  # both decisions occur on these 12 images
    sums = [sum(r["probabilities"].values()) for r in results]
    assert max(abs(s - 1) for s in sums) > 0.05  # independent sigmoids, not a softmax


def test_explain_maps_the_label_asked_for(client, bundle, multilabel):
    data, _ = multilabel
    image = with_both(data)
    p = load_bundle(bundle).predict_proba([image])[0]
    maps = {}
    for target, want in ((None, LABELS[int(p.argmax())]), ("disc", "disc"), ("bar", "bar")):
        answer = client.post("/v1/explain", files={"file": (image.name, image.read_bytes())},
                             data={} if target is None else {"target": target})
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Medtl-Explain-Method"] == "occlusion"
        assert answer.headers["X-Medtl-Target"] == want
        assert float(answer.headers["X-Medtl-Probability"]) == pytest.approx(
            p[LABELS.index(want)], abs=1e-5)
        maps[target] = answer.content
    assert maps["disc"] != maps["bar"]
    wrong = client.post("/v1/explain", files={"file": (image.name, image.read_bytes())},
                        data={"target": "cancer"})
    assert wrong.status_code == 422 and "not a label of this model" in wrong.json()["detail"]


def test_a_served_run_explains_each_label_with_gradcam(multilabel):
    """A run directory is served with its torch model: Grad-CAM of each label's own sigmoid;
    on an image with a disc and a bar the two labels' maps differ."""
    from medtl.serving import heatmap
    from medtl.serving.model import load_served

    data, run_dir = multilabel
    served = load_served(run_dir)
    try:
        assert served.explain_method == "gradcam" and served.model.multilabel
        image = np.asarray(Image.open(with_both(data)).convert("RGB"))
        heat0, t0, p0 = heatmap.gradcam_map(served, image, 0)
        heat1, t1, p1 = heatmap.gradcam_map(served, image, 1)
        want = served.model.predict_proba([with_both(data)])[0]
        assert (t0, t1) == (0, 1)
        assert (p0, p1) == pytest.approx(tuple(want), abs=1e-5)
        assert np.abs(heat0 - heat1).max() > 0.1
        _, default, _ = heatmap.gradcam_map(served, image, None)
        assert default == int(want.argmax())
    finally:
        served.close()
