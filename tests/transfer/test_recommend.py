"""medtl recommend: each rule, on synthetic dataset statistics."""

from __future__ import annotations

import json

import pytest

from medtl.cli import main
from medtl.data.samples import DEMO_PATIENT_REGEX, demo_data_path
from medtl.transfer.recommend import DataStats, format_options, recommend


def _stats(n: int = 2000, **kw) -> DataStats:
    per_class = kw.pop("per_class", {"a": n // 2, "b": n - n // 2})
    return DataStats(n_images=n, per_class=per_class, **{"n_patients": 500,
                                                         "median_side": 224, **kw})


def only(*names):
    return lambda name: name in names


def _strategies(rec) -> list[str]:
    return [a.options["strategy"] for a in rec.grid]


def test_a_deep_backbone_as_frozen_extractor_first():
    rec = recommend(_stats(), available=only("resnet50", "mobilenet_v2"))
    assert rec.start.options == {"backbone": "resnet50", "strategy": "feature-extractor"}
    assert "Kim et al. 2022" in rec.start.reason and "frozen feature extractor" in rec.start.reason


def test_without_deep_weights_the_lightweight_fallback_says_why():
    rec = recommend(_stats(), available=only("mobilenet_v2"))
    assert rec.start.options["backbone"] == "mobilenet_v2"
    assert "MEDTL_WEIGHTS_DIR" in rec.start.reason


def test_very_small_data_starts_with_the_hybrid():
    rec = recommend(_stats(120), available=only("resnet50"))
    assert rec.start.options["strategy"] == "hybrid"
    assert rec.start.options["head"] == "logreg"


def test_gradual_unfreezing_is_in_the_grid_and_full_only_with_enough_data():
    big = recommend(_stats(5000), available=only("resnet50"))
    assert {"fine-tune", "full", "scratch", "hybrid"} <= set(_strategies(big))
    gradual = next(a for a in big.grid if a.options["strategy"] == "fine-tune")
    assert gradual.options["gradual"] is True and "low learning rate" in gradual.reason
    small = recommend(_stats(600), available=only("resnet50"))
    assert "full" not in _strategies(small)
    assert any("full fine-tuning left out" in n for n in small.notes)


def test_heavy_fully_connected_backbones_go_to_the_hybrid():
    rec = recommend(_stats(), available=only("resnet50", "vgg16"))
    vgg = [a for a in rec.grid if a.options["backbone"] == "vgg16"]
    assert len(vgg) == 1
    assert vgg[0].options["strategy"] == "hybrid" and vgg[0].options["head"] == "svm"
    assert not any(a.options["backbone"] == "vgg16"
                   for a in recommend(_stats(), available=only("resnet50")).grid)


@pytest.mark.parametrize(("modality", "natural"), [
    ("dermoscopy", True), ("SM", True), ("Fundus photography", True),
    ("CT CHEST", False), ("X-ray", False), ("MR", False)])
def test_the_modality_hint_is_marked_as_a_hypothesis(modality, natural):
    rec = recommend(_stats(modality=modality), available=only("resnet50"))
    hint = [n for n in rec.notes if "Morid" in n]
    assert len(hint) == 1 and hint[0].startswith("hypothesis")
    assert ("close to natural photographs" in hint[0]) is natural
    # A hint never changes the configuration.
    assert rec.start.options == recommend(_stats(), available=only("resnet50")).start.options


def test_no_modality_no_hint_and_the_other_notes():
    rec = recommend(_stats(per_class={"a": 100, "b": 900}, n_patients=None, median_side=28),
                    available=only("resnet50"))
    assert not any("Morid" in n for n in rec.notes)
    assert any("imbalanced" in n for n in rec.notes)
    assert any("--patient-regex" in n for n in rec.notes)
    assert rec.start.options["image_size"] == 128


def test_volumes_get_2_5d_slices():
    rec = recommend(_stats(volumes=True), available=only("resnet50"))
    assert rec.start.options["slices"] == "all" and rec.start.options["mode"] == "2.5d"
    assert "--slices all --mode 2.5d" in format_options(rec.start.options)


def test_cli_json_on_the_embedded_sample(capsys):
    main_args = ["recommend", str(demo_data_path()), "--patient-regex", DEMO_PATIENT_REGEX,
                 "--json"]
    with pytest.raises(SystemExit) as exit_:
        main(main_args)
    assert exit_.value.code in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["n_images"] == 400 and out["stats"]["n_patients"] > 200
    assert out["start"]["options"]["strategy"] == "feature-extractor"
