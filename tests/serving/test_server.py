"""`medtl serve` for real: a uvicorn process on loopback answering over TCP, and a run (not a
bundle) served with Grad-CAM from its torch model."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_blob_images
from tests.serving.bundles import CLASSES, reference
from tests.serving.conftest import png_bytes, wait_ready
from tests.serving.server import post_files, running_server


def test_uvicorn_process_predicts_with_a_token(tiny_bundle):
    """One process, several checks: it binds loopback, needs the token given in the
    environment, predicts as the graph does, and its log names no file."""
    import httpx

    token = "a-token-from-the-environment-0123"
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    with running_server(tiny_bundle, "--batch-wait-ms", "1",
                        env={"MEDTL_SERVE_TOKEN": token}) as server:
        assert server.url.startswith("http://127.0.0.1:")
        files = [("files", "Doe_Jane.png", png_bytes(image))]
        assert post_files(server.url, "/v1/predict", files).status_code == 401
        answer = post_files(server.url, "/v1/predict", files,
                            headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        result = answer.json()["results"][0]
        np.testing.assert_allclose([result["probabilities"][c] for c in CLASSES],
                                   reference(image), atol=1e-5)
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert "POST /v1/predict 200 files=1" in server.log
    assert "POST /v1/predict 401" in server.log
    assert "Doe" not in server.log


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A trained run (frozen MobileNetV2 at 64 px, linear head: differentiable) and its
    test images."""
    import medtl

    data = write_blob_images(tmp_path_factory.mktemp("serve-run") / "blobs", n_per_class=4,
                             splits=("train", "val", "test"))
    run = medtl.train(data, out=data.parent / "run", backbone="mobilenet_v2",
                      weights="imagenet", image_size=64, epochs=1, quiet=True,
                      strategy="feature-extractor")
    return run.path, sorted((data / "test").rglob("*.png"))


def test_a_run_is_exported_served_and_explained_with_gradcam(tiny_run):
    from fastapi.testclient import TestClient

    from medtl.data import dataset_from_files
    from medtl.run import load_run
    from medtl.serving import create_app, load_served

    path, images = tiny_run
    served = load_served(path)
    folder = served.temporary
    assert folder is not None and folder.is_dir()
    clf = load_run(path).load_model(quiet=True)
    want = clf.predict_proba(dataset_from_files(images[:4], classes=clf.classes_))
    with TestClient(create_app(served)) as client:
        wait_ready(client)
        assert client.get("/v1/model").json()["explain"] == "gradcam"
        answer = client.post("/v1/predict", files=[("files", (p.name, p.read_bytes()))
                                                   for p in images[:4]])
        assert answer.status_code == 200, answer.text
        got = [[r["probabilities"][c] for c in served.model.classes]
               for r in answer.json()["results"]]
        np.testing.assert_allclose(got, want, atol=1e-4)
        explained = client.post("/v1/explain", files={"file": ("x.png", images[0].read_bytes())})
        assert explained.status_code == 200, explained.text
        assert explained.headers["X-Medtl-Explain-Method"] == "gradcam"
        drawn = Image.open(io.BytesIO(explained.content))
        assert drawn.size == Image.open(images[0]).size
    assert not folder.exists()  # the temporary export is removed at shutdown
