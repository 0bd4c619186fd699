"""``--paths``: what a run writes names the data relative to its root (default), by salted
pseudonym, or absolutely; no absolute path of the user's folders reaches a relative run
(issue 15, acceptance 8)."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest

from medtl.cli import main
from medtl.data.privacy import PathDisplay, recorded_data_path, recorded_source
from medtl.errors import MedtlError

from .conftest import write_blob_images
from .scan import files_under, occurrences

HASHED = re.compile(r"ph-[0-9a-f]{16}\.png")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cli(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out + out.err


# ------------------------------------------------------------------------------------- units
def test_each_mode_shows_a_path_as_it_says(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_SALT", "s" * 40)
    root = tmp_path / "data"
    image = root / "test" / "sick" / "Doe_John 1.dcm"
    assert PathDisplay.for_source("relative", root).show(image) == "test/sick/Doe_John 1.dcm"
    assert PathDisplay.for_source("absolute", root).show(str(image)) == str(image)
    hashed = PathDisplay.for_source("hashed", root)
    shown = hashed.show(image)
    assert re.fullmatch(r"ph-[0-9a-f]{16}\.dcm", shown) and "Doe" not in shown
    # Hashed from the path below the root: the same data moved elsewhere keeps its names.
    assert PathDisplay.for_source("hashed", tmp_path / "moved").show(
        tmp_path / "moved" / "test" / "sick" / "Doe_John 1.dcm") == shown
    # Salted: another salt, another name.
    monkeypatch.setenv("MEDTL_SALT", "t" * 40)
    assert PathDisplay.for_source("hashed", root).show(image) != shown
    # A file outside the root (a manifest's absolute row) is not shown with its folders.
    outside = PathDisplay.for_source("relative", root / "list.csv").show("/srv/pacs/Doe/x.png")
    assert re.fullmatch(r"ph-[0-9a-f]{16}\.png", outside)
    # predict/explain: a folder given is the root; a file given is shown by its name.
    inputs = PathDisplay.for_inputs("relative", [root / "test", image])
    assert inputs.show(root / "test" / "well" / "a.png") == "well/a.png"
    assert inputs.show(image) == "Doe_John 1.dcm"
    with pytest.raises(MedtlError, match="--paths"):
        PathDisplay("relative-ish")


def test_log_lines_are_rewritten_and_only_at_path_boundaries(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_SALT", "s" * 40)
    root = tmp_path / "data"
    bad = root / "train" / "a" / "broken scan.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"x")
    run = tmp_path / "run"
    aliases = {run: "run"}
    line = (f"data {root}: 3 images; skipped {bad}: not an image; {root}2/x stays; "
            f"model in {run}/model")
    relative = PathDisplay.for_source("relative", root, aliases=aliases).scrub(line)
    assert relative == ("data data: 3 images; skipped train/a/broken scan.png: not an image; "
                        f"{root}2/x stays; model in run/model")
    hashed = PathDisplay.for_source("hashed", root, aliases=aliases)
    text = hashed.scrub(line)
    # The longest existing path is taken whole, spaces and all.
    assert f"skipped {hashed.show(bad)}: not an image" in text
    assert "broken" not in text and f"{root}/" not in text and "data data" not in text
    assert PathDisplay.for_source("absolute", root, aliases=aliases).scrub(line) == line
    # The last guard on a run's JSON files: every string, keys and nested lists included.
    tree = PathDisplay.for_source("relative", root).scrub_tree(
        {"skipped": [f"{bad}: x", 1, None], str(bad): {"n": (f"{root}", 2.5)}})
    assert tree == {"skipped": ["train/a/broken scan.png: x", 1, None],
                    "train/a/broken scan.png": {"n": ["data", 2.5]}}


def test_the_recorded_source_is_relative_to_the_run_or_only_a_name(tmp_path):
    data, run = tmp_path / "data", tmp_path / "runs" / "r"
    data.mkdir()
    rec = recorded_source("relative", data, run)
    assert rec == {"source": "../../data", "source_relative_to": "run", "paths": "relative"}
    assert recorded_data_path(rec, run) == os.path.realpath(data)
    # Sharing only the file-system root, the relative path would spell the absolute one.
    alone = recorded_source("relative", data, "/medtl-no-such-root/run")
    assert alone["source"] == "data" and recorded_data_path(alone, run) is None
    hashed = recorded_source("hashed", data, run)
    assert str(tmp_path) not in json.dumps(hashed) and recorded_data_path(hashed, run) is None
    absolute = recorded_source("absolute", data, run)
    assert recorded_data_path(absolute, run) == os.path.realpath(data)
    # A run written before --paths recorded the absolute path, without the new keys.
    assert recorded_data_path({"source": "/x/data"}, run) == "/x/data"


# ------------------------------------------------------------------------------ acceptance 8
@pytest.fixture(scope="module")
def relative_run(tmp_path_factory):
    """A run with the default --paths on data in a temporary folder, with an unreadable file
    (its name goes to the skipped list and the log) and --out given absolute."""
    tmp = tmp_path_factory.mktemp("paths")
    data = write_blob_images(tmp / "data", n_per_class=8)
    (data / "train" / "bar" / "broken.png").write_bytes(b"not a png")
    out = tmp / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(data), "--strategy", "hybrid", "--image-size", "32", "--skip-bad",
              "--out", str(out), "--quiet"])
    assert exit_.value.code in (0, None)
    return tmp, data, out


def test_no_absolute_path_reaches_a_relative_run(relative_run, tmp_path, capsys,
                                                 monkeypatch):
    tmp, data, out = relative_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["paths"] == "relative" and cfg["data"]["source"] == "../data"
    assert cfg["data"]["skipped"] and cfg["data"]["skipped"][0].startswith(
        "train/bar/broken.png: ")
    rows = _rows(out / "predictions.csv")
    assert {r["path"].split("/")[0] for r in rows} == {"train", "test"}
    assert "broken.png" in (out / "log.txt").read_text()  # named, relative

    # evaluate without DATA finds the data from the run, whatever the working directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, text = _cli(["evaluate", out, "--output", tmp_path / "ev.csv", "--skip-bad",
                       "--quiet"], capsys)
    assert code == 0, text
    code, text = _cli(["predict", out, data / "test", data / "train" / "bar" /
                       "p000_train_bar.png", "--output", tmp_path / "pr.csv", "--quiet"],
                      capsys)
    assert code == 0, text
    code, text = _cli(["explain", out, data / "test" / "disc", "--out", tmp_path / "maps",
                       "--quiet"], capsys)
    assert code == 0, text
    predicted = [r["path"] for r in _rows(tmp_path / "pr.csv")]
    assert "p000_train_bar.png" in predicted and "disc/p000_test_disc.png" in predicted

    written = files_under(out, tmp_path / "ev.csv", tmp_path / "pr.csv", tmp_path / "maps")
    names = {f.name for f in written}
    assert {"config.json", "metrics.json", "predictions.csv", "log.txt", "report.html",
            "model.json", "explanations.csv"} <= names, names
    assert any(n.endswith(".npy") for n in names) and any(n.endswith(".safetensors")
                                                        for n in names)
    folders = {str(tmp), os.path.realpath(tmp), str(tmp_path), os.path.realpath(tmp_path)}
    assert occurrences(written, folders) == []


def test_hashed_and_absolute_runs(relative_run, tmp_path, capsys):
    _, data, _ = relative_run
    out = tmp_path / "hashed"
    code, text = _cli(["train", data, "--strategy", "hybrid", "--image-size", "32",
                       "--skip-bad", "--paths", "hashed", "--out", out, "--quiet"], capsys)
    assert code == 0, text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["paths"] == "hashed" and cfg["data"]["source_relative_to"] is None
    saved = {r["path"] for r in _rows(out / "predictions.csv")}
    assert all(HASHED.fullmatch(p) for p in saved)
    # No file name of the data is written anywhere (the log included).
    names = [p.stem for p in data.rglob("*.png")]
    assert occurrences(files_under(out), [*names, str(data)]) == []
    # The run does not know where its data is: evaluate asks for it, and then names the
    # images by the same pseudonyms.
    code, text = _cli(["evaluate", out, "--quiet"], capsys)
    assert code == 2 and "pass DATA" in text and "Traceback" not in text
    code, text = _cli(["evaluate", out, data, "--paths", "hashed", "--output",
                       tmp_path / "ev.csv", "--skip-bad", "--quiet"], capsys)
    assert code == 0, text
    again = {r["path"] for r in _rows(tmp_path / "ev.csv")}
    assert again and again <= saved
    code, text = _cli(["evaluate", out, data, "--paths", "absolute", "--output",
                       tmp_path / "abs.csv", "--skip-bad", "--quiet"], capsys)
    assert code == 0, text
    rows = _rows(tmp_path / "abs.csv")
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in rows)
    code, text = _cli(["explain", out, data / "test" / "disc", "--paths", "hashed", "--out",
                       tmp_path / "maps", "--quiet"], capsys)
    assert code == 0, text
    maps = files_under(tmp_path / "maps")
    assert {f.suffix for f in maps} == {".png", ".npy", ".csv", ".txt"}
    assert all(re.fullmatch(r"ph-[0-9a-f]{16}", f.stem) for f in maps if f.suffix in (".png",
                                                                                   ".npy"))
    assert occurrences(maps, [*names, str(data)]) == []
    code, text = _cli(["predict", out, data / "test", "--paths", "nowhere"], capsys)
    assert code == 2 and "--paths" in text
