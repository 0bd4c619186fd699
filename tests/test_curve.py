"""medtl curve: budgets drawn by patient, nested, validation from the budget; every cell scored
on the same test split; interrupted curves resume; crossings read off paired differences."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medtl import curve as curve_module
from medtl.cli import main
from medtl.curve import ALL, crossings, curve, draw_budgets, parse_sizes
from medtl.errors import MedtlError
from tests.conftest import write_blob_images


def _patients(rng, n_patients: int):
    """Patients of one class each, 1-4 images, class 1 about a third of them."""
    labels, patients = [], []
    for p in range(n_patients):
        cls = int(p % 3 == 0)
        for _ in range(rng.integers(1, 5)):
            labels.append(cls)
            patients.append(f"pt-{p:03d}")
    return np.array(labels), patients


def test_budgets_are_drawn_by_patient_nested_and_split_by_patient():
    labels, patients = _patients(np.random.default_rng(0), 120)
    sizes = parse_sizes("10,25,50,all")
    assert sizes == [10, 25, 50, ALL]
    draws = {r: draw_budgets(labels, patients, sizes, seed=r) for r in range(3)}
    for by_size in draws.values():
        previous: set[str] = set()
        for size, split in by_size.items():
            train = {patients[i] for i in split["train"]}
            val = {patients[i] for i in split["val"]}
            assert train and val and not train & val  # no patient on both sides
            both = np.concatenate([split["train"], split["val"]])
            assert len(set(both.tolist())) == len(both)
            counts = np.bincount(labels[both], minlength=2)
            if size == ALL:
                assert len(both) == len(labels)
            else:
                # whole patients until the budget is met: at most one patient's images over
                assert (counts >= size).all() and (counts < size + 4).all()
                assert set(np.bincount(labels[split["val"]], minlength=2)) != {0}
            assert previous <= train | val  # nested: a larger budget keeps the smaller's
            previous = train | val
    assert ({patients[i] for i in draws[0][10]["train"]}
            != {patients[i] for i in draws[1][10]["train"]})  # repeats draw anew


def test_bad_budgets_are_one_line_errors():
    with pytest.raises(MedtlError, match="'x' is not a number"):
        parse_sizes("10,x")
    with pytest.raises(MedtlError, match="too few"):
        parse_sizes("1,all")


def test_a_crossing_is_where_the_paired_mean_difference_turns_positive():
    aucs = {"frozen": [0.80, 0.84, 0.86], "full": [0.70, 0.83, 0.90]}
    noise = [0.0, 0.01, -0.01]
    cells = [{"strategy": s, "size": n, "repeat": r, "test_auc": aucs[s][i] + noise[r]}
             for s in aucs for i, n in enumerate(["10", "50", "all"]) for r in range(3)]
    rows = crossings(cells, ["frozen", "full"], ["10", "50", "all"])
    assert [(c["overtakes"], c["overtaken"], c["from_size"], c["at_size"]) for c in rows] == [
        ("full", "frozen", "50", "all")]
    assert rows[0]["auc_difference"] == pytest.approx(0.04)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blob_images(tmp_path_factory.mktemp("curve") / "blobs", n_per_class=10,
                             size=40)


FAST = dict(backbone="mobilenet_v2", image_size=32, epochs=2)


def test_curve_scores_every_cell_on_the_whole_test_split_and_resumes(blobs, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "curve"
    curve(blobs, out=out, sizes="3,all", strategies=["hybrid:prototype", "feature-extractor"],
          repeats=2, quiet=True, **FAST)
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == 2 * 2 * 2
    with open(out / "curve.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    small = [r for r in rows if r["size"] == "3"]
    # 3 per class in train + val; never a test image among them
    assert all(int(r["n_train"]) + int(r["n_val"]) == 6 for r in small)
    assert all(int(r["n_train"]) + int(r["n_val"]) == 20 for r in rows if r["size"] == "all")
    assert all(int(r["n_test"]) == 20 and 0.0 <= float(r["test_auc"]) <= 1.0 for r in rows)
    for path in cells:
        cell = json.loads(path.read_text())
        want = {"bar": 3, "disc": 3} if cell["size"] == "3" else {"bar": 10, "disc": 10}
        assert cell["labelled_per_class"] == want
    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [(r["strategy"], r["size"], r["repeats"]) for r in summary] == [
        ("hybrid:prototype", "3", "2"), ("hybrid:prototype", "all", "2"),
        ("feature-extractor", "3", "2"), ("feature-extractor", "all", "2")]
    assert "data:image/png;base64" in (out / "report.html").read_text()

    def refit(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(curve_module, "_fit_cell", refit)
    cells[0].unlink()
    with pytest.raises(AssertionError, match="trained again"):
        curve(blobs, out=out, sizes="3,all", strategies=["hybrid:prototype",
                                                         "feature-extractor"],
              repeats=2, quiet=True, **FAST)


def test_cli_curve_errors_are_one_line(blobs, tmp_path, capsys):
    for args, words in (
        ([blobs, "--sizes", "0"], "too few"),
        ([blobs, "--strategies", "hybrid:nope"], "nope"),
        ([blobs / "train", "--sizes", "5"], "no test split"),  # class folders, no splits
    ):
        with pytest.raises(SystemExit) as exc:
            main(["curve", *map(str, args), "--out", str(tmp_path / "c"), "--quiet"])
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert exc.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert words in lines[0], lines[0]


def test_epochs_bound_the_trained_networks_only():
    from medtl.curve import _strategy_options

    assert _strategy_options("fine-tune", 5) == {"strategy": "fine-tune", "epochs": 5}
    # a frozen head's epochs are cheap: 5 would leave the linear head half-trained
    assert _strategy_options("feature-extractor", 5) == {"strategy": "feature-extractor"}
    assert _strategy_options("hybrid:prototype", 5) == {"strategy": "hybrid", "head": "prototype"}
