"""medtl check: planted duplicates and a planted patient leak are found; real data as it is."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtl.cli import main
from medtl.data import KERMANY_PATIENT_REGEX
from medtl.data.checks import check_dataset
from medtl.data.samples import DEMO_PATIENT_REGEX, demo_data_path

from ..conftest import kermany_or_skip

# The embedded sample holds two pairs of byte-identical test X-rays, as the Kermany test split
# does (check_dataset found them; the file names differ by one number).
DEMO_DUPLICATES = {("person134_bacteria_643.jpeg", "person134_bacteria_644.jpeg"),
                   ("person1661_virus_2872.jpeg", "person1661_virus_2873.jpeg")}


def _run(args: list[str], capsys) -> tuple[int, dict]:
    with pytest.raises(SystemExit) as exit_:
        main(["check", *args, "--json"])
    return exit_.value.code or 0, json.loads(capsys.readouterr().out)


def _kinds(result: dict) -> dict[str, dict]:
    return {p["kind"]: p for p in result["problems"]}


@pytest.fixture
def clean_demo(tmp_path) -> Path:
    """The embedded sample without one file of each duplicate pair: nothing to find."""
    root = tmp_path / "demo"
    shutil.copytree(demo_data_path(), root)
    for _, second in DEMO_DUPLICATES:
        next(root.rglob(second)).unlink()
    return root


def test_the_embedded_sample_has_exactly_its_two_duplicate_pairs(capsys):
    code, result = _run([str(demo_data_path()), "--patient-regex", DEMO_PATIENT_REGEX], capsys)
    assert code == 1
    assert list(_kinds(result)) == ["exact duplicate within a split"]
    found = {tuple(sorted(Path(i["path"]).name for i in group))
             for group in _kinds(result)["exact duplicate within a split"]["items"]}
    assert found == DEMO_DUPLICATES


def test_a_clean_dataset_exits_0(clean_demo, capsys):
    code, result = _run([str(clean_demo), "--patient-regex", DEMO_PATIENT_REGEX], capsys)
    assert code == 0, result["problems"]
    assert result["patients"]["train"]["patients"] > 100


def test_planted_duplicate_near_duplicate_and_patient_leak_are_all_found(clean_demo, capsys):
    train = sorted((clean_demo / "train" / "NORMAL").glob("*.jpeg"))
    test_dir = clean_demo / "test" / "NORMAL"
    # 1. The same bytes under another name (and another patient) in test.
    shutil.copy(train[0], test_dir / "IM-9001-0001.jpeg")
    # 2. Another training X-ray, resized and re-encoded at JPEG quality 70.
    img = Image.open(train[1]).convert("L")
    buf = io.BytesIO()
    img.resize((180, 180)).save(buf, "JPEG", quality=70)
    (test_dir / "IM-9002-0001.jpeg").write_bytes(buf.getvalue())
    # 3. A new image of a training patient: different content, same patient id.
    patient = train[2].name.split("-")[1]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (224, 224), dtype=np.uint8)).save(
        test_dir / f"IM-{patient}-0009.jpeg")

    code, result = _run([str(clean_demo), "--patient-regex", DEMO_PATIENT_REGEX], capsys)
    assert code == 1
    kinds = _kinds(result)
    assert set(kinds) == {"exact duplicate across splits (leakage)",
                          "near duplicate across splits (leakage)", "patient in two splits"}
    exact = kinds["exact duplicate across splits (leakage)"]["items"]
    assert {Path(i["path"]).name for i in exact[0]} == {train[0].name, "IM-9001-0001.jpeg"}
    near = kinds["near duplicate across splits (leakage)"]["items"]
    assert [{Path(i["path"]).name for i in g} for g in near] == [
        {train[1].name, "IM-9002-0001.jpeg"}]
    leak = kinds["patient in two splits"]["items"]
    assert leak == [{"splits": ["train", "test"], "patients": [f"IM-{patient}"]}]


def test_the_human_output_names_the_problem(clean_demo, capsys):
    train = sorted((clean_demo / "train" / "PNEUMONIA").glob("*.jpeg"))
    shutil.copy(train[0], clean_demo / "test" / "PNEUMONIA" / "copy.jpeg")
    with pytest.raises(SystemExit) as exit_:
        main(["check", str(clean_demo), "--quiet"])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "exact duplicate across splits" in out and "copy.jpeg" in out
    assert "patients unknown" in out


def test_official_kermany_split_patient_structure():
    root = kermany_or_skip()
    result = check_dataset(root, patient_regex=KERMANY_PATIENT_REGEX, quiet=True)
    assert result["n_images"] == 5840
    structure = result["patients"]
    assert structure["train"]["patients"] == 2635 and structure["test"]["patients"] == 404
    assert structure["train"]["images_per_patient"]["max"] == 30
    kinds = _kinds(result)
    # No image of the test split reappears in train, exactly or nearly; but 264 file-name
    # patient ids occur in both (the test split numbers its own patients, so these may be
    # different children with the same number: medtl reports, it cannot decide).
    assert not any("across splits" in k for k in kinds)
    assert kinds["patient in two splits"]["count"] == 264
    assert kinds["exact duplicate within a split"]["count"] == 30
