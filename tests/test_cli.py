"""The CLI contract: bad input exits 2 with one line naming the file or value and the cause."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medtl.cli import main

from .conftest import write_blob_images

FAST = ["--backbone", "mobilenet_v2", "--weights", "random", "--image-size", "64", "--quiet"]


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def test_nonexistent_path(capsys, tmp_path):
    code, _, err = run_cli(["train", tmp_path / "nope", *FAST, "--out", tmp_path / "r"], capsys)
    assert code == 2
    line = one_line_error(err)
    assert "nope" in line


def test_unreadable_image_names_the_file_and_skip_bad_counts_it(capsys, tmp_path):
    data = write_blob_images(tmp_path / "d")
    bad = data / "train" / "disc" / "broken.png"
    bad.write_bytes(b"this is not an image at all")
    code, _, err = run_cli(["train", data, *FAST, "--out", tmp_path / "r1"], capsys)
    assert code == 2
    assert "broken.png" in one_line_error(err)

    code, _, _ = run_cli(["train", data, *FAST, "--skip-bad", "--out", tmp_path / "r2"], capsys)
    assert code == 0
    log = (tmp_path / "r2" / "log.txt").read_text()
    assert "broken.png" in log and "1 unreadable" in log
    code, out, _ = run_cli(["info", data, "--skip-bad", "--json", "--quiet"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert len(summary["unreadable"]) == 1 and "broken.png" in summary["unreadable"][0]


def test_truncated_image_found_at_decode_names_the_file(capsys, tmp_path):
    data = write_blob_images(tmp_path / "d")
    import numpy as np
    from PIL import Image

    jpg = data / "train" / "bar" / "cut.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(jpg, quality=95)
    jpg.write_bytes(jpg.read_bytes()[:300])
    code, _, err = run_cli(["train", data, *FAST, "--out", tmp_path / "r"], capsys)
    assert code == 2
    assert "cut.jpg" in one_line_error(err)


def test_empty_class_folder(capsys, tmp_path):
    data = write_blob_images(tmp_path / "d", splits=("train",))
    (data / "train" / "empty_class").mkdir()
    code, _, err = run_cli(["train", data, *FAST, "--out", tmp_path / "r"], capsys)
    assert code == 2
    assert "empty_class" in one_line_error(err)


def test_class_with_a_single_image(capsys, tmp_path):
    data = write_blob_images(tmp_path / "d", splits=("train",))
    lonely = data / "train" / "lonely"
    lonely.mkdir()
    shutil.copy(next((data / "train" / "disc").iterdir()), lonely / "only.png")
    code, _, err = run_cli(["train", data, *FAST, "--out", tmp_path / "r"], capsys)
    assert code == 2
    assert "lonely" in one_line_error(err)


def test_manifest_row_with_missing_file(capsys, tmp_path):
    data = write_blob_images(tmp_path / "d", splits=("train",))
    rows = ["path,label"]
    for p in sorted((data / "train").rglob("*.png")):
        rows.append(f"{p.relative_to(data)},{p.parent.name}")
    rows.append("train/disc/ghost.png,disc")
    manifest = data / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    code, _, err = run_cli(["train", manifest, *FAST, "--out", tmp_path / "r"], capsys)
    assert code == 2
    assert "ghost.png" in one_line_error(err)


@pytest.mark.parametrize("option,value", [("--backbone", "resnet9000"),
                                          ("--strategy", "telepathy")])
def test_unknown_backbone_or_strategy(capsys, tmp_path, option, value):
    data = write_blob_images(tmp_path / "d", splits=("train",))
    args = ["train", data, "--weights", "random", "--quiet", option, value,
            "--out", tmp_path / "r"]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    line = one_line_error(err)
    assert value in line and "choose one of" in line
    assert not (tmp_path / "r").exists()


def test_help_shows_an_example_for_each_command(capsys):
    for cmd in ("demo", "models", "info", "train", "evaluate", "predict"):
        code, out, _ = run_cli([cmd, "--help"], capsys)
        assert code == 0
        assert "Example" in out and f"medtl {cmd}" in out


def test_models_lists_backbones_and_offline_weights(capsys):
    code, out, _ = run_cli(["models", "--json"], capsys)
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    for name in ("alexnet", "vgg16", "vgg19", "googlenet", "inception_v3", "resnet18",
                 "resnet34", "resnet50", "densenet121", "mobilenet_v2", "efficientnet_lite0",
                 "efficientnet_b0", "xception", "vit_small"):
        r = rows[name]
        assert r["group"] in ("shallow", "deep", "lightweight")
        assert r["params_total"] > r["params_features"] > 0 and r["feature_dim"] > 0
    for name in ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1",
                 "efficientnet_lite2"):
        assert rows[name]["imagenet_weights"] is True, rows[name]
        assert rows[name]["weights_source"].startswith("package:")
    how = rows["resnet50"]["how_to_provide"]
    assert rows["resnet50"]["imagenet_weights"] is False
    assert "--weights" in how and "MEDTL_WEIGHTS_DIR" in how and "resnet50" in how

    code, out, _ = run_cli(["models"], capsys)
    assert code == 0
    for name in rows:
        assert name in out
    code, out, _ = run_cli(["models", "--available", "--json"], capsys)
    assert {r["name"] for r in json.loads(out)} >= {"mobilenet_v2", "efficientnet_lite0"}
    assert all(r["imagenet_weights"] for r in json.loads(out))


def test_console_script_exit_code_in_a_real_process(tmp_path):
    exe = Path(sys.executable).with_name("medtl")
    if not exe.exists():
        pytest.skip("medtl console script not installed in this environment")
    proc = subprocess.run([exe, "info", tmp_path / "missing"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "missing" in proc.stderr and "Traceback" not in proc.stderr
