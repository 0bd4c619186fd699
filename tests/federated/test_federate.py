"""medtl federate in Flower's simulation engine, end to end on three small sites.

Every message a site sends is recorded by a client mod outside medtl's own guard (what would
cross the network) and must hold the shared parameters and counts only. The run it writes is a
run like any other: predict, evaluate and export work on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from medtl.cli import main
from medtl.federated import job
from medtl.federated.apps import make_client_app
from medtl.run import load_run

from ..conftest import write_blob_images

SMALL = dict(strategy="feature-extractor", backbone="mobilenet_v2", weights="imagenet",
             image_size=32, quiet=True)


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("sites")
    return [write_blob_images(root / name, n_per_class=6, size=40, seed=i,
                              splits=("train", "val", "test"))
            for i, name in enumerate(("hospital_a", "hospital_b", "hospital_c"))]


def _recorder(log: Path):
    """A client mod (a closure: Ray ships it by value to the simulated sites' processes) that
    writes down every reply as it leaves the site."""
    def record(msg, context, call_next):
        reply = call_next(msg, context)
        entry = {"type": msg.metadata.message_type, "error": reply.has_error(), "records": {}}
        if not reply.has_error():
            for key, rec in reply.content.items():
                entry["records"][key] = {
                    "kind": type(rec).__name__,
                    "items": {k: ([list(v.shape), v.dtype] if hasattr(v, "shape")
                                  else [type(v).__name__, v]) for k, v in rec.items()}}
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return reply
    return record


@pytest.fixture(scope="module")
def federated(sites, tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    log = root / "messages.jsonl"
    mp = pytest.MonkeyPatch()
    mp.setattr(job, "make_client_app",
               lambda paths: make_client_app(paths, mods=[_recorder(log)]))
    try:
        run = job.federate([str(s) for s in sites], rounds=2, local_epochs=2, baselines=True,
                           out=root / "run", **SMALL)
    finally:
        mp.undo()
    return run, [json.loads(line) for line in log.read_text().splitlines()]


def test_sites_send_parameters_and_counts_only(federated):
    _, messages = federated
    trains = [m for m in messages if m["type"] == "train"]
    evals = [m for m in messages if m["type"] == "evaluate"]
    # 3 sites, 2 rounds of training, and the last model counted once at the end
    assert len(trains) == 3 * 2 and len(evals) == 3, messages
    counts = {"num-examples", "c0_0", "c0_1", "c1_0", "c1_1"}
    for m in trains:
        assert not m["error"]
        assert set(m["records"]) == {"arrays", "metrics"}
        assert m["records"]["arrays"]["kind"] == "ArrayRecord"
        assert m["records"]["arrays"]["items"] == {"fc.weight": [[2, 1280], "float32"],
                                                   "fc.bias": [[2], "float32"]}
        items = m["records"]["metrics"]["items"]
        assert set(items) == counts and all(kind == "int" for kind, _ in items.values())
        assert items["num-examples"][1] == 12  # 6 images of each class in each site's train
        assert sum(v for k, (_, v) in items.items() if k != "num-examples") == 12  # its val
    for m in evals:
        assert set(m["records"]) == {"metrics"}
        items = m["records"]["metrics"]["items"]
        assert set(items) == {"num-examples", "c0_0", "c0_1", "c1_0", "c1_1"}
        assert all(kind == "int" for kind, _ in items.values())
        assert sum(v for k, (_, v) in items.items() if k != "num-examples") == 12


def test_the_result_is_a_run_with_each_sites_test_and_the_rounds(federated, sites):
    run, _ = federated
    m = run.metrics
    assert m["test"]["n"] == 36 and "auc_ci95" in m["test"]  # the pooled test: 3 x 12
    assert set(m["sites"]) == {"hospital_a", "hospital_b", "hospital_c"}
    assert all(s["test"]["n"] == 12 for s in m["sites"].values())
    rounds = run.config["federation"]
    assert rounds["rounds_done"] == 2 and rounds["algorithm"] == "fedavg"
    history = (Path(run.path) / "history.csv").read_text().splitlines()
    assert history[0].startswith("round,") and len(history) == 3
    assert all(",3,36," in row for row in history[1:])  # 3 sites trained on 36 images
    # The model is the last round's global model, loaded as any run's.
    saved = np.load(Path(run.path) / "federation" / "global.npz")
    model = load_run(run.path).load_model(quiet=True)
    assert np.allclose(model.model_.head.fc.weight.detach().numpy(), saved["fc.weight"])


def test_baselines_are_runs_of_the_same_recipe(federated):
    run, _ = federated
    base = Path(run.path) / "baselines"
    assert sorted(p.name for p in base.iterdir()) == ["hospital_a", "hospital_b",
                                                       "hospital_c", "pooled"]
    for name in ("pooled", "hospital_a"):
        b = load_run(base / name)
        assert b.metrics["test"]["n"] == 36
        assert b.config["federation"]["rounds"] == 2
    rows = job.compare(Path(run.path))
    assert [r["model"] for r in rows][0] == "federated" and len(rows) == 5


def test_predict_evaluate_explain_export_and_serve_work_on_a_federated_run(
        federated, sites, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from medtl.serving import create_app

    from ..serving.conftest import wait_ready

    run, _ = federated
    image = next((sites[0] / "test" / "disc").iterdir())
    for args in (["predict", run.path, image, "--quiet"],
                 ["evaluate", run.path, sites[1], "--quiet"],
                 ["explain", run.path, image, "--out", tmp_path / "cams", "--quiet"],
                 ["export", run.path, "--out", tmp_path / "bundle"]):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        assert exc.value.code == 0, (args, capsys.readouterr())
    assert any((tmp_path / "cams").iterdir())
    with TestClient(create_app(run.path)) as client:
        wait_ready(client)
        answer = client.post("/v1/predict", files={"files": (image.name, image.read_bytes(),
                                                             "image/png")})
        assert answer.status_code == 200, answer.text


def test_a_single_site_or_bad_min_sites_is_refused_before_any_work(sites, tmp_path, capsys):
    for extra, why in ((["--min-sites", "4"], "--min-sites 4"),
                       (["--mu", "0.1"], "--algorithm fedprox")):
        with pytest.raises(SystemExit) as exc:
            main(["federate", *map(str, sites), "--out", str(tmp_path / "r"), *extra])
        assert exc.value.code == 2 and why in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["federate", str(sites[0]), "--out", str(tmp_path / "r")])
    assert exc.value.code == 2 and "at least 2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
