"""Issue 15's first guards: values read from a run are bounded, damaged cache chunks are
skipped, and error messages reach the terminal as text."""

from __future__ import annotations

import numpy as np
import pytest

from medtl.data.transforms import Preprocessing
from medtl.errors import MedtlError

GOOD = {"size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "resize": "squash", "interpolation": "bilinear", "channels": 3}


def test_preprocessing_read_from_a_run_is_checked():
    assert Preprocessing.from_dict(GOOD).size == 64
    assert Preprocessing.from_dict(GOOD).key() == Preprocessing(
        64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).key()
    for bad, why in [({"size": 100000}, "size 100000"), ({"size": 2}, "size 2"),
                     ({"interpolation": "lanczos9"}, "interpolation"),
                     ({"std": [0.2, 0.0, 0.2]}, "std positive"), ({"mean": [0.5]}, "three"),
                     ({"channels": 4}, "channels 4"), ({"size": "big"}, "not a medtl")]:
        with pytest.raises(MedtlError, match=why):
            Preprocessing.from_dict({**GOOD, **bad})


def test_an_image_size_out_of_bounds_is_refused_before_any_work():
    import medtl

    with pytest.raises(MedtlError, match="--image-size 100000"):
        medtl.TransferClassifier(image_size=100000).make_strategy()


def test_a_truncated_foreign_or_empty_cache_chunk_is_quarantined(tmp_path, caplog):
    from medtl.training.features import FeatureStore

    store = FeatureStore(tmp_path, dim=4)
    store.add(["a", "b"], np.ones((2, 4), np.float32))
    chunks = {}
    for key, damage in [("c", lambda b: b[:40]), ("d", lambda b: b""),
                        ("e", lambda b: b"PK\x03\x04 not a zip")]:
        store.add([key], np.ones((1, 4), np.float32))
        chunks[key] = tmp_path / store._where[key]
        chunks[key].write_bytes(damage(chunks[key].read_bytes()))
    store.add(["f"], np.ones((1, 3), np.float32))  # another feature size: foreign here
    again = FeatureStore(tmp_path, dim=4)
    assert sorted(again.get_many(["a", "b", "c", "d", "e", "f"])) == ["a", "b"]
    moved = sorted(p.name for p in (tmp_path / "quarantine").iterdir())
    assert len(moved) == 4 and {c.name for c in chunks.values()} < set(moved)
    assert caplog.text.count("is damaged") == 4 and "c" not in again
    assert not list(tmp_path.glob("*.tmp"))  # the atomic writer leaves no temp behind


def test_an_error_message_is_printed_as_text_not_markup(tmp_path, capsys):
    from medtl.cli import main

    bad = tmp_path / "scan[left]" / "x\x1b[31m"
    with pytest.raises(SystemExit) as exc:
        main(["info", str(bad)])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "scan[left]" in err and "\x1b[31m" not in err and "\\x1b" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_salt_appears_whole_and_the_first_creator_wins(tmp_path, monkeypatch):
    from medtl.data import privacy
    from medtl.files import atomic_create

    monkeypatch.delenv("MEDTL_SALT", raising=False)
    monkeypatch.setenv("MEDTL_CACHE_DIR", str(tmp_path / "cache"))
    first = privacy.salt()
    assert len(first) == 64 and privacy.salt() == first
    assert (tmp_path / "cache" / "salt").stat().st_mode & 0o777 == 0o600
    assert atomic_create(tmp_path / "cache" / "salt", b"x" * 64) is False  # no replacing
    assert privacy.salt() == first and not list((tmp_path / "cache").glob(".*tmp"))
    (tmp_path / "cache" / "salt").write_bytes(b"")  # damaged: never hash without a salt
    with pytest.raises(MedtlError, match="salt is damaged"):
        privacy.salt()


def test_the_cache_follows_xdg_cache_home(tmp_path, monkeypatch):
    from medtl.files import cache_root

    monkeypatch.delenv("MEDTL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "medtl"


@pytest.mark.parametrize("damage", ["child", "cycle", "feature", "knn"])
def test_a_crafted_head_file_with_indices_outside_its_arrays_is_refused(tmp_path, damage):
    """skops does not check a tree's node indices and scikit-learn's compiled predict follows
    them without bounds checks: a head file is checked before anything predicts with it."""
    import skops.io as sio
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    from medtl.transfer.heads import SklearnHead

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    y = (x[:, 0] > 0).astype(int)
    if damage == "knn":
        est = make_pipeline(Normalizer(), KNeighborsClassifier(5)).fit(x, y)
        path = tmp_path / "knn.skops"
        path.write_bytes(sio.dumps(est))
        assert SklearnHead.load(path, "knn").predict_proba(x).shape == (40, 2)
        est.steps[-1][1]._tree.get_arrays()[1][0] = 10**6
    else:
        est = RandomForestClassifier(n_estimators=3, random_state=0).fit(x, y)
        path = tmp_path / "rf.skops"
        path.write_bytes(sio.dumps(est))
        assert SklearnHead.load(path, "rf").predict_proba(x).shape == (40, 2)
        tree = est.estimators_[1].tree_
        inner = int(np.flatnonzero(tree.children_left != -1)[0])
        if damage == "child":
            tree.children_left[inner] = 10**6
        elif damage == "cycle":  # in range, but pointing at itself: predict would never stop
            deeper = int(np.flatnonzero(tree.children_left != -1)[1])
            tree.children_right[deeper] = deeper
        else:
            tree.feature[inner] = 99
    path.write_bytes(sio.dumps(est))
    with pytest.raises(MedtlError, match="not a head medtl wrote"):
        SklearnHead.load(path, "rf" if damage != "knn" else "knn")


def test_a_head_file_may_hold_only_the_types_its_kind_needs(tmp_path):
    """Trees are trusted for forest heads only: a logistic-regression head holding one is
    refused before skops builds anything."""
    import skops.io as sio
    from sklearn.ensemble import RandomForestClassifier

    from medtl.transfer.heads import SklearnHead

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    path = tmp_path / "head.skops"
    path.write_bytes(sio.dumps(RandomForestClassifier(n_estimators=2).fit(x, x[:, 0] > 0)))
    assert SklearnHead.load(path, "rf").predict_proba(x).shape == (40, 2)
    with pytest.raises(MedtlError, match="logreg head does not hold.*Tree"):
        SklearnHead.load(path, "logreg")
    path.write_bytes(b"not a zip")
    with pytest.raises(MedtlError, match="not a head file"):
        SklearnHead.load(path, "logreg")


def _latin1_named_data(root):
    """The blob dataset with one test image renamed to Latin-1 bytes (a Windows zip's
    b'caf\\xe9[1].png'), or a skip where the file system refuses such a name."""
    import os

    from .conftest import write_blob_images

    data = write_blob_images(root, n_per_class=6, size=32)
    src = next((data / "test" / "disc").iterdir())
    try:
        os.rename(os.fsencode(src), os.fsencode(src.parent) + b"/caf\xe9[1].png")
    except OSError as exc:  # macOS and some mounts refuse names that are not UTF-8
        pytest.skip(f"the file system refuses a non-UTF-8 name ({exc})")
    return data, os.fsdecode(os.fsencode(src.parent) + b"/caf\xe9[1].png")


def test_a_file_name_that_is_not_utf8_is_written_escaped_everywhere(tmp_path, capsys,
                                                                     monkeypatch):
    """Training, predicting, evaluating, explaining and reporting over a file whose name is not
    UTF-8 all finish, and every file written names it the one way: caf\\xe9[1].png."""
    from medtl.cli import main

    data, latin = _latin1_named_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    fast = ["--weights", "random", "--image-size", "32", "-q"]
    commands = [["train", str(data), "--strategy", "hybrid", "--engine", "torch", "--out", "run",
                 *fast],
                ["predict", "run", latin, "--output", "p.csv", "-q"],
                ["predict", "run", latin, "-q"],
                ["evaluate", "run", str(data), "--output", "e.csv", "-q"],
                ["explain", "run", latin, "--out", "maps", "-q"],
                ["report", "run", "run", "--out", "r.html"]]
    for argv in commands:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code in (0, None), (argv, capsys.readouterr())
    shown = capsys.readouterr().out
    assert "caf\\xe9[1].png" in shown  # the predict table: escaped, brackets kept
    written = [p for p in tmp_path.rglob("*") if p.suffix in (".csv", ".json", ".txt", ".html")
               and "data" not in p.parts]
    texts = {p.name: p.read_text(encoding="utf-8") for p in written}  # all valid UTF-8
    for name in ("predictions.csv", "p.csv", "e.csv", "explanations.csv", "report.html"):
        assert "caf\\xe9[1].png" in texts[name], name
    assert not any("\\udce9" in t or "\udce9" in t for t in texts.values())


def test_text_that_utf8_cannot_hold_is_escaped_in_json_csv_and_logs(tmp_path):
    import json

    from medtl.console import log, printable, run_logging
    from medtl.files import escape_undecodable, write_csv, write_json

    name = "caf\udce9\ud800.png"
    assert escape_undecodable(name) == "caf\\xe9\\ud800.png"
    assert escape_undecodable("café 😀") == "café 😀"  # valid text is left alone
    write_json(tmp_path / "a.json", {"path": name, name: [name], "ok": "😀"})
    assert json.loads((tmp_path / "a.json").read_text("utf-8")) == {
        "path": "caf\\xe9\\ud800.png", "caf\\xe9\\ud800.png": ["caf\\xe9\\ud800.png"], "ok": "😀"}
    write_csv(tmp_path / "a.csv", [{"path": name, "p": 0.5}])
    assert (tmp_path / "a.csv").read_text("utf-8") == "path,p\ncaf\\xe9\\ud800.png,0.5\n"
    with run_logging(tmp_path, quiet=True):
        log.info("skipped %s", name)

    assert "skipped caf\\xe9\\ud800.png" in (tmp_path / "log.txt").read_text("utf-8")
    assert printable("a\x1b[31m\u202eb\udce9\n", keep="\n") == "a\\x1b[31m\\u202eb\\xe9\n"
