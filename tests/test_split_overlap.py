"""medtl train checks the splits it is given (issue 15, acceptance 5): a patient or a
byte-identical file on both sides of a supplied train/test is warned about and recorded in
metrics.json, and a clean run records zeros."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

import medtl
from medtl.data import load_dataset
from medtl.data.checks import split_overlap

from .conftest import blob_image

FAST = dict(backbone="mobilenet_v2", weights="imagenet", image_size=64, quiet=True)


def write_leaky(root: Path) -> Path:
    """train/test folders, patients pt1NN in train and pt2NN in test, except that test holds
    a second scan of train's patient pt100 and a byte copy of train's pt105 under another
    name (patient pt299)."""
    rng = np.random.default_rng(5)
    for split, first in (("train", 100), ("test", 200)):
        for cls, shape in (("bar", "bar"), ("disc", "disc")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(10):
                n = first + i + (50 if cls == "disc" else 0)
                Image.fromarray(blob_image(rng, shape, 48)).save(d / f"pt{n}_scan.png")
    Image.fromarray(blob_image(rng, "bar", 48)).save(root / "test" / "bar" / "pt100_again.png")
    shutil.copyfile(root / "train" / "bar" / "pt105_scan.png",
                    root / "test" / "bar" / "pt299_scan.png")
    return root


def test_split_overlap_counts_shared_patients_and_identical_files(tmp_path):
    data = write_leaky(tmp_path / "leaky")
    found = split_overlap(load_dataset(data, patient_regex=r"(pt\d+)_", val_fraction=0))
    assert (found["shared_patients"], found["identical_files"]) == (1, 1)
    assert found["splits"] == ["train", "test"]
    assert any(e.startswith("patient pt100: ") and "test/bar/pt100_again.png (test)" in e
               for e in found["examples"])
    assert ("train/bar/pt105_scan.png (train) = test/bar/pt299_scan.png (test)"
            in found["examples"])
    assert not any(str(tmp_path) in e for e in found["examples"])  # relative to the data
    # The same through a manifest's patient_id column, without any regex.
    rows = ["path,label,patient_id,split"] + [
        f"{p.relative_to(data)},{p.parent.name},{p.name.split('_')[0]},{p.parts[-3]}"
        for p in sorted(data.rglob("*.png"))]
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    found = split_overlap(load_dataset(data / "manifest.csv", val_fraction=0))
    assert (found["shared_patients"], found["identical_files"]) == (1, 1)
    (data / "test" / "bar" / "pt100_again.png").unlink()
    (data / "test" / "bar" / "pt299_scan.png").unlink()
    clean = split_overlap(load_dataset(data, patient_regex=r"(pt\d+)_", val_fraction=0))
    assert clean == {"splits": ["train", "test"], "shared_patients": 0, "identical_files": 0,
                     "examples": []}


def test_train_warns_about_and_records_leaky_splits(tmp_path):
    data = write_leaky(tmp_path / "leaky")
    run = medtl.train(data, strategy="hybrid", patient_regex=r"(pt\d+)_", out=tmp_path / "r",
                      **FAST)
    overlap = json.loads((run.path / "metrics.json").read_text())["split_overlap"]
    assert overlap["shared_patients"] == 1 and overlap["identical_files"] == 1
    assert overlap["splits"] == ["train", "val", "test"]
    warned = [line for line in (run.path / "log.txt").read_text().splitlines()
              if "WARNING" in line and "splits overlap" in line]
    assert len(warned) == 1
    assert "1 patient(s) in more than one split, 1 group(s) of byte-identical" in warned[0]
    assert "pt299_scan.png" in warned[0] or "pt100" in warned[0]
