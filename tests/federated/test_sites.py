"""The sites of a simulated federation: names, and one manifest's site column."""

from __future__ import annotations

import csv

import pytest

from medtl.errors import MedtlError
from medtl.federated.sites import has_site_column, site_names, split_by_site


def test_site_names_are_the_sources_names_made_unique(tmp_path):
    assert site_names(["/a/hospital a.csv", "/b/hospital a.csv", "/c/north"]) == [
        "hospital_a", "hospital_a_2", "north"]


def test_a_manifest_with_a_site_column_becomes_one_manifest_per_site(tmp_path):
    (tmp_path / "img").mkdir()
    rows = [("img/1.png", "NORMAL", "p1", "train", "North"),
            ("img/2.png", "PNEUMONIA", "p2", "test", "South"),
            ("img/3.png", "NORMAL", "p3", "val", "North")]
    manifest = tmp_path / "all.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "split", "Site"])
        w.writerows(rows)
    assert has_site_column(manifest) and not has_site_column(tmp_path / "img")
    north, south = split_by_site(manifest, tmp_path / "sites")
    assert (north.name, south.name) == ("North.csv", "South.csv")
    with open(north) as f:
        got = list(csv.DictReader(f))
    assert [r["path"] for r in got] == [str(tmp_path / "img/1.png"), str(tmp_path / "img/3.png")]
    assert got[0] == {"path": str(tmp_path / "img/1.png"), "label": "NORMAL",
                      "patient_id": "p1", "split": "train"}  # no site column left


def test_a_row_without_a_site_is_named(tmp_path):
    manifest = tmp_path / "all.csv"
    manifest.write_text("path,label,site\na.png,x,A\nb.png,y,\n")
    with pytest.raises(MedtlError, match="line 3: empty site"):
        split_by_site(manifest, tmp_path / "sites")
