"""Acceptance: ImageNet weights resolved offline from installed packages recognise a cat."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from medtl.models import create_backbone, get_spec, imagenet_available

CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def chelsea(spec) -> torch.Tensor:
    """The standard eval transform: resize the shorter side to size / 0.875, centre crop."""
    from skimage import data

    img = Image.fromarray(data.chelsea())
    size = spec.input_size
    short = round(size / 0.875)
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = (np.asarray(img, dtype=np.float32) / 255.0 - spec.mean) / spec.std
    return torch.from_numpy(x.transpose(2, 0, 1)).float()[None]


@pytest.mark.parametrize(
    "name", ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
)
def test_cat_in_top5(name):
    spec = get_spec(name)
    ok, source = imagenet_available(spec)
    if not (ok and source.startswith("package:")):
        pytest.skip(f"no offline weight package for {name}: {source}")
    bb = create_backbone(name, weights="imagenet").eval()
    info = bb.weights_info
    assert info.kind == "imagenet" and info.source == source
    assert re.fullmatch(r"[0-9a-f]{64}", info.sha256)
    # The packages' file names embed the first hex digits of the file's sha256.
    assert info.path.name.split("-")[-1].split(".")[0] == info.sha256[:8]
    with torch.no_grad():
        top5 = bb(chelsea(spec)).topk(5).indices[0].tolist()
    assert CATS & set(top5), top5
    assert top5[0] in CATS
