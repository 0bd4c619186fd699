"""Multi-label data (issue 21): manifest layouts, uncertainty policies, --labels, the CheXpert
path rule, patient-grouped iterative stratification, manifests written back, info and check."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medtl.cli import app, main
from medtl.data import check_dataset, dataset_summary, load_dataset
from medtl.data.splits import cross_validation_folds, group_codes, kfold_indices
from medtl.errors import MedtlError

from .conftest import make_tree, write_image

NAN = math.nan


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def images(root: Path, n: int, folder: str = "img") -> list[str]:
    """``n`` tiny PNGs under ``root/folder``; their paths relative to ``root``."""
    names = [f"i{k:03d}.png" for k in range(n)]
    make_tree(root, {folder: names})
    return [f"{folder}/{name}" for name in names]


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal, NaN where NaN."""
    return np.array_equal(np.asarray(a, float), np.asarray(b, float), equal_nan=True)


# Per-label columns: every kind of value a manifest may hold (CheXpert writes 1.0/0.0/-1.0).
COLUMN_ROWS = [
    # effusion, cardiomegaly
    ["1", "0"],
    ["0", "1"],
    ["1", "1"],
    ["0", "0"],
    ["-1", ""],
    ["", "-1.0"],
    ["1.0", "0.0"],
    ["0.0", "1.0"],
]


@pytest.fixture
def columns(tmp_path: Path) -> Path:
    paths = images(tmp_path, len(COLUMN_ROWS))
    return write_csv(tmp_path / "m.csv", ["path", "Effusion", "Cardiomegaly", "split"],
                     [[p, *v, ""] for p, v in zip(paths, COLUMN_ROWS, strict=True)])


def test_label_columns_parse_to_targets(columns: Path) -> None:
    ds = load_dataset(columns, val_fraction=0)
    assert ds.multilabel and ds.classes == ["Effusion", "Cardiomegaly"]
    assert all(r.label == 0 for r in ds.records)
    assert ds.labels.shape == (8, 2) and ds.labels.dtype == np.float32
    assert same(ds.labels, [[1, 0], [0, 1], [1, 1], [0, 0], [NAN, NAN], [NAN, NAN], [1, 0],
                            [0, 1]])


@pytest.mark.parametrize(("uncertain", "blank", "row4", "row5"), [
    ("ignore", "unknown", [NAN, NAN], [NAN, NAN]),
    ("zeros", "unknown", [0, NAN], [NAN, 0]),
    ("ones", "unknown", [1, NAN], [NAN, 1]),
    ("ignore", "zeros", [NAN, 0], [0, NAN]),
    ("ones", "zeros", [1, 0], [0, 1]),
])
def test_uncertain_and_blank_policies(columns: Path, uncertain: str, blank: str,
                                      row4: list[float], row5: list[float]) -> None:
    ds = load_dataset(columns, val_fraction=0, uncertain=uncertain, blank=blank)
    assert same(ds.labels[4], row4) and same(ds.labels[5], row5)
    assert same(ds.labels[:4], [[1, 0], [0, 1], [1, 1], [0, 0]])  # known values never move


@pytest.mark.parametrize(("option", "value"), [("uncertain", "maybe"), ("blank", "ones")])
def test_a_bad_policy_name_is_a_user_error(columns: Path, option: str, value: str) -> None:
    with pytest.raises(MedtlError, match=f"{option} '{value}'"):
        load_dataset(columns, **{option: value})


def test_labels_pick_and_order_the_columns(columns: Path) -> None:
    ds = load_dataset(columns, val_fraction=0, labels="cardiomegaly, EFFUSION")
    assert ds.classes == ["Cardiomegaly", "Effusion"]  # the file's spelling, the order asked
    assert same(ds.labels[:4], [[0, 1], [1, 0], [1, 1], [0, 0]])
    assert load_dataset(columns, val_fraction=0, labels=["Cardiomegaly", "Effusion"]
                        ).classes == ["Cardiomegaly", "Effusion"]


def test_labels_naming_a_missing_column_is_a_user_error(columns: Path) -> None:
    with pytest.raises(MedtlError) as info:
        load_dataset(columns, labels="effusion,edema,atelectasis")
    message = str(info.value)
    assert "'edema'" in message and "'atelectasis'" in message and "m.csv" in message
    assert "Effusion, Cardiomegaly" in message  # what there is


def test_a_value_outside_1_0_minus1_blank_is_a_user_error(tmp_path: Path) -> None:
    paths = images(tmp_path, 5)
    manifest = write_csv(tmp_path / "m.csv", ["path", "a", "b"],
                         [[paths[0], "1", "0"], [paths[1], "1", "0"], [paths[2], "0", "yes"],
                          [paths[3], "0", "1"], [paths[4], "1", "1"]])
    with pytest.raises(MedtlError) as info:
        load_dataset(manifest, labels="a,b")
    message = str(info.value)
    assert "m.csv" in message and "line 4" in message and "'b'" in message and "'yes'" in message


def test_columns_are_found_and_others_ignored_with_a_log_line(tmp_path: Path, caplog) -> None:
    # CheXpert's train.csv: Sex, Age, Frontal/Lateral beside the observations.
    paths = images(tmp_path, 6)
    rows = [[p, sex, age, "Frontal", a, b, "7", ""] for p, sex, age, a, b in zip(
        paths, ["Male", "Female"] * 3, ["68", "1", "0", "34", "1", "0"],
        ["1.0", "0.0", "1.0", "0.0", "-1.0", ""], ["0.0", "1.0", "", "0.0", "1.0", "1.0"],
        strict=True)]
    manifest = write_csv(tmp_path / "train.csv",
                         ["Path", "Sex", "Age", "Frontal/Lateral", "Edema", "Pleural Effusion",
                          "Count", "Notes"], rows)
    with caplog.at_level(logging.INFO, logger="medtl"):
        ds = load_dataset(manifest, val_fraction=0)
    assert ds.classes == ["Edema", "Pleural Effusion"]
    assert "Sex, Age, Frontal/Lateral, Count, Notes" in caplog.text  # Notes: all blank


def test_a_lone_1_0_column_is_not_taken_for_a_label_without_labels(tmp_path: Path) -> None:
    paths = images(tmp_path, 4)
    manifest = write_csv(tmp_path / "m.csv", ["path", "target"],
                         [[p, v] for p, v in zip(paths, "1100", strict=True)])
    with pytest.raises(MedtlError, match="'label'.*--labels 'target'"):
        load_dataset(manifest)
    assert load_dataset(manifest, labels="target", val_fraction=0).classes == ["target"]


def test_findings_column_chestxray14(tmp_path: Path) -> None:
    paths = images(tmp_path, 6)
    findings = ["Effusion|Cardiomegaly", "No Finding", "Effusion", "Cardiomegaly|Atelectasis",
                "Atelectasis", "No Finding"]
    manifest = write_csv(tmp_path / "Data_Entry.csv", ["path", "Finding Labels"],
                         [[p, f] for p, f in zip(paths, findings, strict=True)])
    ds = load_dataset(manifest, val_fraction=0)
    assert ds.multilabel and ds.classes == ["Atelectasis", "Cardiomegaly", "Effusion"]
    assert same(ds.labels, [[0, 1, 1], [0, 0, 0], [0, 0, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]])
    picked = load_dataset(manifest, val_fraction=0, labels="effusion,atelectasis")
    assert picked.classes == ["Effusion", "Atelectasis"]
    assert same(picked.labels, [[1, 0], [0, 0], [1, 0], [0, 1], [0, 1], [0, 0]])
    with pytest.raises(MedtlError, match="'Hernia'.*Atelectasis, Cardiomegaly, Effusion"):
        load_dataset(manifest, labels="Hernia")


def test_findings_patient_id_column_groups_the_split(tmp_path: Path) -> None:
    # Data_Entry_2017.csv names the column "Patient ID"; ignoring it would split patients.
    paths = images(tmp_path, 40)
    findings = ["Effusion", "No Finding", "Effusion|Mass", "Mass"]
    manifest = write_csv(tmp_path / "m.csv", ["path", "Finding Labels", "Patient ID"],
                         [[p, findings[k % 4], str(k // 4)] for k, p in enumerate(paths)])
    ds = load_dataset(manifest)
    assert len(set(ds.patients)) == 10
    assert not ({r.patient_id for r in ds.records if r.split == "val"}
                & {r.patient_id for r in ds.records if r.split == "train"})


@pytest.mark.parametrize("bad", ["", "No Finding|Effusion"])
def test_findings_empty_or_contradictory_is_a_user_error(tmp_path: Path, bad: str) -> None:
    paths = images(tmp_path, 2)
    manifest = write_csv(tmp_path / "m.csv", ["path", "Finding Labels"],
                         [[paths[0], "Effusion"], [paths[1], bad]])
    with pytest.raises(MedtlError, match="line 3"):
        load_dataset(manifest)


def test_labels_on_a_single_label_source_is_a_user_error(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "f", {"a": ["1.png", "2.png"], "b": ["3.png", "4.png"]})
    manifest = write_csv(root / "m.csv", ["path", "label"],
                         [["a/1.png", "a"], ["a/2.png", "a"], ["b/3.png", "b"], ["b/4.png", "b"]])
    npz = tmp_path / "m.npz"
    np.savez(npz, train_images=np.zeros((4, 3, 3), np.uint8), train_labels=np.array([0, 0, 1, 1]))
    for source in (root, manifest, npz):
        with pytest.raises(MedtlError, match="--labels"):
            load_dataset(source, labels="a")
    assert not load_dataset(manifest).multilabel  # without --labels, as before


def test_chexpert_paths_name_the_manifest_folder(tmp_path: Path) -> None:
    # CheXpert-v1.0-small/train.csv lists CheXpert-v1.0-small/train/patient00001/...
    top = tmp_path / "CheXpert-v1.0-small"
    rows = []
    for k, (a, b) in enumerate([("1.0", "0.0"), ("0.0", "1.0"), ("1.0", "1.0"), ("0.0", "0.0")]):
        folder = top / "train" / f"patient{k:05d}" / "study1"
        folder.mkdir(parents=True)
        write_image(folder / "view1_frontal.jpg")
        rows.append([f"CheXpert-v1.0-small/train/patient{k:05d}/study1/view1_frontal.jpg", a, b])
    manifest = write_csv(top / "train.csv", ["Path", "Edema", "Atelectasis"], rows)
    ds = load_dataset(manifest, val_fraction=0)
    assert ds.paths[0] == str(top / "train" / "patient00000" / "study1" / "view1_frontal.jpg")


def test_each_label_needs_two_known_positives_and_negatives(tmp_path: Path) -> None:
    paths = images(tmp_path, 5)
    manifest = write_csv(tmp_path / "m.csv", ["path", "a", "rare"],
                         [[paths[0], "1", "1"], [paths[1], "1", "0"], [paths[2], "0", ""],
                          [paths[3], "0", "-1"], [paths[4], "1", "0"]])
    with pytest.raises(MedtlError) as info:
        load_dataset(manifest)
    message = str(info.value)
    assert "'rare'" in message and "1 known positive" in message and "--labels" in message
    assert load_dataset(manifest, labels="a", val_fraction=0).classes == ["a"]
    assert load_dataset(manifest, uncertain="ones", val_fraction=0).classes == ["a", "rare"]


def test_a_label_present_in_test_but_not_in_train_is_a_user_error(tmp_path: Path) -> None:
    paths = images(tmp_path, 6)
    values = [("1", "0", "train"), ("0", "0", "train"), ("1", "0", "train"),
              ("0", "0", "train"), ("0", "1", "test"), ("1", "1", "test")]
    manifest = write_csv(tmp_path / "m.csv", ["path", "a", "b", "split"],
                         [[p, *v] for p, v in zip(paths, values, strict=True)])
    with pytest.raises(MedtlError, match="'b' is present in test but in no train image"):
        load_dataset(manifest)


# ---- splits ----------------------------------------------------------------------------------

PREVALENCE = (0.35, 0.2, 0.1)


def write_patients(root: Path, n_patients: int = 200, seed: int = 3) -> Path:
    """``n_patients`` patients with 1-3 images each; three labels shared by a patient's
    images (prevalence :data:`PREVALENCE`), a fifth of the images with one label unknown."""
    rng = np.random.default_rng(seed)
    rows = []
    names: list[str] = []
    for p in range(n_patients):
        present = rng.random(3) < PREVALENCE
        for _ in range(int(rng.integers(1, 4))):
            values = ["1" if v else "0" for v in present]
            if rng.random() < 0.2:
                values[int(rng.integers(3))] = ""
            name = f"img/p{p:03d}_{len(names):04d}.png"
            names.append(name)
            rows.append([name, *values, f"MRN-{p:04d}"])
    make_tree(root, {"img": [n.split("/")[1] for n in names]})
    return write_csv(root / "m.csv", ["path", "effusion", "cardiomegaly", "nodule",
                                      "patient_id"], rows)


@pytest.fixture(scope="module")
def patients_manifest(tmp_path_factory) -> Path:
    return write_patients(tmp_path_factory.mktemp("patients"))


def patient_positives(ds) -> np.ndarray:
    """(n_patients, K) bool: the labels any image of each patient shows."""
    codes = group_codes(ds.patients)
    present = np.zeros((int(codes.max()) + 1, len(ds.classes)), dtype=bool)
    np.logical_or.at(present, codes, ds.labels == 1)
    return present


def test_the_carved_split_keeps_patients_whole_and_is_stratified(patients_manifest: Path
                                                                  ) -> None:
    ds = load_dataset(patients_manifest, seed=0)
    val, train = ds.split("val"), ds.split("train")
    assert not set(val.patients) & set(train.patients)
    codes = group_codes(ds.patients)
    in_val = np.array([r.split == "val" for r in ds.records])
    val_patients = np.unique(codes[in_val])
    n_patients = int(codes.max()) + 1
    assert len(val_patients) == n_patients // 5
    # Iterative stratification over patients: each label's positive patients are shared out
    # to within one of the exact share (a random patient split misses that 97 % of the time).
    present = patient_positives(ds)
    expected = present.sum(0) * len(val_patients) / n_patients
    assert np.all(np.abs(present[val_patients].sum(0) - expected) <= 1), (
        present[val_patients].sum(0), expected)
    for k in range(len(ds.classes)):  # and the images' positive shares stay close
        share_val = np.nanmean(val.labels[:, k])
        share_train = np.nanmean(train.labels[:, k])
        assert abs(share_val - share_train) < 0.1


def test_the_carved_split_does_not_depend_on_the_pseudonym_salt(patients_manifest: Path,
                                                                 monkeypatch) -> None:
    def load(salt: str):
        monkeypatch.setenv("MEDTL_SALT", salt)
        return load_dataset(patients_manifest, seed=1)

    here, there = load("a" * 64), load("b" * 64)
    assert here.patients != there.patients  # the salt is used...
    assert here.split("val").paths == there.split("val").paths  # ...and does not move the split
    assert ([f.split("heldout").paths for f in cross_validation_folds(here, 3, seed=0)]
            == [f.split("heldout").paths for f in cross_validation_folds(there, 3, seed=0)])


def test_multilabel_folds_cover_every_image_once_by_patient(patients_manifest: Path) -> None:
    ds = load_dataset(patients_manifest)
    folds = kfold_indices(ds.labels, ds.patients, n_splits=4, seed=0)
    held = np.concatenate([te for _, te in folds])
    assert sorted(held.tolist()) == list(range(len(ds)))
    for tr, te in folds:
        assert not {ds.patients[i] for i in tr} & {ds.patients[i] for i in te}
    for fold in cross_validation_folds(ds, 3, seed=0):
        assert fold.multilabel and fold.classes == ds.classes
        sides = [{r.patient_id for r in fold.records if r.split == s}
                 for s in ("train", "val", "heldout")]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])


def test_a_one_label_multilabel_set_still_splits(patients_manifest: Path) -> None:
    ds = load_dataset(patients_manifest, labels="nodule")
    assert ds.classes == ["nodule"] and len(ds.split("val"))
    assert not set(ds.split("val").patients) & set(ds.split("train").patients)


# ---- manifests written back ------------------------------------------------------------------


def test_to_manifest_round_trip(columns: Path, tmp_path: Path) -> None:
    ds = load_dataset(columns, uncertain="zeros", seed=0)
    out = tmp_path / "again.csv"
    ds.to_manifest(out)
    with open(out, newline="") as fh:
        assert next(csv.reader(fh)) == ["path", "Effusion", "Cardiomegaly", "patient_id", "split"]
    again = load_dataset(out)
    assert again.multilabel and again.classes == ds.classes
    assert same(again.labels, ds.labels)
    assert again.paths == ds.paths
    assert [r.split for r in again.records] == [r.split for r in ds.records]
    assert again.fingerprint() == ds.fingerprint()


def test_a_single_label_manifest_is_written_as_before(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"a": ["1.png", "2.png"], "b": ["3.png", "4.png"]})
    ds = load_dataset(root, val_fraction=0)
    ds.to_manifest(root / "m.csv")
    assert (root / "m.csv").read_text().splitlines() == [
        "path,label,patient_id,split", "a/1.png,a,,train", "a/2.png,a,,train",
        "b/3.png,b,,train", "b/4.png,b,,train"]


# ---- medtl info and medtl check --------------------------------------------------------------

INFO_ROWS = [  # effusion, mass
    ("1", "1", "train"), ("1", "0", "train"), ("0", "1", "train"), ("0", "0", "train"),
    ("1", "", "train"), ("-1", "1", "train"), ("1", "0", "test"), ("0", "1", "test"),
]


@pytest.fixture
def info_manifest(tmp_path: Path) -> Path:
    names = [f"i{k}.png" for k in range(len(INFO_ROWS))]
    make_tree(tmp_path, {"img": names})
    for name in names:  # 32 px: distinct enough for the near-duplicate check
        write_image(tmp_path / "img" / name, size=(32, 32))
    return write_csv(tmp_path / "m.csv", ["path", "effusion", "mass", "split"],
                     [[f"img/{n}", *v] for n, v in zip(names, INFO_ROWS, strict=True)])


def test_summary_counts_per_label_and_cooccurrence(info_manifest: Path) -> None:
    summary = dataset_summary(info_manifest, quiet=True)
    assert summary["multilabel"] is True
    counts = summary["label_counts"]
    total = {name: {kind: sum(c[name][kind] for c in counts.values())
                    for kind in ("positive", "negative", "unknown")}
             for name in ("effusion", "mass")}
    assert total == {"effusion": {"positive": 4, "negative": 3, "unknown": 1},
                     "mass": {"positive": 4, "negative": 3, "unknown": 1}}
    assert counts["test"] == {"effusion": {"positive": 1, "negative": 1, "unknown": 0},
                              "mass": {"positive": 1, "negative": 1, "unknown": 0}}
    co = summary["cooccurrence"]
    assert co["split"] == "train" and co["labels"] == ["effusion", "mass"]
    train = load_dataset(info_manifest).split("train").labels == 1
    assert co["matrix"] == (train.T.astype(int) @ train.astype(int)).tolist()


def test_check_reports_labels_and_uncertain_ones(info_manifest: Path) -> None:
    result = check_dataset(info_manifest, quiet=True, uncertain="ones")
    summary = result["summary"]
    assert summary["label_counts"]["train"]["effusion"] == {"positive": 4, "negative": 2,
                                                            "unknown": 0}
    # check takes the splits as given (no val carved): all six train images
    assert summary["cooccurrence"]["matrix"] == [[4, 2], [2, 3]]
    assert any("unknown label values" in n and "mass 1" in n for n in result["notes"])


def test_info_and_check_print_label_tables(info_manifest: Path, capsys) -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["info", str(info_manifest), "-q"])
    assert out.exit_code == 0, out.output
    assert "label: positive / negative / unknown" in out.stdout
    assert "co-occurrence (train): images with both" in out.stdout
    assert "1 / 1 / 0" in out.stdout  # test split, both labels
    as_json = json.loads(runner.invoke(app, ["info", str(info_manifest), "--json", "-q",
                                             "--labels", "mass", "--uncertain", "zeros"]).stdout)
    assert as_json["classes"] == ["mass"] and as_json["cooccurrence"]["matrix"][0][0] >= 1
    out = runner.invoke(app, ["check", str(info_manifest), "-q", "--uncertain", "ones",
                              "--blank", "zeros"])
    assert out.exit_code == 0, out.output
    assert "co-occurrence (train): images with both" in out.stdout
    assert "4 / 2 / 0" in out.stdout  # effusion in train: -1 as 1, the blank mass as 0
    with pytest.raises(SystemExit) as exited:  # main(): a MedtlError is one line, exit 2
        main(["info", str(info_manifest), "--uncertain", "maybe"])
    assert exited.value.code == 2 and "uncertain 'maybe'" in capsys.readouterr().err


# The single-label `medtl info` table and patient table below were printed by medtl before
# multi-label support was added (same data, same command): single-label output must not move.
SINGLE_LABEL_INFO = """\
┏━━━━━━━┳━━━━┳━━━┳━━━━━━━━━━┓
┃ split ┃  a ┃ b ┃ patients ┃
┡━━━━━━━╇━━━━╇━━━╇━━━━━━━━━━┩
│ train │ 12 │ 6 │        9 │
│ val   │  4 │ 2 │        3 │
│ test  │  4 │ 2 │        3 │
└───────┴────┴───┴──────────┘
@PATIENTS@
┏━━━━━━━┳━━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┓
┃ split ┃ patients ┃ images ┃ images per patient (min/median/max) ┃ patients in several classes ┃
┡━━━━━━━╇━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┩
│ train │        9 │     18 │                               2/2/2 │                           6 │
│ val   │        3 │      6 │                               2/2/2 │                           2 │
│ test  │        3 │      6 │                               2/2/2 │                           2 │
└───────┴──────────┴────────┴─────────────────────────────────────┴─────────────────────────────┘
image sizes: {'20x16': 30}
modalities: png x30
unreadable images: 0
""".replace("@PATIENTS@", " " * 44 + "patients" + " " * 45)  # rich centres the title


def test_single_label_info_output_is_unchanged(tmp_path: Path) -> None:
    rows = []
    for i in range(30):
        cls = "a" if i % 3 else "b"
        write_image(make_tree(tmp_path, {cls: []}) / cls / f"im{i}.png", size=(20, 16))
        rows.append([f"{cls}/im{i}.png", cls, f"P{i // 2}", "test" if i >= 24 else ""])
    manifest = write_csv(tmp_path / "m.csv", ["path", "label", "patient_id", "split"], rows)
    out = CliRunner().invoke(app, ["info", str(manifest), "-q"])
    assert out.exit_code == 0, out.output
    assert out.stdout[out.stdout.index("┏"):] == SINGLE_LABEL_INFO  # after the title (a path)
    summary = json.loads(CliRunner().invoke(app, ["info", str(manifest), "-q", "--json"]).stdout)
    assert set(summary) == {"source", "classes", "counts", "patients", "patient_structure",
                            "image_sizes", "distinct_image_sizes", "modalities", "unreadable"}
    checked = json.loads(CliRunner().invoke(app, ["check", str(manifest), "--json"]).stdout)
    assert "label_counts" not in checked["summary"] and "multilabel" not in checked["summary"]
