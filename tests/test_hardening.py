"""Issue 15's first guards: values read from a run are bounded, damaged cache chunks are
skipped, and error messages reach the terminal as text."""

from __future__ import annotations

import io

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
                     ({"std": [0.2, 0.0, 0.2]}, "std in"), ({"mean": [0.5]}, "three"),
                     ({"mean": [0.5, float("nan"), 0.5]}, "finite"),
                     ({"std": [0.2, float("inf"), 0.2]}, "finite"),
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
    import csv
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
    write_csv(tmp_path / "b.csv", [{"path": "a\rb.png", "p": 0.5}, {"path": "c.png", "p": 1.0}])
    with open(tmp_path / "b.csv", newline="", encoding="utf-8") as f:  # a lone CR stays inside
        assert [r["path"] for r in csv.DictReader(f)] == ["a\rb.png", "c.png"]
    with run_logging(tmp_path, quiet=True):
        log.info("skipped %s", name)

    assert "skipped caf\\xe9\\ud800.png" in (tmp_path / "log.txt").read_text("utf-8")
    assert printable("a\x1b[31m\u202eb\udce9\n", keep="\n") == "a\\x1b[31m\\u202eb\\xe9\n"


def _npz_with_header(path, shape, dtype="|u1", payload=b""):
    """An .npz whose train_images .npy header declares ``shape`` but holds only ``payload``:
    what a compression bomb looks like before it is decompressed."""
    import zipfile

    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + payload
    labels = io.BytesIO()
    np.save(labels, np.zeros(4, np.int64))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train_images.npy", npy)
        zf.writestr("train_labels.npy", labels.getvalue())
    return path


def _never_decompress(*args, **kwargs):
    raise AssertionError("an array was decompressed")


def test_an_npz_declaring_more_than_the_budget_is_refused_before_decompressing(tmp_path,
                                                                               monkeypatch):
    from medtl.data import load_dataset, readers

    bomb = _npz_with_header(tmp_path / "bomb.npz", (10**6, 224, 224, 3))  # 150 GB declared
    with monkeypatch.context() as m:
        m.setattr(np.lib.format, "read_array", _never_decompress)
        with pytest.raises(MedtlError, match=r"would take 140\.2 GB .*nothing was decompres"):
            load_dataset(bomb)
    monkeypatch.setenv(readers.NPZ_MAX_GB_ENV, "0.000001")  # about 1 kB
    small = tmp_path / "small.npz"
    np.savez_compressed(small, train_images=np.zeros((4, 32, 32), np.uint8),
                        train_labels=np.array([0, 0, 1, 1]))  # 4 kB once decompressed
    with pytest.raises(MedtlError, match="more than the 0.0 GB"):
        load_dataset(small)
    monkeypatch.delenv(readers.NPZ_MAX_GB_ENV)
    assert len(load_dataset(small, val_fraction=0).records) == 4
    # A header that lies the other way (less data than declared) is a clean error too.
    short = _npz_with_header(tmp_path / "short.npz", (4, 8, 8), payload=b"\0" * 10)
    with pytest.raises(MedtlError, match="cannot read .npz"):
        load_dataset(short)
    pickled = _npz_with_header(tmp_path / "pickled.npz", (4,), dtype="|O")
    with pytest.raises(MedtlError, match="Python objects"):
        load_dataset(pickled)


@pytest.mark.parametrize("labels, why", [
    ([0, 0, 1, 10**10], "holds the label 10000000000"),
    ([0.0, 0.0, 1.0, float("inf")], "holds the label inf"),
    ([0, 0, 5000, 5000], r"4999 of them have no image \(the first: 1\)"),
])
def test_npz_labels_are_class_numbers_below_a_cap_without_gaps(tmp_path, labels, why):
    from medtl.data import load_dataset

    path = tmp_path / "d.npz"
    np.savez(path, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.array(labels))
    with pytest.raises(MedtlError, match=why):
        load_dataset(path, val_fraction=0)


# ------------------------------------------------------------------ values read from a run
def test_read_json_takes_only_a_small_regular_file(tmp_path):
    import os

    from medtl.files import read_json

    good = tmp_path / "m.json"
    good.write_text('{"a": [1, NaN]}')
    assert read_json(good)["a"][0] == 1
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.json")  # with no writer: a blocking open would hang here
    (tmp_path / "dir.json").mkdir()
    for name in ("zero.json", "fifo.json", "dir.json"):
        with pytest.raises(MedtlError, match=f"{name}: not a regular file"):
            read_json(tmp_path / name)
    (tmp_path / "big.json").write_text("[" + "0," * 600 + "0]")
    with pytest.raises(MedtlError, match="1203 bytes, more than the 1000"):
        read_json(tmp_path / "big.json", max_bytes=1000)
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "latin.json").write_bytes(b'{"caf\xe9": 1}')
    for name in ("deep.json", "latin.json"):
        with pytest.raises(MedtlError, match=f"{name}: not valid JSON"):
            read_json(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


MODEL_META = {
    "format": 2, "kind": "frozen", "classes": ["bar", "disc"], "num_classes": 2,
    "params": {"backbone": "mobilenet_v2", "strategy": "hybrid", "head": "logreg",
               "batch_size": 64, "seed": 0, "lr": 0.001, "in_chans": 3, "hflip": True},
    "preprocessing": GOOD, "feature_dim": 1280, "head_params": {"C": 0.01},
    "weights_info": {"kind": "random", "source": "random", "path": None, "sha256": None},
    "temperature": None}


@pytest.mark.parametrize("change, why", [
    ({"format": 3}, "format 3 is newer than this medtl reads .2.; upgrade medtl"),
    ({"format": "2"}, "not a medtl model format"),
    ({"kind": "pickle"}, "unknown model kind"),
    ({"classes": ["bar"]}, "list of 2 to 10000 names"),
    ({"classes": ["bar", "bar"]}, "class names repeat"),
    ({"classes": ["bar", "../x"]}, "path separator"),
    ({"classes": ["bar", ".."]}, "path separator or is '.' or '..'"),
    ({"classes": ["bar", "a\x00b"]}, "not a short line of text"),
    ({"classes": ["bar", 7]}, "not a short line of text"),
    ({"num_classes": 3}, "num_classes 3 differs"),
    ({"feature_dim": 10**9}, "feature_dim 1000000000: not an integer"),
    ({"keep": -1}, "keep -1"),
    ({"trainable_blocks": True}, "trainable_blocks True"),
    ({"temperature": 0}, "temperature 0"),
    ({"temperature": float("nan")}, "temperature nan"),
    ({"temperature": 1e9}, r"temperature 1000000000.0"),
    ({"head_params": {"C": [1] * 10}}, "not a plain value"),
    ({"preprocessing": {**GOOD, "size": 100000}}, "size 100000"),
    ({"weights_info": {"kind": "random", "source": "random", "sha256": "/../../xyz"}},
     "sha256 '/../../xyz' is not 64 lowercase hex"),
    ({"weights_info": {"kind": "random", "source": "random", "sha256": "AB" * 32}},
     "not 64 lowercase hex"),
    ({"weights_info": {"kind": "url", "source": "random"}}, "kind 'url'"),
    ({"weights_info": {"kind": "file", "source": "x\ny"}}, "source"),
])
def test_every_model_json_value_is_checked(change, why):
    from medtl.transfer.meta import check_model_meta

    assert check_model_meta(MODEL_META, "m.json")["weights_info"].kind == "random"
    with pytest.raises(MedtlError, match=f"m.json: .*{why}"):
        check_model_meta({**MODEL_META, **change}, "m.json")


@pytest.mark.parametrize("change, why", [
    ({"batch_size": 0}, "batch_size 0"), ({"seed": -1}, "seed -1"), ({"seed": 2**40}, "seed"),
    ({"lr": float("inf")}, "lr inf"), ({"in_chans": 4}, "in_chans 4"),
    ({"hflip": "yes"}, "hflip 'yes'"), ({"engine": "gpu"}, "engine 'gpu'"),
    ({"backbone": "../../x"}, "unknown backbone '../../x'"), ({"image_size": 100000}, "100000"),
    ({"augment": "x" * 300}, "not a short line"), ({"epochs": 1.5}, "epochs 1.5"),
])
def test_the_options_a_model_json_records_are_checked(change, why):
    from medtl.transfer.meta import options_from_meta

    options = options_from_meta({**MODEL_META["params"], "device": "cuda"}, "m.json",
                                device="cpu")
    assert options.device == "cpu" and options.batch_size == 64  # the caller's device
    with pytest.raises(MedtlError, match=f"m.json: .*{why}"):
        options_from_meta({**MODEL_META["params"], **change}, "m.json")


CONFIG = {"format": 2, "kind": "single", "backbone": "mobilenet_v2", "strategy": "hybrid",
          "head": "logreg", "weights": {"kind": "random", "sha256": None}, "seed": 0,
          "classes": ["bar", "disc"], "positive_class": "disc", "medtl_version": "0.2",
          "preprocessing": GOOD, "view": {"window": "auto", "slices": "middle", "mode": "2d"},
          "data": {"source": "/data", "patient_regex": r"(p\d+)", "val_fraction": 0.2}}


@pytest.mark.parametrize("change, why", [
    ({"positive_class": "healthy"}, "positive_class 'healthy' is not a class"),
    ({"classes": ["a/b", "c"], "positive_class": None}, "path separator"),
    ({"view": {"window": "auto", "evil": "1"}}, "view is not a mapping of window"),
    ({"view": {"mode": "4d"}}, "unknown mode '4d'"),
    ({"seed": "0"}, "seed '0'"),
    ({"weights": {"sha256": "/../../../../xyz"}}, "not 64 lowercase hex"),
    ({"preprocessing": {**GOOD, "interpolation": "bogus"}}, "interpolation 'bogus'"),
    ({"data": {"val_fraction": 1.5}}, "val_fraction 1.5"),
    ({"data": {"patient_regex": "(" * 2000}}, "not a short line of text"),
    ({"data": {"patient_regex": "(p"}}, "invalid patient regex"),
    ({"data": {"patient_regex": r"^(\w|\w)+(?=x)"}}, "backtracks catastrophically"),
    ({"data": {"source": "a\x00b"}}, "data source"),
    ({"target_sensitivity": 2}, "target_sensitivity 2"),
])
def test_every_config_json_value_medtl_uses_is_checked(change, why):
    from medtl.run import check_config

    assert check_config(dict(CONFIG), source="c.json") == CONFIG
    with pytest.raises(MedtlError, match=f"c.json: .*{why}"):
        check_config({**CONFIG, **change}, source="c.json")


@pytest.mark.parametrize("metrics, why", [
    ([], "not a medtl metrics file"), ({"test": [1]}, "test figures are not a mapping"),
    ({"thresholds": {"youden": "0.5"}}, "threshold youden '0.5'"),
    ({"thresholds": {"sensitivity_target": float("nan")}}, "threshold sensitivity_target nan"),
    ({"positive_class": 3}, "positive_class is not a class name"),
])
def test_metrics_json_is_checked_where_medtl_reads_it_back(metrics, why):
    from medtl.run import check_metrics

    good = {"test": {"auc": 0.9}, "thresholds": {"youden": 0.4, "sensitivity_target": 0.1}}
    assert check_metrics(good) == good
    with pytest.raises(MedtlError, match=why):
        check_metrics(metrics, source="m.json")


def test_a_patient_regex_search_stops_at_its_timeout(monkeypatch):
    """A pattern that passes the probes but backtracks on some file name: the search of that
    name stops (the timeout) and the pattern is named; ``re`` would run for hours."""
    import regex

    from medtl.data import splits

    monkeypatch.setattr(splits, "MATCH_TIMEOUT", 0.2)
    slow = regex.compile(r"^(\w|\w)+(?=x)")  # compiled already: the probes are not run
    assert splits.patient_from_name("p12_scan.png", regex.compile(r"(p\d+)")) == "p12"
    with pytest.raises(MedtlError, match=r"took more than 0.2 s on the file name"):
        splits.patient_from_name("person1946_bacteria_4874.jpeg", slow)
    with pytest.raises(MedtlError, match="1001 characters, more than the 1000"):
        splits.compile_patient_regex("a" * 1001)
