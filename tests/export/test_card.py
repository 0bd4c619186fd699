"""The model card of an export: every figure from the run's own files, from the right split, and
no data location or patient in it.

One run on a copy of the embedded Kermany sample (patients in its file names, 64 px, a linear
head, calibrated): its validation and test figures differ, so a figure taken from the wrong
split shows.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

import medtl
from medtl.data import DEMO_PATIENT_REGEX, demo_data_path, load_dataset
from medtl.export.bundle import CARD_JSON, CARD_MD, load_bundle
from medtl.export.card import RESEARCH_USE, card_markdown, model_card
from medtl.export.writer import export_run


@pytest.fixture(scope="module")
def kermany(tmp_path_factory):
    """A copy of the demo data beside the run, so --paths relative records a relative path."""
    root = tmp_path_factory.mktemp("card")
    data = shutil.copytree(demo_data_path(), root / "chest-data")
    run = medtl.train(data, out=root / "runs" / "lin", backbone="mobilenet_v2",
                      weights="imagenet", image_size=64, epochs=1, quiet=True,
                      strategy="feature-extractor", calibrate=True,
                      patient_regex=DEMO_PATIENT_REGEX)
    return run, data, export_run(run, root / "bundle")


def test_figures_are_the_runs_own_from_the_right_split(kermany):
    run, _, bundle = kermany
    card, metrics = json.loads((bundle / CARD_JSON).read_text()), run.metrics
    assert card == load_bundle(bundle).card  # listed in the manifest, checked on load
    assert metrics["val"]["auc"] != metrics["test"]["auc"]  # a swap would show
    for split in ("val", "test"):
        figures = card["quantitative_analyses"][split]
        assert figures["n"] == metrics[split]["n"]
        for name in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1"):
            assert figures[name]["value"] == metrics[split][name]
            assert figures[name]["ci95"] == metrics[split][f"{name}_ci95"]
        assert figures["per_patient"]["auc"]["value"] == metrics[split]["per_patient"]["auc"]
    summary = card["summary"]
    assert (summary["split"], summary["auc"], summary["auc_ci95"], summary["n"]) == (
        "test", metrics["test"]["auc"], metrics["test"]["auc_ci95"], metrics["test"]["n"])
    assert f"test AUC {metrics['test']['auc']:.3f}" in summary["line"]
    points = card["metrics"]["decision_thresholds"]
    assert points["chosen_on"] == "val"
    for name in ("youden", "sensitivity_target"):
        assert points["operating_points"][name]["threshold"] == metrics["thresholds"][name]
        assert points["operating_points"][name]["test_specificity"] == \
            metrics["test"]["operating_points"][name]["specificity"]
    cal = card["calibration"]
    assert cal["temperature"] == run.config["calibration"]["temperature"] is not None
    assert cal["ece"] == metrics["test"]["calibration"]["ece"]
    assert card["model_details"]["weights"]["sha256"] == run.config["weights"]["sha256"]
    ood = load_bundle(bundle).ood  # the detector the model carries, as preprocessing.json says
    assert card["out_of_distribution"]["guard"] is True
    assert card["out_of_distribution"]["threshold"] == ood["threshold"] is not None


def test_counts_per_class_split_and_patient_are_the_datas(kermany):
    run, data, bundle = kermany
    card = json.loads((bundle / CARD_JSON).read_text())
    ds = load_dataset(data, patient_regex=DEMO_PATIENT_REGEX)
    splits = {**card["training_data"]["splits"], **card["evaluation_data"]["splits"]}
    assert set(splits) == set(ds.split_names()) == {"train", "val", "test"}
    for split, entry in splits.items():  # val carved by patient, as training carved it
        part = ds.split(split)
        want = {c: int((part.labels == i).sum()) for i, c in enumerate(ds.classes)}
        assert entry["per_class"] == want and entry["images"] == len(part)
    for split in ("val", "test"):  # patients: scored per patient where known
        want = len({p for p in ds.split(split).patients if p})
        assert splits[split]["patients"] == want == run.metrics[split]["per_patient"]["n"]
    assert card["training_data"]["fingerprint"] == run.config["data"]["fingerprint"]


def test_research_use_line_and_no_location_or_patient(kermany):
    run, data, bundle = kermany
    text_json, text_md = (bundle / CARD_JSON).read_text(), (bundle / CARD_MD).read_text()
    for text in (text_json, text_md):
        assert RESEARCH_USE in text and "not for clinical diagnosis" in text
        assert str(data) not in text and str(data.parent) not in text
        assert run.config["data"]["source"] not in text  # the recorded relative path
        assert not re.search(DEMO_PATIENT_REGEX, text)  # no file or patient named
    assert text_md.splitlines()[2] == f"> **{RESEARCH_USE}**"  # the banner, under the title
    ood = json.loads((bundle / "preprocessing.json").read_text())["ood"]
    assert card_markdown(model_card(run, ood=ood)) == text_md
    assert "## Out-of-distribution inputs" in text_md and "percentile of val" in text_md
    assert json.loads(text_json)["training_data"]["dataset"] == "chest-data"


def test_a_run_without_figures_says_so_and_names_no_weights_path():
    """A run saved from Python (kind model) has no data or metrics: the card invents none."""

    class Saved:
        config = {"kind": "model", "backbone": "resnet18", "strategy": "hybrid", "head": "svm",
                  "weights": {"kind": "file", "source": "/home/ana/weights/rad.pt",
                              "sha256": "ab" * 32},
                  "classes": ["a", "b", "c"], "positive_class": None, "medtl_version": "0.1.0"}
        metrics: dict = {}

    card = model_card(Saved())
    text = json.dumps(card) + card_markdown(card)
    assert "/home/ana" not in text and card["model_details"]["weights"]["source"] == "rad.pt"
    assert card["summary"]["auc"] is None and "no test figures recorded" in card["summary"]["line"]
    assert card["quantitative_analyses"] == {} and card["training_data"]["splits"] == {}
    assert any("performance is unknown" in c for c in card["caveats_and_recommendations"])
    assert not any("thresholds" in c for c in card["caveats_and_recommendations"])
