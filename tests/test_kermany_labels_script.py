"""scripts/kermany_labels.py (issue 21, data for tests and benchmarks): Kermany's file names to
a three-class and a two-label manifest. A tiny fake Kermany folder of 8-px JPEGs, no real data."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtl.data import KERMANY_PATIENT_REGEX, load_dataset, patient_from_name

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kermany_labels.py"


@pytest.fixture(scope="module")
def kl():
    spec = importlib.util.spec_from_file_location("kermany_labels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kermany_labels"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# Every naming pattern of the real folder, per split and class folder.
FAKE = {
    "train/NORMAL": ["IM-0115-0001.jpeg", "IM-0640-0001-0002.jpeg", "NORMAL2-IM-0395-0001.jpeg",
                     "NORMAL2-IM-1152-0001-0001.jpeg", "IM-0007-0001.jpeg"],
    "train/PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg",
                        "person1_virus_6.jpeg", "person447_virus_921_1.jpeg",
                        "person20_virus_50.jpeg", "person30_bacteria_90.jpeg"],
    "test/NORMAL": ["IM-0001-0001.jpeg", "NORMAL2-IM-0007-0001.jpeg"],
    "test/PNEUMONIA": ["person78_bacteria_378.jpeg", "person3_virus_15.jpeg"],
}
EXPECTED = {  # name -> (label, patient), per the data README's rule
    "IM-0115-0001.jpeg": ("normal", "IM-0115"), "IM-0640-0001-0002.jpeg": ("normal", "IM-0640"),
    "NORMAL2-IM-0395-0001.jpeg": ("normal", "IM-0395"),
    "NORMAL2-IM-1152-0001-0001.jpeg": ("normal", "IM-1152"),
    "IM-0007-0001.jpeg": ("normal", "IM-0007"),
    "person1_bacteria_1.jpeg": ("bacterial", "person1"),
    "person1_bacteria_2.jpeg": ("bacterial", "person1"),
    "person1_virus_6.jpeg": ("viral", "person1"),
    "person447_virus_921_1.jpeg": ("viral", "person447"),
    "person20_virus_50.jpeg": ("viral", "person20"),
    "person30_bacteria_90.jpeg": ("bacterial", "person30"),
    "IM-0001-0001.jpeg": ("normal", "IM-0001"), "NORMAL2-IM-0007-0001.jpeg": ("normal", "IM-0007"),
    "person78_bacteria_378.jpeg": ("bacterial", "person78"),
    "person3_virus_15.jpeg": ("viral", "person3"),
}
TWO = {"normal": ("0", "0"), "bacterial": ("1", "0"), "viral": ("1", "1")}


def fake_kermany(root: Path, extra: dict[str, list[str]] | None = None) -> Path:
    rng = np.random.default_rng(0)
    for folder, names in {**FAKE, **(extra or {})}.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / name, format="JPEG")
    return root


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_name_rules_and_medtl_regex_agree(kl):
    for folder in ("NORMAL", "PNEUMONIA"):
        for name in FAKE[f"train/{folder}"] + FAKE[f"test/{folder}"]:
            assert kl.parse_name(name, folder) == EXPECTED[name], name
            # The manifest's patients are the ones `medtl train --patient-regex` would find.
            assert patient_from_name(name, KERMANY_PATIENT_REGEX) == EXPECTED[name][1]
    assert kl.parse_name("person5_virus_9.JPG", "PNEUMONIA") == ("viral", "person5")


@pytest.mark.parametrize(("name", "folder", "says"), [
    ("person1_fungus_3.jpeg", "PNEUMONIA", "fits no rule"),
    ("person1_bacteria_3.png", "PNEUMONIA", "fits no rule"),
    ("xperson1_virus_3.jpeg", "PNEUMONIA", "fits no rule"),
    ("IM-0115.jpeg", "NORMAL", "fits no rule"),
    ("person1_virus_3.jpeg", "NORMAL", "the file name says viral, the folder NORMAL"),
    ("IM-0115-0001.jpeg", "PNEUMONIA", "the file name says normal, the folder PNEUMONIA"),
])
def test_names_that_fit_no_rule_are_refused(kl, name, folder, says):
    with pytest.raises(kl.LayoutError, match=says) as info:
        kl.parse_name(name, folder)
    assert name in str(info.value)


def test_manifests_of_a_fake_folder(kl, tmp_path, capsys):
    src = fake_kermany(tmp_path / "kermany")
    (src / "train" / "NORMAL" / ".DS_Store").write_text("")  # not an image: skipped
    out = tmp_path / "out"
    assert kl.main([str(src), str(out)]) == 0
    three, two = read(out / "three_class.csv"), read(out / "two_label.csv")
    assert list(three[0]) == ["path", "label", "patient_id", "split"]
    assert list(two[0]) == ["path", "pneumonia", "viral", "patient_id", "split"]
    assert len(three) == len(two) == sum(len(v) for v in FAKE.values())
    for t, w in zip(three, two, strict=True):
        path = Path(t["path"])
        assert path.is_absolute() and path.is_file() and w["path"] == t["path"]
        assert (t["label"], t["patient_id"]) == EXPECTED[path.name]
        assert (w["pneumonia"], w["viral"]) == TWO[t["label"]]
        assert w["patient_id"] == t["patient_id"] and w["split"] == t["split"]
        assert t["split"] == path.parts[-3]  # the official split, from the folder
    printed = capsys.readouterr().out
    assert "train  bacterial        3         2" in printed  # person1 twice, person30
    assert "test   viral            1         1" in printed
    # person1 is bacterial and viral; IM-0007 is in train and test, with the same label
    assert "both bacterial and viral images: 1 (within train 1, within test 0)" in printed
    assert "in both train and test: 1 " in printed and "normal 1, bacterial 0" in printed
    # medtl reads the single-label manifest as it is, splits and all
    ds = load_dataset(out / "three_class.csv", val_fraction=0.0)
    assert ds.classes == ["bacterial", "normal", "viral"]
    assert ds.counts()["test"] == {"bacterial": 1, "normal": 2, "viral": 1}


def test_relative_paths_and_val_folder(kl, tmp_path):
    src = fake_kermany(tmp_path / "kermany", {"val/NORMAL": ["NORMAL2-IM-1427-0001.jpeg"],
                                              "val/PNEUMONIA": ["person1946_bacteria_4874.jpeg"]})
    out = tmp_path / "deep" / "out"
    assert kl.main([str(src), str(out), "--relative"]) == 0
    rows = read(out / "three_class.csv")
    assert all(not Path(r["path"]).is_absolute() and (out / r["path"]).is_file() for r in rows)
    val = [r for r in rows if "/val/" in r["path"]]
    assert [(r["label"], r["split"]) for r in val] == [("normal", "train"), ("bacterial", "train")]


def test_a_bad_name_or_layout_exits_2_naming_it(kl, tmp_path, capsys):
    src = fake_kermany(tmp_path / "kermany", {"test/PNEUMONIA": ["person9_covid_1.jpeg"]})
    out = tmp_path / "out"
    assert kl.main([str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert "person9_covid_1.jpeg" in err and "fits no rule" in err
    assert not out.exists()  # nothing written
    assert kl.main([str(tmp_path / "missing"), str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
    (src / "test" / "PNEUMONIA" / "person9_covid_1.jpeg").unlink()
    for f in (src / "test" / "NORMAL").iterdir():
        f.unlink()
    assert kl.main([str(src), str(out)]) == 2
    assert "no images" in capsys.readouterr().err
