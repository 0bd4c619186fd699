"""The positive class of a binary task (issue 15, acceptance 4): the user names it with
--positive-class; without it the last class in name order is taken, with a warning when its
name reads as a negative finding; metrics.json, the report and the CLI say which it is."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medtl
import medtl.workflow
from medtl.cli import main
from medtl.workflow import looks_negative

from .conftest import blob_image

FAST = dict(backbone="mobilenet_v2", weights="imagenet", image_size=64, quiet=True)


def write_disease_healthy(root: Path) -> Path:
    """disease (a disc) against healthy (a bar). A quarter of the test's disease images show a
    bar, so the recall of disease (about 0.75) differs from that of healthy (about 1): a
    sensitivity of the wrong class cannot pass for the right one."""
    rng = np.random.default_rng(3)
    for split, n in (("train", 20), ("test", 16)):
        for cls in ("disease", "healthy"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                shape = "disc" if cls == "disease" and (split == "train" or i % 4) else "bar"
                Image.fromarray(blob_image(rng, shape, 48)).save(d / f"{split}{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_disease_healthy(tmp_path_factory.mktemp("pc") / "scans")


def _train_cli(data: Path, out: Path, *extra: str, capsys) -> tuple[dict, str]:
    with pytest.raises(SystemExit) as exc:
        main(["train", str(data), "--strategy", "hybrid", "--weights", "imagenet",
              "--image-size", "64", "--quiet", "--out", str(out), *extra])
    assert exc.value.code == 0
    return json.loads((out / "metrics.json").read_text()), capsys.readouterr().out


def _recall(rows: list[dict], cls: str) -> float:
    hits = [r["prediction"] == cls for r in rows if r["label"] == cls]
    return sum(hits) / len(hits)


def test_positive_class_is_named_chosen_and_used_everywhere(data, tmp_path, capsys,
                                                            monkeypatch):
    # Without --positive-class: the last class, healthy, and a warning that names it (no
    # report this time: the slow part of a run, checked below).
    with monkeypatch.context() as m:
        m.setattr(medtl.workflow, "_write_report", lambda *a, **k: None)
        metrics, shown = _train_cli(data, tmp_path / "default", capsys=capsys)
    log = (tmp_path / "default" / "log.txt").read_text()
    warned = [line for line in log.splitlines() if "WARNING" in line and "positive class" in line]
    assert len(warned) == 1 and "positive class: healthy" in warned[0]
    assert "--positive-class disease" in warned[0]
    assert metrics["positive_class"] == "healthy" and "positive class: healthy" in shown

    # With it: every binary figure is about disease.
    out = tmp_path / "disease"
    metrics, shown = _train_cli(data, out, "--positive-class", "disease", capsys=capsys)
    assert "WARNING" not in (out / "log.txt").read_text()
    assert metrics["positive_class"] == "disease" and "positive class: disease" in shown
    assert json.loads((out / "config.json").read_text())["positive_class"] == "disease"
    with open(out / "predictions.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    test = metrics["test"]
    assert _recall(rows, "disease") != _recall(rows, "healthy")  # the test can tell them apart
    assert test["sensitivity"] == pytest.approx(_recall(rows, "disease"), abs=1e-12)
    assert test["specificity"] == pytest.approx(_recall(rows, "healthy"), abs=1e-12)
    # The operating points threshold the probability of disease.
    for op in test["operating_points"].values():
        said = [float(r["prob_disease"]) >= op["threshold"] for r in rows
                if r["label"] == "disease"]
        assert op["sensitivity"] == pytest.approx(np.mean(said), abs=1e-12)
    report = (out / "report.html").read_text()
    assert "Positive class: <b>disease</b>" in report
    assert f"sensitivity {test['sensitivity']:.3f}" in report
    # evaluate keeps the run's positive class.
    again = medtl.evaluate(out, quiet=True)["metrics"]
    assert again["sensitivity"] == pytest.approx(test["sensitivity"], abs=1e-12)


def test_a_positive_class_that_cannot_be_is_refused(data, tmp_path):
    with pytest.raises(medtl.MedtlError, match=r"--positive-class tumour: not a class of the "
                                               r"data \(classes: disease, healthy\)"):
        medtl.train(data, strategy="hybrid", positive_class="tumour", out=tmp_path / "a",
                    **FAST)
    three = tmp_path / "three"
    rng = np.random.default_rng(0)
    for cls, shape in (("a", "disc"), ("b", "bar"), ("c", "disc")):
        (three / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(blob_image(rng, shape, 48)).save(three / cls / f"{i}.png")
    with pytest.raises(medtl.MedtlError, match="only for a binary task; this data has 3 "
                                               "classes"):
        medtl.train(three, strategy="hybrid", positive_class="a", out=tmp_path / "b", **FAST)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("name,negative", [
    ("normal", True), ("Healthy", True), ("NEGATIVE", True), ("benign", True),
    ("no_tumor", True), ("No Finding", True), ("non-COVID", True), ("without_effusion", True),
    ("0_normal", True), ("NoFinding", True),
    ("abnormal", False), ("disease", False), ("pneumonia", False), ("malignant", False),
    ("tumor", False), ("nodule", False), ("positive", False),
])
def test_names_that_read_as_a_negative_finding(name, negative):
    assert looks_negative(name) is negative
