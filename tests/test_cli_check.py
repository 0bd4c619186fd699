"""`medtl check` and the patient table of `medtl info` on the command line: exit codes 0/1/2."""

from __future__ import annotations

import json

import pytest

from medtl.cli import main
from medtl.data.checks import NEAR_THRESHOLD
from medtl.data.samples import DEMO_PATIENT_REGEX, demo_data_path


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


def test_check_a_missing_path_is_a_one_line_user_error(capsys, tmp_path):
    code, out, err = run_cli(["check", tmp_path / "nowhere"], capsys)
    assert code == 2 and out == ""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "nowhere" in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("value", ["-1", "65"])
def test_check_a_threshold_out_of_range_exits_2(capsys, value):
    code, _, err = run_cli(["check", demo_data_path(), "--near-threshold", value], capsys)
    assert code == 2 and "near-threshold" in err


def test_check_defaults_to_the_measured_threshold(capsys):
    code, out, _ = run_cli(["check", demo_data_path(), "--json"], capsys)
    assert code == 1  # the sample's two duplicate pairs
    assert json.loads(out)["summary"]["near_duplicates"]["threshold"] == NEAR_THRESHOLD


def test_check_help_has_an_example(capsys):
    code, out, _ = run_cli(["check", "--help"], capsys)
    assert code == 0 and "Example" in out and "medtl check" in out


def test_check_human_output_has_table_messages_and_patients(capsys):
    code, out, _ = run_cli(["check", demo_data_path(), "--patient-regex", DEMO_PATIENT_REGEX,
                            "--quiet"], capsys)
    assert code == 1
    assert "duplicate_within_split" in out and "person134_bacteria_643.jpeg" in out
    assert "images per patient" in out and "210" in out
    assert "1 kind(s) of problem found" in out


def test_info_shows_the_patient_structure(capsys):
    code, out, _ = run_cli(["info", demo_data_path(), "--patient-regex", DEMO_PATIENT_REGEX,
                            "--quiet"], capsys)
    assert code == 0 and "images per patient" in out
    code, out, _ = run_cli(["info", demo_data_path(), "--patient-regex", DEMO_PATIENT_REGEX,
                            "--json", "--quiet"], capsys)
    structure = json.loads(out)["patient_structure"]
    # info carves validation from train by patient, so train and val share no patient.
    assert set(structure) == {"train", "val", "test"} and structure["test"]["patients"] == 79
