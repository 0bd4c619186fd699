"""Every models test runs offline, with no MEDTL_WEIGHTS_DIR and an empty torch hub cache, so
what this machine happens to have cached cannot change the outcome."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_weights(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("MEDTL_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MEDTL_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
    # The Hugging Face cache location is read when huggingface_hub is imported; stub the lookup.
    monkeypatch.setattr("medtl.models.weights._hf_cached", lambda source: None)
