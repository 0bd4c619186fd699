"""Ensemble runs deployed (issue 17): exported as one bundle of member bundles and a combiner,
loaded without torch by load_bundle, explained as the mean of the members' maps, served."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import medtl
from medtl.errors import MedtlError

FAST = dict(backbone="mobilenet_v2", weights="imagenet", quiet=True)
WEIGHTS = [0.3, 0.7]
# member b reads the image with another normalisation, so its probabilities differ from a's
B_MEAN, B_STD = [0.3, 0.45, 0.6], [0.2, 0.3, 0.25]


# ------------------------------------------------------------------ hand-built bundles (fast)
def write_ensemble_bundle(root: Path) -> Path:
    """An ensemble bundle as `medtl export` lays one out, from two tiny hand-built member
    bundles (tests/serving/bundles.py), combined by weights WEIGHTS."""
    from medtl.export.bundle import write_manifest, write_tree_manifest

    from .serving import bundles

    bundles.write_bundle(root / "members" / "a")
    b = bundles.write_bundle(root / "members" / "b")
    pre = json.loads((b / "preprocessing.json").read_text())
    (b / "preprocessing.json").write_text(json.dumps({**pre, "mean": B_MEAN, "std": B_STD}))
    write_manifest(b)
    info = {"format": 1, "kind": "ensemble", "method": "weighted",
            "params": {"weights": WEIGHTS}, "members": [{"name": "a"}, {"name": "b"}],
            "classes": bundles.CLASSES, "positive_class": "PNEUMONIA",
            "operating_points": {"youden": 0.4}, "view": pre["view"]}
    (root / "ensemble.json").write_text(json.dumps(info))
    (root / "model-card.json").write_text(json.dumps({"ensemble": {"members": []}}))
    write_tree_manifest(root)
    return root


@pytest.fixture
def images(tmp_path) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i, side in enumerate((32, 32, 40, 32)):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        if i == 3:
            pixels[:] = 0  # black: every member's OOD score is 12, over its threshold 10
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
        paths.append(tmp_path / f"img{i}.png")
    return paths


def test_a_loaded_ensemble_bundle_combines_its_members(tmp_path, images):
    from medtl.export.bundle import ExportedEnsemble, load_bundle

    bundle = write_ensemble_bundle(tmp_path / "ens")
    ens = load_bundle(bundle)
    assert isinstance(ens, ExportedEnsemble) and ens.operating_points == {"youden": 0.4}
    members = [load_bundle(bundle / "members" / n) for n in ("a", "b")]
    ds = ens.dataset(images)
    proba, score = ens.predict_dataset_ood(ds)
    each = [m.predict_dataset_ood(ds) for m in members]
    np.testing.assert_allclose(proba, WEIGHTS[0] * each[0][0] + WEIGHTS[1] * each[1][0],
                               atol=1e-12)
    assert np.abs(each[0][0] - each[1][0]).max() > 0.05  # the weights have something to weigh
    # OOD as an ensemble run's: the highest member score over that member's threshold
    np.testing.assert_allclose(score, np.maximum(each[0][1], each[1][1]) / 10.0)
    assert ens.ood["threshold"] == 1.0 and score[3] > 1.0 > score[0]
    # serve's path: one prepared row per image, batched
    rows = np.stack([ens.prepare(ds.read(i)) for i in range(len(ds))])
    np.testing.assert_allclose(ens.predict_batch(rows), proba, atol=1e-12)


def test_a_tampered_ensemble_bundle_is_refused(tmp_path):
    from medtl.export.bundle import load_bundle, write_tree_manifest

    bundle = write_ensemble_bundle(tmp_path / "ens")
    model = bundle / "members" / "b" / "model.onnx"
    good = model.read_bytes()
    model.write_bytes(good[:-3] + bytes([good[-3] ^ 1]) + good[-2:])
    with pytest.raises(MedtlError, match=r"members/b/model.onnx: sha256 differs"):
        load_bundle(bundle)
    model.unlink()
    with pytest.raises(MedtlError, match=r"members/b/model.onnx: listed in the manifest but "
                                         "missing"):
        load_bundle(bundle)
    model.write_bytes(good)
    load_bundle(bundle)  # restored
    (bundle / "members" / "a" / "notes.txt").write_text("x")
    with pytest.raises(MedtlError, match=r"members/a/notes.txt: not listed in the manifest"):
        load_bundle(bundle)
    # listed at the top but not in the member's own manifest: the member is no bundle
    write_tree_manifest(bundle)
    with pytest.raises(MedtlError, match=r"notes.txt: the member's manifest and its folder"):
        load_bundle(bundle)
    (bundle / "members" / "a" / "notes.txt").unlink()
    info = json.loads((bundle / "ensemble.json").read_text())
    (bundle / "ensemble.json").write_text(json.dumps({**info, "params": {"weights": [1.0]}}))
    write_tree_manifest(bundle)
    with pytest.raises(MedtlError, match=r"ensemble.json: the weighted combiner's weights"):
        load_bundle(bundle)


def test_serve_answers_with_the_combined_probabilities(tmp_path, images):
    from fastapi.testclient import TestClient

    from medtl.export.bundle import load_bundle
    from medtl.serving import create_app

    from .serving.conftest import wait_ready

    bundle = write_ensemble_bundle(tmp_path / "ens")
    expected = load_bundle(bundle).predict_proba(images)
    with TestClient(create_app(bundle)) as client:
        wait_ready(client)
        uploads = [("files", (p.name, p.read_bytes(), "image/png")) for p in images]
        results = client.post("/v1/predict", files=uploads).json()["results"]
        got = np.array([[r["probabilities"][c] for c in ("NORMAL", "PNEUMONIA")]
                        for r in results])
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert [r["ood"]["flag"] for r in results] == [False, False, False, True]
        assert results[0]["decisions"]["youden"]["threshold"] == 0.4
        explained = client.post("/v1/explain", files={
            "file": ("x.png", images[0].read_bytes(), "image/png")})
        assert explained.status_code == 200, explained.text
        assert explained.headers["X-Medtl-Explain-Method"] == "occlusion"
        assert explained.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_predicting_with_an_ensemble_bundle_never_imports_torch(tmp_path, images):
    bundle = write_ensemble_bundle(tmp_path / "ens")
    code = f"""
import sys
from medtl.export.bundle import load_bundle
proba = load_bundle({str(bundle)!r}).predict_proba([{str(images[0])!r}])
assert proba.shape == (1, 2), proba.shape
assert 'torch' not in sys.modules, 'torch imported by an ensemble bundle'
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


# ------------------------------------------------------------------ trained runs (slow)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Two small runs at other input sizes (hybrid logistic regression at 48 px, a trained
    linear head at 64 px), their weighted ensemble, and that ensemble exported."""
    from medtl.export.writer import export_run

    from .conftest import write_blob_images

    root = tmp_path_factory.mktemp("ensdeploy")
    data = write_blob_images(root / "blobs", n_per_class=12)
    a = medtl.train(data, strategy="hybrid", head="logreg", image_size=48, out=root / "a",
                    **FAST)
    b = medtl.train(data, strategy="feature-extractor", epochs=3, image_size=64,
                    out=root / "b", **FAST)
    ens = medtl.ensemble([a.path, b.path], method="weighted", out=root / "ens", quiet=True)
    bundle = export_run(medtl.load_run(ens.path), root / "bundle")
    files = sorted(str(p) for p in (data / "test").rglob("*.png"))[:6]
    return root, ens, bundle, files


def _matrix(rows, classes, column="prob_{}"):
    return np.array([[float(r[column.format(c)]) for c in classes] for r in rows])


@pytest.mark.slow
def test_exported_ensemble_predicts_what_the_run_predicts(deployed):
    from medtl.export.bundle import ExportedEnsemble, load_bundle

    _, ens, bundle, files = deployed
    classes = ens.config["classes"]
    exported = load_bundle(bundle)
    assert isinstance(exported, ExportedEnsemble) and exported.method == "weighted"
    assert exported.params["weights"] == pytest.approx(ens.config["combiner"]["weights"])
    run_rows = medtl.predict(ens.path, files, quiet=True, paths="absolute")
    np.testing.assert_allclose(exported.predict_proba(files), _matrix(run_rows, classes),
                               atol=1e-5)
    # `medtl predict BUNDLE` too, OOD scores included (the highest member score over its own
    # threshold, as the run computes it)
    bundle_rows = medtl.predict(bundle, files, quiet=True, paths="absolute")
    np.testing.assert_allclose(_matrix(bundle_rows, classes), _matrix(run_rows, classes),
                               atol=1e-5)
    assert (exported.ood is None) == (run_rows[0]["ood_score"] in ("", None))
    if exported.ood is not None:
        np.testing.assert_allclose([float(r["ood_score"]) for r in bundle_rows],
                                   [float(r["ood_score"]) for r in run_rows], rtol=1e-4)
    # operating points chosen on the ensemble's validation; each member a bundle of its own
    info = json.loads((bundle / "ensemble.json").read_text())
    chosen = {k: v for k, v in ens.metrics["thresholds"].items()
              if k not in ("chosen_on", "target_sensitivity")}
    assert exported.operating_points == pytest.approx(chosen) and chosen
    assert [m["input"]["size"] for m in info["members"]] == [48, 64]
    for name in ("a", "b"):
        assert load_bundle(bundle / "members" / name).classes == classes
    card = json.loads((bundle / "model-card.json").read_text())
    assert [m["name"] for m in card["ensemble"]["members"]] == ["a", "b"]
    assert card["ensemble"]["members"][0]["weights"]["sha256"]
    assert "## Ensemble members" in (bundle / "model-card.md").read_text()
    listed = json.loads((bundle / "manifest.json").read_text())["files"]
    assert {"ensemble.json", "members/a/model.onnx", "members/b/manifest.json"} <= set(listed)


@pytest.mark.slow
def test_torchscript_export_of_an_ensemble_is_refused(deployed, tmp_path):
    from medtl.export.writer import export_run

    _, ens, _, _ = deployed
    with pytest.raises(MedtlError, match="--format onnx only"):
        export_run(medtl.load_run(ens.path), tmp_path / "ts", format="torchscript")
    assert not (tmp_path / "ts").exists()


@pytest.mark.slow
def test_a_changed_missing_or_unlisted_member_file_is_refused(deployed, tmp_path):
    from medtl.export.bundle import load_bundle

    _, _, bundle, _ = deployed
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    load_bundle(copy)  # intact
    onnx_file = copy / "members" / "a" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-5] ^= 1
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(MedtlError, match=r"members/a/model.onnx: sha256 differs"):
        load_bundle(copy)
    onnx_file.unlink()
    with pytest.raises(MedtlError, match=r"members/a/model.onnx: listed in the manifest but "
                                         "missing"):
        load_bundle(copy)
    shutil.copyfile(bundle / "members" / "a" / "model.onnx", onnx_file)
    (copy / "members" / "b" / "extra.onnx").write_bytes(b"x")
    with pytest.raises(MedtlError, match=r"members/b/extra.onnx: not listed in the manifest"):
        load_bundle(copy)


@pytest.mark.slow
def test_explain_of_an_ensemble_is_the_mean_of_its_members_maps(deployed, tmp_path):
    from medtl.explain.runs import resize_maps
    from medtl.workflow import explain

    _, ens, _, files = deployed
    target = ens.config["positive_class"]
    got = explain(ens.path, files[:2], out=tmp_path / "ens", target=target, quiet=True,
                  paths="absolute")
    assert got["method"] == "gradcam"
    assert got["ensemble"]["size"] == 64 and not got["ensemble"]["scaled"]
    assert [m["name"] for m in got["ensemble"]["members"]] == ["a", "b"]
    assert (tmp_path / "ens" / "ensemble_maps.json").is_file()
    each = [explain(ens.path / "members" / n, files[:2], out=tmp_path / n, target=target,
                    quiet=True, paths="absolute") for n in ("a", "b")]
    for k, row in enumerate(got["rows"]):
        maps = [resize_maps(np.load(tmp_path / n / r["rows"][k]["map"])[None], 64)[0]
                for n, r in zip(("a", "b"), each, strict=True)]
        ensemble_map = np.load(tmp_path / "ens" / row["map"])
        assert ensemble_map.shape == (64, 64)
        np.testing.assert_allclose(ensemble_map, np.mean(maps, axis=0), atol=1e-5)


@pytest.mark.slow
def test_serve_predicts_and_explains_with_an_ensemble_bundle(deployed):
    from fastapi.testclient import TestClient

    from medtl.export.bundle import load_bundle
    from medtl.serving import create_app

    from .serving.conftest import wait_ready

    _, ens, bundle, files = deployed
    expected = load_bundle(bundle).predict_proba(files[:3])
    with TestClient(create_app(bundle)) as client:
        wait_ready(client)
        uploads = [("files", (Path(f).name, Path(f).read_bytes(), "image/png"))
                   for f in files[:3]]
        results = client.post("/v1/predict", files=uploads).json()["results"]
        got = np.array([[r["probabilities"][c] for c in ens.config["classes"]]
                        for r in results])
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert results[0]["decisions"]
        explained = client.post("/v1/explain", files={
            "file": ("x.png", Path(files[0]).read_bytes(), "image/png")})
        assert explained.status_code == 200, explained.text
        assert explained.headers["X-Medtl-Explain-Method"] == "occlusion"
        assert explained.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert client.get("/v1/model").json()["input"]["size"] == 64
    # the ensemble run itself: exported on the fly, the same answers
    with TestClient(create_app(ens.path)) as client:
        wait_ready(client, timeout=300)
        results = client.post("/v1/predict", files=uploads).json()["results"]
        np.testing.assert_allclose([[r["probabilities"][c] for c in ens.config["classes"]]
                                    for r in results], expected, atol=1e-6)
        explained = client.post("/v1/explain", files={
            "file": ("x.png", Path(files[0]).read_bytes(), "image/png")})
        assert explained.headers["X-Medtl-Explain-Method"] == "occlusion"
