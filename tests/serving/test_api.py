"""The HTTP API of `medtl serve` on a tiny hand-built bundle (FastAPI's TestClient): every
route, every error code, DICOM, a 200-megapixel PNG, batching across requests, and the log."""

from __future__ import annotations

import io
import json
import logging
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medtl.serving import create_app
from tests.conftest import write_dicom
from tests.serving.bundles import CLASSES, OOD_THRESHOLD, SIZE, reference
from tests.serving.conftest import png_bytes, wait_ready

TOKEN = "s3cret-token-for-tests-0123456789"


def grey(value: int, size: int = SIZE) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def tinted(seed: int) -> np.ndarray:
    """A SIZE x SIZE image (no resizing) whose channel means vary around mid-grey."""
    rng = np.random.default_rng(seed)
    return (rng.integers(90, 166, (SIZE, SIZE, 3)) + rng.integers(-20, 20, 3)).astype(np.uint8)


def assert_no_upload_left(client) -> None:
    """Every upload file of the finished requests is gone from the server's private folder."""
    folder = client.app.state.medtl._uploads
    assert folder is not None and folder.is_dir() and not any(folder.iterdir())


def test_health_ready_and_model(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"ready": True}
    model = client.get("/v1/model").json()
    assert model["id"] == "tiny" and len(model["sha256"]) == 64
    assert model["classes"] == CLASSES and model["positive_class"] == "PNEUMONIA"
    assert model["operating_points"] == {"youden": 0.5, "sensitivity_0.9": 0.2}
    assert model["input"] == {"size": SIZE, "channels": 3}
    assert model["ood"]["threshold"] == OOD_THRESHOLD
    assert model["card"] == {"model_details": {"name": "tiny"}}
    assert model["explain"] == "occlusion"


def test_ready_is_503_until_the_model_is_loaded(tiny_bundle):
    # Without its lifespan (no `with`), the app never starts loading the bundle
    client = TestClient(create_app(tiny_bundle))
    answer = client.get("/ready")
    assert answer.status_code == 503 and answer.json()["ready"] is False
    assert client.get("/v1/model").status_code == 503
    assert client.get("/health").status_code == 200


def test_predict_several_files(client):
    images = [tinted(0), tinted(1), grey(0), grey(128)]
    answer = client.post("/v1/predict", files=[
        ("files", ("scans/a.png", png_bytes(images[0]))),
        ("files", ("C:\\scans\\b.png", png_bytes(images[1]))),
        ("files", ("black.png", png_bytes(images[2]))),
        ("files", ("grey.png", png_bytes(images[3])))])
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["file"] for r in results] == ["a.png", "b.png", "black.png", "grey.png"]
    assert_no_upload_left(client)
    model = client.get("/v1/model").json()
    for image, r in zip(images, results, strict=True):
        want = reference(image)
        got = np.array([r["probabilities"][c] for c in CLASSES])
        np.testing.assert_allclose(got, want, atol=1e-5)
        k = int(want.argmax())
        assert r["predicted_class"] == CLASSES[k] and r["probability"] == pytest.approx(want[k])
        for point, threshold in model["operating_points"].items():
            positive = bool(want[1] >= threshold)
            assert r["decisions"][point] == {"threshold": threshold, "positive": positive,
                                             "label": CLASSES[1] if positive else CLASSES[0]}
        assert r["model"] == {"id": "tiny", "sha256": model["sha256"]}
        assert r["latency_ms"] > 0
    # mid-grey images lie close to the "training" data, a black one far (score 12 > 10)
    assert [r["ood"]["flag"] for r in results] == [False, False, True, False]
    assert results[2]["ood"]["score"] == pytest.approx(12.0, rel=1e-4)
    assert results[2]["ood"]["threshold"] == OOD_THRESHOLD
    assert "feature distance" in results[2]["ood"]["reasons"][0]
    # mid-grey: P(PNEUMONIA) 0.38, positive at the 0.2 point and not at the 0.5 one
    assert {k: d["positive"] for k, d in results[3]["decisions"].items()} == {
        "youden": False, "sensitivity_0.9": True}


def test_dicom_upload_prediction_preview_and_tag_flag(client, tmp_path):
    """A DICOM is read with its window; its tags never appear in the answer; a CT sent to
    this (CR/DX, CHEST) model is flagged by its Modality."""
    pixels = np.zeros((40, 40), dtype=np.uint16)
    pixels[:, 20:] = 1000
    files = {}
    for modality in ("CR", "CT"):
        path = write_dicom(tmp_path / f"{modality}.dcm", pixels, Modality=modality,
                           BodyPartExamined="CHEST", PatientName="Doe^Jane",
                           PatientID="MRN-4242", WindowCenter=500, WindowWidth=1000)
        files[modality] = path.read_bytes()
    answer = client.post("/v1/predict", files=[("files", (f"{m}.dcm", b))
                                               for m, b in files.items()])
    assert answer.status_code == 200, answer.text
    cr, ct = answer.json()["results"]
    assert "Doe" not in answer.text and "MRN-4242" not in answer.text
    windowed = np.zeros((40, 40, 3), dtype=np.uint8)
    windowed[:, 20:] = 255
    small = np.asarray(Image.fromarray(windowed).resize((SIZE, SIZE), Image.BILINEAR))
    np.testing.assert_allclose([cr["probabilities"][c] for c in CLASSES], reference(small),
                               atol=1e-5)
    assert cr["ood"]["reasons"] == [] and not cr["ood"]["flag"]
    assert ct["ood"]["flag"] and "Modality CT" in " ".join(ct["ood"]["reasons"])
    preview = client.post("/v1/preview", files={"file": ("x.dcm", files["CT"])})
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(preview.content))), windowed)


def test_dicom_whose_preamble_looks_like_tiff_is_read_as_dicom(client):
    """pydicom's own CT_small.dcm starts with a TIFF header in its free 128-byte preamble: the
    DICM marker decides, so it is predicted and previewed as the CT it is (and flagged)."""
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    assert data[:4] in (b"II*\0", b"MM\0*")  # the premise: a TIFF-looking preamble
    answer = client.post("/v1/predict", files={"files": ("ct.dcm", data)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["ood"]["flag"]
    preview = client.post("/v1/preview", files={"file": ("ct.dcm", data)})
    assert preview.status_code == 200, preview.text


def test_explain_occlusion_points_at_the_deciding_patch(client):
    """Occlusion on the ONNX model: greying the one bright red patch that makes the image
    NORMAL (the red channel's weight) lowers NORMAL's probability, so the map is there."""
    image = grey(128, 64)
    image[:16, 48:, 0] = 255  # top-right corner
    answer = client.post("/v1/explain", files={"file": ("x.png", png_bytes(image))},
                         data={"target": "NORMAL"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Medtl-Explain-Method"] == "occlusion"
    assert answer.headers["X-Medtl-Target"] == "NORMAL"
    assert float(answer.headers["X-Medtl-Probability"]) == pytest.approx(
        reference(np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BILINEAR)))[0],
        abs=1e-5)
    drawn = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"), dtype=float)
    assert drawn.shape == image.shape
    change = np.abs(drawn - image).sum(axis=2)
    assert change[:16, 48:].mean() > 5 * change[32:, :32].mean() + 1
    wrong = client.post("/v1/explain", files={"file": ("x.png", png_bytes(image))},
                        data={"target": "CAT"})
    assert wrong.status_code == 422 and "not a class" in wrong.json()["detail"]


def test_token_guards_v1_routes_only(tiny_bundle):
    with TestClient(create_app(tiny_bundle, token=TOKEN)) as client:
        wait_ready(client)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            answer = client.get("/v1/model", headers=headers)
            assert answer.status_code == 401 and "token" in answer.json()["detail"]
            assert answer.headers["www-authenticate"] == "Bearer"
        denied = client.post("/v1/predict", files={"files": ("a.png", png_bytes(grey(9)))})
        assert denied.status_code == 401
        ok = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/v1/model", headers=ok).status_code == 200
        assert client.post("/v1/predict", headers=ok,
                           files={"files": ("a.png", png_bytes(grey(9)))}).status_code == 200
        for public in ("/health", "/ready", "/", "/docs"):
            assert client.get(public).status_code == 200, public


def test_upload_size_limit_413_declared_and_streamed(tiny_bundle):
    big = png_bytes(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    assert len(big) > 20_000
    with TestClient(create_app(tiny_bundle, max_upload_mb=0.01)) as client:
        wait_ready(client)
        answer = client.post("/v1/predict", files={"files": ("a.png", big)})
        assert answer.status_code == 413 and "--max-upload-mb" in answer.json()["detail"]
        # A chunked body declares no length: the limit holds while it is read
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                f"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + big + \
            f"\r\n--{boundary}--\r\n".encode()
        chunks = (body[i:i + 4096] for i in range(0, len(body), 4096))
        answer = client.post("/v1/predict", content=chunks, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert answer.status_code == 413 and "--max-upload-mb" in answer.json()["detail"]
        small = client.post("/v1/predict", files={"files": ("a.png", png_bytes(grey(9)))})
        assert small.status_code == 200


def test_not_an_image_is_415(client):
    for name, data in (("notes.png", b"patient notes, not an image\n" * 10),
                       ("empty.dcm", b""), ("fake.dcm", b"\0" * 200)):
        answer = client.post("/v1/predict", files={"files": (name, data)})
        assert answer.status_code == 415, name
        assert "judged by its content" in answer.json()["detail"]
    assert client.post("/v1/preview", files={"file": ("x.png", b"text")}).status_code == 415
    assert_no_upload_left(client)


def test_truncated_image_is_422(client):
    data = png_bytes(tinted(3))
    answer = client.post("/v1/predict", files={"files": ("cut.png", data[:len(data) // 2])})
    assert answer.status_code == 422 and answer.json()["detail"].startswith("cut.png: ")
    assert "medtl-serve" not in answer.text  # no temporary path
    assert_no_upload_left(client)


def _huge_png(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of width x height black pixels (compresses to ~200 kB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    squeeze = zlib.compressobj(9)
    rows = b"\0" * ((width + 1) * 1000)
    idat = b"".join(squeeze.compress(rows) for _ in range(height // 1000))
    idat += squeeze.compress(b"\0" * ((width + 1) * (height % 1000))) + squeeze.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def png_200_megapixels() -> bytes:
    return _huge_png(14_143, 14_143)


def test_200_megapixel_png_is_422_before_decoding(client, png_200_megapixels):
    assert len(png_200_megapixels) < 1_000_000
    for route, field in (("/v1/predict", "files"), ("/v1/explain", "file"),
                         ("/v1/preview", "file")):
        answer = client.post(route, files={field: ("huge.png", png_200_megapixels)})
        assert answer.status_code == 422, route
        assert "--max-pixels" in answer.json()["detail"]


def test_pixel_limit_reads_the_header(tiny_bundle, tmp_path):
    """--max-pixels counts the header's pixels: PNG width x height, DICOM rows x columns x
    frames."""
    dicom = write_dicom(tmp_path / "multi.dcm", np.zeros((3, 20, 20), dtype=np.uint16))
    with TestClient(create_app(tiny_bundle, max_pixels=1000)) as client:
        wait_ready(client)
        for name, data, ok in (("a.png", png_bytes(grey(5, 31)), True),
                               ("b.png", png_bytes(grey(5, 32)), False),
                               ("multi.dcm", dicom.read_bytes(), False)):
            answer = client.post("/v1/predict", files={"files": (name, data)})
            assert answer.status_code == (200 if ok else 422), (name, answer.text)
        assert "1,200 pixels" in answer.json()["detail"]


def test_concurrent_requests_share_model_calls(tiny_bundle):
    """Eight clients at once with a 300 ms batching window: far fewer model calls than
    requests, every answer right."""
    app = create_app(tiny_bundle, batch_size=8, batch_wait_ms=300)
    batcher = app.state.medtl.batcher
    answers = [None] * 8
    with TestClient(app) as client:
        wait_ready(client)
        barrier = threading.Barrier(8)

        def send(i: int) -> None:
            barrier.wait()
            answers[i] = client.post("/v1/predict",
                                     files={"files": ("a.png", png_bytes(tinted(i)))})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(a.status_code == 200 for a in answers)
    for i, a in enumerate(answers):
        got = [a.json()["results"][0]["probabilities"][c] for c in CLASSES]
        np.testing.assert_allclose(got, reference(tinted(i)), atol=1e-5)
    assert batcher.images == 8 and batcher.calls <= 3


def test_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "/v1/predict" in page.text
    assert "http://" not in page.text and "https://" not in page.text and "<script" not in page.text
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/explain", "/v1/preview", "/v1/model"} <= set(spec["paths"])


def test_page_and_static_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert client.get("/static/index.html").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def test_errors_are_one_line_json(client):
    missing = client.post("/v1/predict")
    assert missing.status_code == 422 and isinstance(missing.json()["detail"], str)


def test_request_log_has_counts_not_names(client, tmp_path, caplog):
    path = write_dicom(tmp_path / "x.dcm", np.zeros((8, 8), dtype=np.uint16),
                       PatientName="Doe^Jane", PatientID="MRN-4242")
    with caplog.at_level(logging.INFO, logger="medtl.serve"):
        client.post("/v1/predict", files={"files": ("Doe_Jane_MRN-4242.dcm",
                                                    path.read_bytes())})
        client.get("/secret-Doe?name=Jane")
    lines = [r.getMessage() for r in caplog.records if r.name == "medtl.serve"]
    assert any(line.startswith("POST /v1/predict 200 files=1 bytes=") for line in lines)
    assert any(line.startswith("GET (other path) 404") for line in lines)
    assert not any("Doe" in line or "Jane" in line or "MRN" in line for line in lines)


def test_a_bundle_is_served_without_torch(tiny_bundle):
    """In a fresh interpreter: the app on a bundle answers /v1/predict and /v1/explain and
    torch was never imported."""
    code = f"""
import io, sys
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient
from medtl.serving import create_app
buf = io.BytesIO()
Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(buf, format="PNG")
with TestClient(create_app({str(tiny_bundle)!r})) as c:
    import time
    while c.get("/ready").status_code != 200:
        time.sleep(0.02)
    assert c.post("/v1/predict", files={{"files": ("a.png", buf.getvalue())}}).status_code == 200
    assert c.post("/v1/explain", files={{"file": ("a.png", buf.getvalue())}}).status_code == 200
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_cli_refuses_a_public_bind_without_a_token(tiny_bundle, monkeypatch, capsys):
    import uvicorn

    from medtl.cli import main

    monkeypatch.delenv("MEDTL_SERVE_TOKEN", raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # were the guard to fail
    for args, message in ((["--host", "0.0.0.0"], "needs a token"),
                          (["--host", "192.168.1.20"], "needs a token"),
                          (["--host", "0.0.0.0", "--token", "short"], "at least 16")):
        with pytest.raises(SystemExit) as exc:
            main(["serve", str(tiny_bundle), *args])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_cli_refuses_a_tampered_bundle(tiny_bundle, tmp_path, capsys):
    import shutil

    from medtl.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    info = json.loads((copy / "preprocessing.json").read_text())
    info["operating_points"]["youden"] = 0.01
    (copy / "preprocessing.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit) as exc:
        main(["serve", str(copy)])
    assert exc.value.code == 2 and "sha256 differs" in capsys.readouterr().err


def test_a_bundle_without_ood_detector_and_a_failed_load(tmp_path):
    from tests.serving.bundles import write_bundle

    plain = write_bundle(tmp_path / "plain", ood=False)
    with TestClient(create_app(plain)) as client:
        wait_ready(client)
        assert client.get("/v1/model").json()["ood"] is None
        answer = client.post("/v1/predict", files={"files": ("a.png", png_bytes(grey(0)))})
        assert answer.status_code == 200 and answer.json()["results"][0]["ood"] is None
        uploads = client.app.state.medtl._uploads
    assert not uploads.exists()  # the server's upload folder goes at shutdown
    with TestClient(create_app(tmp_path / "missing")) as client:
        for _ in range(200):
            ready = client.get("/ready")
            if "loading" not in ready.json()["detail"]:
                break
            time.sleep(0.02)
        assert ready.status_code == 503 and "no such run or bundle" in ready.json()["detail"]
        assert client.get("/v1/model").status_code == 503


def test_cors_is_off_unless_an_origin_is_given(tiny_bundle):
    origin = "https://viewer.example.org"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    with TestClient(create_app(tiny_bundle)) as client:
        wait_ready(client)
        answer = client.get("/v1/model", headers={"Origin": origin})
        assert "access-control-allow-origin" not in answer.headers
        assert "access-control-allow-origin" not in client.options(
            "/v1/predict", headers=preflight).headers
    with TestClient(create_app(tiny_bundle, token=TOKEN, cors_origins=[origin])) as client:
        wait_ready(client)
        answer = client.options("/v1/predict", headers=preflight)  # no token in a preflight
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == origin
        other = client.options("/v1/predict", headers={**preflight, "Origin": "https://x.org"})
        assert other.headers.get("access-control-allow-origin") != "https://x.org"


def test_too_many_files_in_one_request_is_413(client):
    data = png_bytes(grey(128))
    answer = client.post("/v1/predict", files=[("files", (f"{i}.png", data)) for i in range(65)])
    assert answer.status_code == 413 and "at most 64" in answer.json()["detail"]


def test_a_model_failure_is_a_json_500_and_the_server_goes_on(tiny_bundle, monkeypatch):
    from medtl.serving import load_served

    served = load_served(tiny_bundle)
    works = served.model.predict_batch_ood

    def broken(batch):
        raise RuntimeError("/tmp/secret/path exploded")

    with TestClient(create_app(served), raise_server_exceptions=False) as client:
        monkeypatch.setattr(served.model, "predict_batch_ood", broken)
        answer = client.post("/v1/predict", files={"files": ("a.png", png_bytes(grey(9)))})
        assert answer.status_code == 500 and answer.json() == {"detail": "internal error"}
        monkeypatch.setattr(served.model, "predict_batch_ood", works)
        answer = client.post("/v1/predict", files={"files": ("a.png", png_bytes(grey(9)))})
        assert answer.status_code == 200  # the batcher survived the failure
