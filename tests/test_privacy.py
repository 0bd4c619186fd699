"""Patient identifiers in DICOM tags, manifests and folder names group images and are written
nowhere; burned-in DICOM show no pixels in reports (issue 5; issue 15, acceptance 9)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import medtl
from medtl.cli import main
from medtl.data.privacy import pseudonym

from .conftest import write_dicom
from .processes import wait_for
from .scan import files_under, occurrences

pydicom = pytest.importorskip("pydicom")

# Ten patients, three images each. Patient 7 has a PatientName and no PatientID; patient 8's
# images say BurnedInAnnotation YES. Patients 0-4 also come with their record number in the
# manifest's patient_id column (the tags of the others group them).
PATIENTS = [(f"SECRET-MRN-{7730 + k}" if k != 7 else None, f"Doe^Jane{k}^Q" if k != 7
             else "Roe^Richard^X") for k in range(10)]
NAME_ONLY, BURNED = 7, 8
NEEDLES = [s for pair in PATIENTS for s in pair if s] + [
    "SECRET-MRN", "Doe^Jane", "Doe Jane", "Roe^Richard", "Roe Richard"]


def _split(k: int) -> str:
    return "test" if k >= 8 else "train"


def _write_dicoms(root: Path) -> Path:
    """Two classes (a bright disc or a bar) as DICOM files named by position only; the
    identity is in the tags."""
    rng = np.random.default_rng(0)
    for k, (pid, name) in enumerate(PATIENTS):
        cls = "disc" if k % 2 else "bar"
        d = root / _split(k) / cls
        d.mkdir(parents=True, exist_ok=True)
        for j in range(3):
            img = rng.integers(0, 600, (48, 48))
            cy, cx = rng.integers(12, 36, 2)
            yy, xx = np.mgrid[:48, :48]
            if cls == "disc":
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 3000
            else:
                img[cy - 2:cy + 2, 4:44] = 3000
            tags = {"PatientName": name, "Modality": "CR", "BodyPartExamined": "CHEST"}
            if pid is not None:
                tags["PatientID"] = pid
            if k == BURNED:
                tags["BurnedInAnnotation"] = "YES"
            write_dicom(d / f"img{k:02d}{j}.dcm", img, **tags)
    return root


def _write_manifest(root: Path) -> Path:
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "split"])
        for p in sorted(root.rglob("*.dcm")):
            k = int(p.stem[3:5])
            w.writerow([p.relative_to(root).as_posix(), p.parent.name,
                        PATIENTS[k][0] if k < 5 else "", _split(k)])
    return manifest


@pytest.fixture
def dicom_data(tmp_path):
    return _write_dicoms(tmp_path / "dicoms")


def test_patients_come_from_the_tags_as_pseudonyms(dicom_data):
    ds = medtl.load_dataset(dicom_data)
    expected = {pseudonym(pid or name) for pid, name in PATIENTS}
    assert set(ds.patients) == expected  # PatientName when there is no PatientID
    assert all(p.startswith("pt-") for p in ds.patients)
    # Grouping by those pseudonyms: the carved validation split shares no patient with train.
    assert not set(ds.split("train").patients) & set(ds.split("val").patients)
    burned = {Path(r.path).name for r in ds.records if r.burned_in}
    assert burned == {f"img{BURNED:02d}{j}.dcm" for j in range(3)}


def test_a_manifest_and_a_folder_name_give_only_pseudonyms(dicom_data, tmp_path):
    ds = medtl.load_dataset(_write_manifest(dicom_data))
    by_file = {Path(r.path).stem: r.patient_id for r in ds.records}
    assert by_file["img000"] == pseudonym(PATIENTS[0][0])  # the column, pseudonymised
    assert by_file["img090"] == pseudonym(PATIENTS[9][0])  # the tags of the others
    # A series folder named after its patient, whose files carry no patient tag: its name is
    # the group, as a pseudonym.
    series = tmp_path / "vol" / "DOE_JANE_19700101"
    series.mkdir(parents=True)
    for z in range(4):
        write_dicom(series / f"{z:03d}.dcm", np.full((16, 16), z * 50), ImagePositionPatient=[
            0, 0, z], Modality="CT")
    other = tmp_path / "vol" / "ROE_RICHARD"
    other.mkdir()
    for z in range(4):
        write_dicom(other / f"{z:03d}.dcm", np.full((16, 16), z * 40), Modality="CT",
                    ImagePositionPatient=[0, 0, z])
    manifest = tmp_path / "vol" / "m.csv"
    manifest.write_text("path,label\nDOE_JANE_19700101,a\nROE_RICHARD,b\n"
                        "DOE_JANE_19700101,b\nROE_RICHARD,a\n")
    vols = medtl.load_dataset(manifest, val_fraction=0)
    assert {r.patient_id for r in vols.records} == {
        pseudonym("volume:DOE_JANE_19700101"), pseudonym("volume:ROE_RICHARD")}


def _killed_run(data: Path, out: Path) -> Path:
    """A trainable run's draft after ``kill -9`` past its first checkpoint."""
    env = {**os.environ, "MEDTL_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medtl.cli", "train", str(data), "--strategy", "full",
         "--weights", "random", "--image-size", "32", "--epochs", "500", "--patience", "500",
         "--augment", "none", "--out", str(out), "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    draft = out.with_name(f".{out.name}.partial")
    try:
        wait_for(lambda: any((draft / "checkpoints").glob("*.pt")), proc, "a checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return draft


def _cli(args, capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one command."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out, out.err


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory):
    """(data, manifest, run, cache): a hybrid run trained on the manifest, with a cache of its
    own so that everything it wrote can be searched."""
    tmp = tmp_path_factory.mktemp("privacy")
    data = _write_dicoms(tmp / "dicoms")
    manifest = _write_manifest(data)
    cache, out = tmp / "cache", tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTL_CACHE_DIR", str(cache))
        with pytest.raises(SystemExit) as exit_:
            main(["train", str(manifest), "--strategy", "hybrid", "--image-size", "32",
                  "--out", str(out), "--quiet"])
    assert exit_.value.code in (0, None)
    return data, manifest, out, cache


def test_no_identifier_is_written_anywhere(dicom_run, tmp_path, monkeypatch, capsys):
    dicom_data, manifest, out, cache = dicom_run
    monkeypatch.setenv("MEDTL_CACHE_DIR", str(cache))
    expected = [out / n for n in ("config.json", "metrics.json", "predictions.csv", "log.txt",
                                  "report.html", "history.csv", "model/model.json")]
    report = tmp_path / "compare.html"
    shown = []
    for args, files in [
        (["report", out, "--out", report], [report]),
        (["evaluate", out, "--output", tmp_path / "ev.csv", "--quiet"], [tmp_path / "ev.csv"]),
        (["predict", out, dicom_data / "test", "--output", tmp_path / "pr.csv", "--quiet"],
         [tmp_path / "pr.csv"]),
        (["predict", out, dicom_data / "test" / "bar" / "img080.dcm", "--quiet"], []),
        (["explain", out, dicom_data / "test", "--out", tmp_path / "maps", "--quiet"],
         [tmp_path / "maps" / "explanations.csv", tmp_path / "maps" / "img080.npy"]),
        (["info", manifest, "--json", "--quiet"], []),
    ]:
        code, text, err = _cli(args, capsys)
        assert code == 0, (args, err)
        shown += [text, err]
        expected += files
    code, text, err = _cli(["check", manifest, "--json", "--quiet"], capsys)
    assert code in (0, 1), err  # 1: a problem found (there may be near-duplicates)
    assert json.loads(text)["summary"]["images"] == 30
    shown += [text, err]
    medtl.load_dataset(manifest).to_manifest(tmp_path / "written.csv")
    expected.append(tmp_path / "written.csv")
    draft = _killed_run(manifest, tmp_path / "killed")
    expected.append(next((draft / "checkpoints").glob("*.pt")))

    missing = [str(f) for f in expected if not f.is_file()]
    assert not missing, missing
    written = files_under(out, cache, report, tmp_path / "ev.csv", tmp_path / "pr.csv",
                          tmp_path / "maps", tmp_path / "written.csv", draft)
    assert len(written) > 20
    assert occurrences(written, NEEDLES) == []
    for text in shown:
        assert not [n for n in NEEDLES if n in text]


def test_burned_in_dicom_are_warned_about_and_left_out_of_the_report(dicom_run):
    out = dicom_run[2]
    burned = [f"img{BURNED:02d}{j}.dcm" for j in range(3)]
    warnings = [line for line in (out / "log.txt").read_text().splitlines()
                if "BurnedInAnnotation YES" in line]
    assert len(warnings) == 3 and all(any(b in w for b in burned) for w in warnings)
    page = (out / "report.html").read_text()
    assert "Where the model looks" in page and "withheld" in page
    # The report names each image it shows beside it (a table row, a gallery card): a part
    # naming a burned-in file holds no image.
    parts = [p for chunk in page.split("<tr") for p in chunk.split("<figure")]
    assert not [p for p in parts if any(b in p for b in burned) and "<img" in p]


def test_confident_errors_withhold_burned_in_images(tmp_path):
    from PIL import Image

    from medtl.data.dataset import Dataset, Record
    from medtl.reporting.html import confident_errors, render_run_report

    records = []
    for k in range(4):
        Image.fromarray(np.full((8, 8), 40 * k, np.uint8)).save(tmp_path / f"{k}.png")
        records.append(Record(str(tmp_path / f"{k}.png"), k % 2, "test", burned_in=k < 2))
    data = Dataset(records, ["a", "b"])
    proba = np.array([[0.1, 0.9], [0.8, 0.2], [0.05, 0.95], [0.7, 0.3]])  # all wrong
    errors = confident_errors(data, proba, ["a", "b"])
    by_name = {Path(e["path"]).name: e for e in errors}
    assert [by_name[f"{k}.png"]["thumbnail"] is None for k in range(4)] == [True, True, False,
                                                                          False]
    page = render_run_report({"classes": ["a", "b"]}, {}, errors=errors)
    assert "2 images withheld" in page and page.count("<img") == 2
