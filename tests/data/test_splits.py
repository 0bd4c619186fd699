from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import StratifiedShuffleSplit

from medtl.data import (
    KERMANY_PATIENT_REGEX,
    Dataset,
    assert_no_patient_overlap,
    carve_validation,
    kfold_indices,
    load_dataset,
    patient_from_name,
    patient_overlap,
)
from medtl.data.privacy import pseudonym
from medtl.data.splits import cross_validation_folds
from medtl.errors import MedtlError


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1946_bacteria_4874.jpeg", "person1946"),
        ("person3_virus_15.jpeg", "person3"),
        ("NORMAL2-IM-1427-0001.jpeg", "IM-1427"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("/data/train/PNEUMONIA/person7_bacteria_1.jpeg", "person7"),
    ],
)
def test_kermany_regex(name: str, patient: str) -> None:
    assert patient_from_name(name, KERMANY_PATIENT_REGEX) == patient


def test_regex_without_group_uses_whole_match_and_only_the_file_name() -> None:
    assert patient_from_name("scans/pat042/pat042_slice3.png", r"pat\d+") == "pat042"
    with pytest.raises(MedtlError) as info:
        patient_from_name("person12/scan.png", r"person\d+")  # folder names are not searched
    assert "scan.png" in str(info.value) and "person\\d+" in str(info.value)


def naive_split_overlap(ds: Dataset, fraction: float = 0.2, seed: int = 0) -> list[str]:
    """Patients shared by train and val in a split that ignores patients (what we must not do)."""
    train = [r for r in ds.records if r.split in ("train", "val")]
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    _, val = next(splitter.split(np.zeros(len(train)), [r.label for r in train]))
    val_set = set(val.tolist())
    leaky = [replace(r, split="val" if i in val_set else "train") for i, r in enumerate(train)]
    return patient_overlap(Dataset(leaky, ds.classes, "naive"))


def test_patient_regex_keeps_patients_out_of_both_train_and_val(kermany_like: Path) -> None:
    for seed in range(3):
        ds = load_dataset(kermany_like, patient_regex=KERMANY_PATIENT_REGEX, seed=seed)
        assert all(p is not None for p in ds.patients)
        assert patient_overlap(ds, "train", "val") == []
        assert_no_patient_overlap(ds)
        # the fixture can catch a leak: a split blind to patients does leak on it
        assert naive_split_overlap(ds, seed=seed)
    assert 12 <= len(ds.split("val")) <= 24


def test_without_regex_the_patients_are_unknown_and_the_split_leaks(kermany_like: Path) -> None:
    ds = load_dataset(kermany_like)
    assert ds.patients == [None] * len(ds)
    with_patients = Dataset(
        [
            replace(r, patient_id=patient_from_name(r.path, KERMANY_PATIENT_REGEX))
            for r in ds.records
        ],
        ds.classes,
    )
    assert patient_overlap(with_patients) != []
    with pytest.raises(MedtlError, match="patient"):
        assert_no_patient_overlap(with_patients)


def test_regex_that_does_not_match_names_the_file_and_the_regex(kermany_like: Path) -> None:
    with pytest.raises(MedtlError) as info:
        load_dataset(kermany_like, patient_regex=r"patient_(\d+)")
    message = str(info.value)
    assert "kermany_like" in message and "-0001.png" in message  # the full path of the file
    assert "patient_(\\d+)" in message and "\n" not in message


def write_patient_manifest(root: Path, regex_patients: bool = False) -> Path:
    """40 patients x 4 images in class 'a', 20 x 4 in 'b'; patients only in the manifest column."""
    from PIL import Image

    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for label, n_patients in (("a", 40), ("b", 20)):
        for p in range(n_patients):
            for j in range(4):
                name = f"{label}{p}_{j}.png"
                Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(
                    root / "img" / name
                )
                rows.append([f"img/{name}", label, f"{label}-patient-{p}"])
    with open(root / "m.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "patient_id"], *rows])
    return root / "m.csv"


def test_manifest_patient_column_groups_the_split_without_a_regex(tmp_path: Path) -> None:
    ds = load_dataset(write_patient_manifest(tmp_path), seed=3)
    assert patient_overlap(ds) == []
    assert naive_split_overlap(ds, seed=3)  # the same data split blindly leaks
    # patients stay whole: every patient's four images are on one side
    sides: dict[str | None, set[str | None]] = {}
    for r in ds.records:
        sides.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in sides.values())


def test_manifest_patient_column_wins_over_regex(tmp_path: Path) -> None:
    ds = load_dataset(write_patient_manifest(tmp_path), patient_regex=r"(\d+)_")
    assert ds.patients[0] == pseudonym("a-patient-0")  # pseudonymised, as every manifest id


def test_stratified_val_without_patients(tree) -> None:
    root = tree({"A": [f"a{i}.png" for i in range(80)], "B": [f"b{i}.png" for i in range(40)]})
    ds = load_dataset(root, val_fraction=0.25)
    assert ds.counts()["val"] == {"A": 20, "B": 10}


def test_stratified_val_with_patients(tmp_path: Path) -> None:
    ds = load_dataset(write_patient_manifest(tmp_path), val_fraction=0.2)
    val = ds.counts()["val"]
    assert val["a"] > 0 and val["b"] > 0
    share_b = val["b"] / (val["a"] + val["b"])
    assert abs(share_b - 1 / 3) < 0.1  # class 'b' is a third of the data
    assert 0.15 <= (val["a"] + val["b"]) / len(ds) <= 0.25


def test_split_is_seeded(tree) -> None:
    root = tree({"A": [f"a{i}.png" for i in range(30)], "B": [f"b{i}.png" for i in range(30)]})

    def val_paths(seed: int) -> list[str]:
        return load_dataset(root, seed=seed).split("val").paths

    assert val_paths(1) == val_paths(1)
    assert val_paths(1) != val_paths(2)


def test_carve_validation_direct() -> None:
    labels = [0] * 10 + [1] * 10
    val = carve_validation(labels, fraction=0.2, seed=0)
    assert sorted(np.bincount(np.asarray(labels)[val]).tolist()) == [2, 2]
    groups = [f"p{i // 2}" for i in range(20)]
    grouped = carve_validation(labels, groups, fraction=0.2, seed=0)
    chosen = {groups[i] for i in grouped}
    rest = {groups[i] for i in range(20) if i not in set(grouped.tolist())}
    assert chosen and not chosen & rest
    with pytest.raises(MedtlError, match="class 'x' has 1 training image"):
        carve_validation([0, 0, 1], fraction=0.2, class_names=["y", "x"])
    with pytest.raises(MedtlError, match="one patient"):
        carve_validation([0, 0, 1, 1], ["p", "p", "p", "p"], fraction=0.5)


def test_kfold_indices_grouped() -> None:
    labels = np.array([0, 1] * 20)
    groups = [f"p{i // 4}" for i in range(40)]
    folds = kfold_indices(labels, groups, n_splits=5, seed=0)
    assert len(folds) == 5
    held = np.concatenate([te for _, te in folds])
    assert sorted(held.tolist()) == list(range(40))
    for tr, te in folds:
        assert not {groups[i] for i in tr} & {groups[i] for i in te}


def test_the_split_does_not_depend_on_the_machines_pseudonym_salt(tmp_path: Path,
                                                                  monkeypatch) -> None:
    # A manifest's patient ids are salted per machine; the same data and seed must split the
    # same way on a colleague's machine, or a published split cannot be reproduced.
    manifest = write_patient_manifest(tmp_path)

    def load(salt: str) -> Dataset:
        monkeypatch.setenv("MEDTL_SALT", salt)
        return load_dataset(manifest, seed=0)

    here, there = load("a" * 64), load("b" * 64)
    assert here.patients != there.patients  # the salt is used...
    assert here.split("val").paths == there.split("val").paths  # ...and does not move the split
    assert ([f.split("heldout").paths for f in cross_validation_folds(here, 3, seed=0)]
            == [f.split("heldout").paths for f in cross_validation_folds(there, 3, seed=0)])


def test_grouped_folds_follow_the_order_patients_appear_not_their_names() -> None:
    labels = np.array([0, 1] * 30)
    names = [f"p{i // 3:02d}" for i in range(60)]
    renamed = [f"p{99 - i // 3:02d}" for i in range(60)]  # the same patients, names reversed
    assert np.array_equal(carve_validation(labels, names, fraction=0.2, seed=1),
                          carve_validation(labels, renamed, fraction=0.2, seed=1))
    from medtl.transfer.ensemble import fold_assignment

    assert np.array_equal(fold_assignment(labels, names, 3, seed=1),
                          fold_assignment(labels, renamed, 3, seed=1))
