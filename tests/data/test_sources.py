from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medtl.data import Dataset, load_dataset
from medtl.data.privacy import pseudonym
from medtl.errors import DataReadError, MedtlError


def write_manifest(path: Path, rows: list[dict[str, str]], header: list[str] | None = None) -> Path:
    header = header or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def one_line_error(exc: pytest.ExceptionInfo[MedtlError], *parts: str) -> str:
    message = str(exc.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# ---- each DATA form --------------------------------------------------------------------------


def test_plain_class_folder(tree) -> None:
    root = tree({"B": [f"b{i}.png" for i in range(10)], "A": [f"a{i}.png" for i in range(20)]})
    ds = load_dataset(root)
    assert ds.classes == ["A", "B"]
    assert len(ds) == 30 and ds.source == str(root)
    assert ds.split_names() == ["train", "val"]  # no test split is invented
    counts = ds.counts()
    assert counts["val"] == {"A": 4, "B": 2} and counts["train"] == {"A": 16, "B": 8}
    assert all(Path(r.path).is_absolute() for r in ds.records)
    assert ds.labels.dtype == np.int64
    assert ds.read(0).shape == (8, 8, 3)


def test_split_folders_union_of_classes(tree) -> None:
    root = tree(
        {
            "train/cat": [f"c{i}.png" for i in range(5)],
            "train/dog": [f"d{i}.png" for i in range(5)],
            "train/eel": [f"e{i}.png" for i in range(5)],
            "test/dog": ["td0.png", "td1.png"],
            "test/cat": ["tc0.png"],
        }
    )
    ds = load_dataset(root, val_fraction=0.2)
    assert ds.classes == ["cat", "dog", "eel"]
    assert ds.split_names() == ["train", "val", "test"]
    assert ds.counts()["test"] == {"cat": 1, "dog": 2, "eel": 0}
    assert sum(ds.counts()["val"].values()) == 3
    # the carved val comes from train only; test is untouched
    assert all("/test/" in r.path for r in ds.records if r.split == "test")
    assert all("/train/" in r.path for r in ds.records if r.split == "val")


def test_given_val_split_is_kept(tree) -> None:
    root = tree(
        {
            "train/a": ["1.png", "2.png", "3.png"],
            "train/b": ["4.png", "5.png", "6.png"],
            "val/a": ["7.png"],
            "val/b": ["8.png"],
            "test/a": ["9.png"],
        }
    )
    ds = load_dataset(root)
    assert ds.counts() == {
        "train": {"a": 3, "b": 3},
        "val": {"a": 1, "b": 1},
        "test": {"a": 1, "b": 0},
    }


def test_hidden_and_non_image_files_ignored_extensions_case_insensitive(tree, image) -> None:
    root = tree({"a": ["1.PNG", "2.png"], "b": ["3.png", "4.png"], ".cache/a": ["x.png"]})
    image(root / "a" / ".hidden.png")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "deep").mkdir()
    image(root / "b" / "deep" / "5.png")  # images in sub-folders of a class folder count
    ds = load_dataset(root, val_fraction=0)
    assert ds.classes == ["a", "b"]
    assert ds.counts() == {"train": {"a": 2, "b": 3}}


def test_val_fraction_zero_carves_nothing(tree) -> None:
    ds = load_dataset(tree({"a": ["1.png", "2.png"], "b": ["3.png", "4.png"]}), val_fraction=0)
    assert ds.split_names() == ["train"]


def test_numeric_class_names_sort_numerically(tree) -> None:
    layout = {str(c): [f"{c}_{i}.png" for i in range(2)] for c in (2, 10, 1)}
    assert load_dataset(tree(layout), val_fraction=0).classes == ["1", "2", "10"]


def test_manifest_relative_absolute_patients_and_splits(tree, tmp_path: Path) -> None:
    root = tree({"imgs": [f"{i}.png" for i in range(8)]})
    rows = [
        {"path": "imgs/0.png", "label": "sick", "patient_id": "p0", "split": "train"},
        {"path": "imgs/1.png", "label": "sick", "patient_id": "p1", "split": "TRAIN"},
        {"path": "imgs/2.png", "label": "well", "patient_id": "p2", "split": ""},
        {"path": str(root / "imgs/3.png"), "label": "well", "patient_id": "p3", "split": ""},
        {"path": "imgs/4.png", "label": "sick", "patient_id": "p4", "split": "val"},
        {"path": "imgs/5.png", "label": "well", "patient_id": "", "split": "val"},
        {"path": "imgs/6.png", "label": "sick", "patient_id": "p6", "split": "test"},
        {"path": "imgs/7.png", "label": "well", "patient_id": "p7", "split": "test"},
    ]
    manifest = write_manifest(root / "list.csv", rows)
    ds = load_dataset(manifest)
    assert ds.classes == ["sick", "well"]
    assert ds.counts() == {
        "train": {"sick": 2, "well": 2},  # empty split -> train; val given, so nothing carved
        "val": {"sick": 1, "well": 1},
        "test": {"sick": 1, "well": 1},
    }
    assert ds.records[3].path == str(root / "imgs/3.png")
    # A manifest's patient ids are record numbers: only their pseudonyms reach the records.
    assert ds.patients == [None if p is None else pseudonym(p)
                           for p in ["p0", "p1", "p2", "p3", "p4", None, "p6", "p7"]]


def test_manifest_header_case_bom_and_minimal_columns(tree) -> None:
    root = tree({"x": ["1.png", "2.png", "3.png", "4.png"]})
    text = "\ufeffPath , LABEL\nx/1.png,a\nx/2.png,a\nx/3.png,b\nx/4.png,b\n"
    (root / "m.csv").write_text(text, encoding="utf-8")
    ds = load_dataset(root / "m.csv", val_fraction=0.5)
    assert ds.classes == ["a", "b"]
    assert ds.counts() == {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}}


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_medmnist_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = save_npz(
        tmp_path / "mini.npz",
        train_images=rng.integers(0, 256, (10, 6, 6), dtype=np.uint8),
        train_labels=np.array([[0], [1], [2]] * 3 + [[0]]),  # (n, 1) as MedMNIST stores them
        test_images=rng.integers(0, 256, (4, 6, 6), dtype=np.uint8),
        test_labels=np.array([0, 1, 2, 2]),
    )
    ds = load_dataset(path)
    assert ds.classes == ["0", "1", "2"]
    assert ds.split_names() == ["train", "val", "test"]
    assert len(ds.split("train")) + len(ds.split("val")) == 10 and len(ds.split("test")) == 4
    assert ds.labels.ndim == 1
    first = ds.records[0]
    assert (first.path, first.key, first.index) == (str(tmp_path / "mini.npz"), "train", 0)
    assert first.label == 0 and first.slice is None and not first.is_volume
    # the identity string is medtl 0.1's path, so keys derived from it stay valid
    assert first.uid == f"{tmp_path / 'mini.npz'}::train/0"
    out = ds.read(0)
    assert out.shape == (6, 6, 3)
    raw = np.load(path)["train_images"][0]
    np.testing.assert_array_equal(out[..., 1], raw)
    # a record moved to the carved val still reads its own train image
    val = ds.split("val")
    assert val.records[0].key == "train"
    index = val.records[0].index
    np.testing.assert_array_equal(val.read(0)[..., 0], np.load(path)["train_images"][index])


def test_npz_colour_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = save_npz(
        tmp_path / "rgb.npz",
        train_images=rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8),
        train_labels=np.array([0, 1, 0, 1]),
    )
    ds = load_dataset(path, val_fraction=0)
    np.testing.assert_array_equal(ds.read(3), np.load(path)["train_images"][3])


def test_real_breastmnist(shared) -> None:
    ds = load_dataset(shared("breastmnist_28_resaved.npz"))
    assert ds.classes == ["0", "1"]
    assert {s: sum(c.values()) for s, c in ds.counts().items()} == {
        "train": 546,
        "val": 78,
        "test": 156,
    }
    assert ds.read(5).shape == (28, 28, 3)


# ---- bad input -------------------------------------------------------------------------------


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(MedtlError) as info:
        load_dataset(tmp_path / "nowhere")
    one_line_error(info, "nowhere", "no such file or folder")


def test_folder_without_class_subfolders(tmp_path: Path, image) -> None:
    (tmp_path / "flat").mkdir()
    image(tmp_path / "flat" / "a.png")
    with pytest.raises(MedtlError) as info:
        load_dataset(tmp_path / "flat")
    one_line_error(info, "flat", "no class sub-folders", "1 image(s)")


def test_folder_with_no_images(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        (tmp_path / "d" / cls / "readme.txt").write_text("x")
    with pytest.raises(MedtlError) as info:
        load_dataset(tmp_path / "d")
    one_line_error(info, "no images found")


def test_empty_class_folder_is_named(tree) -> None:
    root = tree({"a": ["1.png", "2.png"], "b": ["3.png", "4.png"]})
    (root / "ghost").mkdir()
    with pytest.raises(MedtlError) as info:
        load_dataset(root)
    one_line_error(info, "class folder", "ghost", "has no images")


def test_class_with_a_single_image(tree) -> None:
    root = tree({"a": ["1.png", "2.png"], "lonely": ["3.png"]})
    with pytest.raises(MedtlError) as info:
        load_dataset(root)
    one_line_error(info, "class 'lonely' has 1 image; at least 2 are needed")


def test_mixed_split_and_class_folders(tree) -> None:
    root = tree({"train/a": ["1.png", "2.png"], "NORMAL": ["3.png"]})
    with pytest.raises(MedtlError) as info:
        load_dataset(root)
    one_line_error(info, "mixes split folders", "NORMAL")


def test_manifest_row_with_missing_file(tree) -> None:
    root = tree({"x": ["1.png", "2.png"]})
    rows = [
        {"path": "x/1.png", "label": "a"},
        {"path": "x/gone.png", "label": "a"},
        {"path": "x/2.png", "label": "b"},
    ]
    manifest = write_manifest(root / "m.csv", rows)
    with pytest.raises(MedtlError) as info:
        load_dataset(manifest)
    one_line_error(info, str(manifest), "line 3", "x/gone.png", "not found")


def test_manifest_without_label_column(tree) -> None:
    root = tree({"x": ["1.png"]})
    manifest = write_manifest(root / "m.csv", [{"path": "x/1.png", "class": "a"}])
    with pytest.raises(MedtlError) as info:
        load_dataset(manifest)
    one_line_error(info, "m.csv", "'label'", "path,label")


def test_manifest_with_bad_split_value(tree) -> None:
    root = tree({"x": ["1.png", "2.png"]})
    rows = [{"path": "x/1.png", "label": "a", "split": "training"}]
    with pytest.raises(MedtlError) as info:
        load_dataset(write_manifest(root / "m.csv", rows))
    one_line_error(info, "line 2", "'training'")


def test_npz_without_medmnist_keys(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "other.npz", x=np.zeros((2, 3, 3), np.uint8), y=np.zeros(2))
    with pytest.raises(MedtlError) as info:
        load_dataset(path)
    one_line_error(info, "other.npz", "train_images", "found: x, y")


def test_npz_images_without_labels(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "half.npz", train_images=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(MedtlError) as info:
        load_dataset(path)
    one_line_error(info, "half.npz", "'train_labels'")


def _chestmnist_like(path: Path, rng: np.random.Generator, k: int = 3) -> Path:
    """MedMNIST's multi-label layout (ChestMNIST): labels (n, K) of 0/1."""
    arrays = {}
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, k)).astype(np.uint8)
    return save_npz(path, **arrays)


def test_npz_with_label_columns_is_multi_label(tmp_path: Path) -> None:
    path = _chestmnist_like(tmp_path / "chest.npz", np.random.default_rng(0))
    ds = load_dataset(path)
    assert ds.multilabel and ds.classes == ["0", "1", "2"]
    with np.load(path) as raw:
        np.testing.assert_array_equal(ds.split("test").labels, raw["test_labels"])
    named = load_dataset(path, labels="effusion,edema,mass")
    assert named.classes == ["effusion", "edema", "mass"]
    np.testing.assert_array_equal(named.labels, ds.labels)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(val_labels=a["val_labels"][:, :2]), "differ in width"),
    (lambda a: a["train_labels"].__setitem__((0, 0), 2), "holds 2"),
    (lambda a: a.update(test_labels=a["test_labels"][:5]), "5 label rows for 10 images"),
])
def test_npz_multi_label_mistakes_are_one_line(tmp_path: Path, change, message) -> None:
    good = _chestmnist_like(tmp_path / "g.npz", np.random.default_rng(1))
    with np.load(good) as raw:
        arrays = {k: raw[k].copy() for k in raw.files}
    change(arrays)
    bad = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(MedtlError) as info:
        load_dataset(bad)
    one_line_error(info, "bad.npz", message)
    with pytest.raises(MedtlError, match="names 2 labels, and the .npz has 3"):
        load_dataset(good, labels="a,b")


def test_label_in_test_not_in_train(tree) -> None:
    root = tree(
        {
            "train/a": ["1.png", "2.png"],
            "train/b": ["3.png", "4.png"],
            "test/c": ["5.png", "6.png"],
        }
    )
    with pytest.raises(MedtlError) as info:
        load_dataset(root)
    one_line_error(info, "class 'c'", "test", "not in train")


def test_unsupported_source_and_bad_options(tmp_path: Path, tree) -> None:
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(MedtlError, match="not a folder, a .csv manifest or an .npz"):
        load_dataset(tmp_path / "data.json")
    root = tree({"a": ["1.png", "2.png"], "b": ["3.png", "4.png"]})
    with pytest.raises(MedtlError, match="val_fraction"):
        load_dataset(root, val_fraction=1.0)
    with pytest.raises(MedtlError, match="invalid patient regex"):
        load_dataset(root, patient_regex="(unclosed")


def test_unreadable_image_raises_unless_skipped(tree) -> None:
    root = tree({"a": ["1.png", "2.png", "3.png"], "b": ["4.png", "5.png"]})
    bad = root / "a" / "2.png"
    bad.write_bytes(b"\x89PNG but then garbage")
    with pytest.raises(DataReadError) as info:
        load_dataset(root)
    one_line_error(info, str(bad), "cannot identify image file")

    ds = load_dataset(root, skip_bad=True, val_fraction=0)
    assert len(ds) == 4
    assert [p for p, _ in ds.skipped] == [str(bad)]
    assert "cannot identify" in ds.skipped[0][1]
    assert str(bad) not in ds.paths


def test_empty_image_file_is_skipped(tree) -> None:
    root = tree({"a": ["1.png", "2.png", "3.png"], "b": ["4.png", "5.png"]})
    (root / "b" / "6.png").write_bytes(b"")
    ds = load_dataset(root, skip_bad=True, val_fraction=0)
    assert ds.skipped == [(str(root / "b" / "6.png"), "file is empty")]


def test_read_of_truncated_jpeg_in_a_dataset(tree) -> None:
    root = tree({"a": ["1.png", "2.png"], "b": ["3.png", "4.png"]})
    from PIL import Image

    rng = np.random.default_rng(0)
    full = root / "b" / "big.jpeg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full, quality=95)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    ds = load_dataset(root, val_fraction=0)  # the header is fine, so loading succeeds
    i = ds.paths.index(str(full))
    with pytest.raises(DataReadError) as info:
        ds.read(i)
    one_line_error(info, "big.jpeg", "truncated")


def test_dataset_type(tree) -> None:
    assert isinstance(load_dataset(tree({"a": ["1.png", "2.png"]}), val_fraction=0), Dataset)
