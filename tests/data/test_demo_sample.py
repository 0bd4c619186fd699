from __future__ import annotations

import filecmp
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from medtl.data import (
    DEMO_PATIENT_REGEX,
    demo_data_path,
    load_dataset,
    patient_from_name,
    patient_overlap,
)

REPO = Path(__file__).resolve().parents[2]


def test_demo_sample_is_packaged_small_and_attributed() -> None:
    root = demo_data_path()
    assert root.is_dir(), f"{root} missing: run scripts/make_demo_sample.py"
    files = [f for f in root.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 10 * 1024 * 1024
    attribution = (root / "ATTRIBUTION.md").read_text()
    assert "10.17632/rscbjbr9sj.2" in attribution and "CC BY 4.0" in attribution


def test_demo_sample_classes_splits_and_patients() -> None:
    ds = load_dataset(demo_data_path(), patient_regex=DEMO_PATIENT_REGEX)
    assert ds.classes == ["NORMAL", "PNEUMONIA"]
    counts = ds.counts()
    assert counts["test"] == {"NORMAL": 50, "PNEUMONIA": 50}
    assert {c: counts["train"][c] + counts["val"][c] for c in ds.classes} == {
        "NORMAL": 150,
        "PNEUMONIA": 150,
    }
    assert all(n > 0 for split in counts.values() for n in split.values())
    assert patient_overlap(ds, "train", "test") == []
    assert patient_overlap(ds, "val", "test") == []
    assert patient_overlap(ds, "train", "val") == []
    # the grouping matters here: some training patients have two images, none more
    per_patient = Counter(
        p for r, p in zip(ds.records, ds.patients, strict=True) if r.split != "test"
    )
    assert max(per_patient.values()) == 2 and list(per_patient.values()).count(2) >= 10
    assert ds.read(0).shape == (224, 224, 3)


def test_demo_sample_script_reproduces_the_files(tmp_path: Path, shared) -> None:
    source = shared("chest_xray_kermany_224")
    script = REPO / "scripts" / "make_demo_sample.py"
    result = subprocess.run(
        [sys.executable, str(script), "--source", str(source), "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    packaged = demo_data_path()
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            made = sorted(p.name for p in (tmp_path / "demo" / split / cls).iterdir())
            assert made == sorted(p.name for p in (packaged / split / cls).iterdir())
            match, mismatch, errors = filecmp.cmpfiles(
                tmp_path / "demo" / split / cls, packaged / split / cls, made, shallow=False
            )
            assert not mismatch and not errors
            # copies, byte for byte, of the official images
            assert filecmp.cmp(
                tmp_path / "demo" / split / cls / made[0],
                source / split / cls / made[0],
                shallow=False,
            )
    assert (tmp_path / "demo" / "ATTRIBUTION.md").read_text() == (
        packaged / "ATTRIBUTION.md"
    ).read_text()


def test_full_kermany_split_is_patient_grouped(shared) -> None:
    ds = load_dataset(shared("chest_xray_kermany_224"), patient_regex=DEMO_PATIENT_REGEX)
    assert len(ds) == 5840
    assert patient_overlap(ds, "train", "val") == []
    # the official split reuses patient ids across train and test: worth knowing, not ours to fix
    assert patient_overlap(ds, "train", "test") != []
    assert patient_from_name("NORMAL2-IM-1427-0001.jpeg", DEMO_PATIENT_REGEX) == "IM-1427"


@pytest.mark.parametrize("name", ["train", "test"])
def test_demo_split_folders_exist(name: str) -> None:
    assert (demo_data_path() / name / "NORMAL").is_dir()
    assert (demo_data_path() / name / "PNEUMONIA").is_dir()
