"""scripts/public_manifests.py: the manifests a user writes for ChestX-ray14 and CheXpert load
as multi-label data with the official splits (on fake downloads of each layout)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from medtl.data import load_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "public_manifests.py"


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True)


def test_chestxray14_layout_loads_with_the_official_test_split(tmp_path):
    root = tmp_path / "nih"
    findings = ["Effusion|Cardiomegaly", "No Finding", "Effusion", "Cardiomegaly",
                "No Finding", "Effusion|Cardiomegaly", "Effusion", "No Finding"]
    rows = []
    for i, f in enumerate(findings):
        name = f"0000{i:04d}_000.png"
        _png(root / f"images_00{1 + i % 2}" / "images" / name, 20 * i)
        rows.append([name, f, "0", str(i // 2)])
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID"])
        w.writerows([[r[0], r[1], r[2], r[3]] for r in rows])
    names = [r[0] for r in rows]
    (root / "test_list.txt").write_text("\n".join(names[6:]) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(names[:6]) + "\n")
    out = tmp_path / "nih.csv"
    done = _run("chestxray14", root, out)
    assert done.returncode == 0, done.stderr
    ds = load_dataset(out, val_fraction=0)
    assert ds.multilabel and ds.classes == ["Cardiomegaly", "Effusion"]
    assert [r.split for r in ds.records].count("test") == 2
    first = next(r for r in ds.records if r.path.endswith(names[0]))
    assert first.targets == (1.0, 1.0)
    # Patients come from the Patient ID column: images 0 and 1 share patient 0.
    assert ds.records[0].patient_id == ds.records[1].patient_id != ds.records[2].patient_id


def test_chexpert_layout_keeps_uncertain_labels_and_the_validation_set_as_test(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "Edema", "Pleural Effusion"]
    train = [["Female", "60", "Frontal", "AP", "1.0", "-1.0"],
             ["Male", "70", "Frontal", "PA", "0.0", "1.0"],
             ["Male", "50", "Frontal", "PA", "", "0.0"],
             ["Female", "40", "Frontal", "AP", "1.0", "0.0"],
             ["Female", "41", "Frontal", "AP", "0.0", "1.0"],
             ["Male", "42", "Frontal", "AP", "1.0", "1.0"]]
    for name, split_rows, folder in (("train.csv", train, "train"),
                                     ("valid.csv", train[:4], "valid")):
        listed = []
        for i, r in enumerate(split_rows):
            rel = f"CheXpert-v1.0-small/{folder}/patient{i:05d}/study1/view1_frontal.jpg"
            _png(tmp_path / rel, 10 * i)
            listed.append([rel, *r])
        with open(root / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(listed)
    out = tmp_path / "chexpert.csv"
    done = _run("chexpert", root, out)
    assert done.returncode == 0, done.stderr
    ds = load_dataset(out, labels=["Edema", "Pleural Effusion"], val_fraction=0,
                      uncertain="ignore")
    assert ds.multilabel and [c.lower() for c in ds.classes] == ["edema", "pleural effusion"]
    train_ds = ds.split("train")
    assert np.isnan(train_ds.labels[0, 1])  # -1.0 ignored
    assert np.isnan(train_ds.labels[2, 0])  # blank unknown
    ones = load_dataset(out, labels=["Edema", "Pleural Effusion"], val_fraction=0,
                        uncertain="ones", blank="zeros").split("train").labels
    assert ones[0, 1] == 1.0 and ones[2, 0] == 0.0
    assert len(ds.split("test")) == 4
    assert train_ds.records[0].patient_id != train_ds.records[1].patient_id


def test_a_listed_image_that_is_missing_is_named(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    (root / "train.csv").write_text("Path,Sex,Edema\nCheXpert-v1.0-small/train/p/x.jpg,F,1.0\n")
    (root / "valid.csv").write_text("Path,Sex,Edema\n")
    done = _run("chexpert", root, tmp_path / "o.csv")
    assert done.returncode == 2 and "x.jpg" in done.stderr
