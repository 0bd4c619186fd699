"""Patient identifiers in DICOM tags group images and are written nowhere (issue 5)."""

from __future__ import annotations

import numpy as np
import pytest

import medtl
from medtl.cli import main
from medtl.data.privacy import pseudonym

from .conftest import write_dicom

pydicom = pytest.importorskip("pydicom")

IDS = {f"p{i}": (f"SECRET-MRN-{7730 + i}", f"Doe^Jane{i}^Q") for i in range(10)}


@pytest.fixture
def dicom_data(tmp_path):
    """Two classes (a bright disc or a bar), 10 patients with 3 images each, as DICOM files
    named by position only; the identity is in the tags."""
    rng = np.random.default_rng(0)
    root = tmp_path / "dicoms"
    for k, (pid, name) in enumerate(IDS.values()):
        cls = "disc" if k % 2 else "bar"
        split = "test" if k >= 8 else "train"
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for j in range(3):
            img = rng.integers(0, 600, (48, 48))
            cy, cx = rng.integers(12, 36, 2)
            yy, xx = np.mgrid[:48, :48]
            if cls == "disc":
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 3000
            else:
                img[cy - 2:cy + 2, 4:44] = 3000
            write_dicom(d / f"img{k:02d}{j}.dcm", img, PatientID=pid, PatientName=name,
                        Modality="CR", BodyPartExamined="CHEST")
    return root


def test_patients_come_from_the_tags_as_pseudonyms(dicom_data):
    ds = medtl.load_dataset(dicom_data)
    expected = {pseudonym(pid) for pid, _ in IDS.values()}
    assert set(ds.patients) == expected
    assert all(p.startswith("pt-") for p in ds.patients)
    # Grouping by those pseudonyms: the carved validation split shares no patient with train.
    assert not set(ds.split("train").patients) & set(ds.split("val").patients)


def test_no_identifier_is_written_anywhere(dicom_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDTL_CACHE_DIR", str(cache))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(dicom_data), "--strategy", "hybrid", "--image-size", "64",
              "--out", str(out), "--quiet"])
    assert exit_.value.code in (0, None)
    report = tmp_path / "compare.html"
    with pytest.raises(SystemExit):
        main(["report", str(out), "--out", str(report)])
    manifest = tmp_path / "manifest.csv"
    medtl.load_dataset(dicom_data).to_manifest(manifest)

    written = [f for f in (*out.rglob("*"), *cache.rglob("*"), report, manifest) if f.is_file()]
    assert len(written) > 8
    needles = [s.encode() for pair in IDS.values() for s in pair]
    needles += [b"SECRET-MRN", b"Doe^Jane", b"Doe Jane"]
    for f in written:
        data = f.read_bytes()
        for needle in needles:
            assert needle not in data, f"{needle!r} found in {f}"
