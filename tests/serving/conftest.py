"""Fixtures of the serving tests: a tiny bundle built by hand (tests/serving/bundles.py) and
a FastAPI TestClient on it. ``tiny_bundle`` and ``running_server`` (tests/serving/server.py)
are what a test of the page reuses."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serving.bundles import write_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A bundle (32 px, NORMAL/PNEUMONIA, an OOD output) named "tiny"."""
    return write_bundle(tmp_path_factory.mktemp("serving") / "tiny")


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def wait_ready(client, timeout: float = 30.0) -> None:
    """Wait until a TestClient's app has loaded its model (GET /ready 200)."""
    deadline = time.monotonic() + timeout
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready").json()
        time.sleep(0.02)


@pytest.fixture(scope="module")
def client(tiny_bundle):
    """A TestClient on ``tiny_bundle`` with default settings, the model loaded."""
    from fastapi.testclient import TestClient

    from medtl.serving import create_app

    with TestClient(create_app(tiny_bundle)) as c:
        wait_ready(c)
        yield c
