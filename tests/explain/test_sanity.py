"""The two checks that a map means something (issue 7's acceptance): it points at the evidence
(the pointing game, on images whose class is decided by a bright patch at a random position)
and it depends on what the model learned (Adebayo et al.'s model randomisation test)."""

from __future__ import annotations

import numpy as np
import pytest

import medtl
from medtl.explain import Explainer, randomisation_check
from medtl.explain.runs import model_input

from .conftest import patch_boxes, write_patch_images

# 224 px gives a stride-32 backbone a 7 x 7 Grad-CAM grid; the patch is two cells wide. Patches
# keep 16 px from the border: nearer, zero padding pulls every top-layer map toward the centre.
# Measured with patches anywhere: 0.77, and every miss was a patch within 15 px of the border.
SIZE, SIDE, MARGIN = 224, 64, 16


@pytest.fixture(scope="module")
def patch_maps(tmp_path_factory):
    """MobileNetV2 fine-tuned (top block) to find the patch, and its Grad-CAM maps for the
    patch class on the test images that have one."""
    root = write_patch_images(tmp_path_factory.mktemp("patches") / "data",
                              {"train": 80, "val": 20, "test": 30}, size=SIZE, side=SIDE,
                              margin=MARGIN)
    run = medtl.train(root, backbone="mobilenet_v2", strategy="fine-tune", epochs=8,
                      augment="none", image_size=SIZE, out=root.parent / "run", quiet=True)
    clf = run.load_model(quiet=True)
    explainer = Explainer.for_classifier(clf)
    boxes = patch_boxes(root)
    test = medtl.load_dataset(root).split("test")
    with_patch = test.subset([i for i, r in enumerate(test.records) if r.path in boxes])
    pixels = model_input(clf.model_.preprocessing, [with_patch.read(i)
                                              for i in range(len(with_patch))])
    targets = [clf.classes_.index("patch")] * len(with_patch)
    maps = np.concatenate([explainer.maps(pixels[s:s + 16], targets[s:s + 16], "gradcam")
                           for s in range(0, len(pixels), 16)])
    return run, [boxes[r.path] for r in with_patch.records], explainer, pixels, targets, maps


def _pointing(points: list[tuple[int, int]], boxes: list[tuple[int, int, int]]) -> float:
    return float(np.mean([y0 <= y < y0 + side and x0 <= x < x0 + side
                          for (y, x), (y0, x0, side) in zip(points, boxes, strict=True)]))


def test_the_model_learned_the_patches(patch_maps):
    assert patch_maps[0].metrics["test"]["auc"] > 0.95


def test_pointing_game_gradcam_maximum_falls_inside_the_patch(patch_maps):
    _, boxes, _, _, _, maps = patch_maps
    assert len(maps) == 30
    points = [np.unravel_index(np.argmax(m), m.shape) for m in maps]
    score = _pointing(points, boxes)
    assert score >= 0.8, f"pointing game {score:.2f} on {len(maps)} images"
    # The test can fail: a map that always peaks at the centre would score far lower.
    assert _pointing([(SIZE // 2, SIZE // 2)] * len(boxes), boxes) < 0.5


def test_model_randomisation_makes_the_gradcam_maps_unrelated(patch_maps):
    _, _, explainer, pixels, targets, maps = patch_maps
    result = randomisation_check(explainer, pixels[:16], targets[:16], "gradcam",
                                 maps=maps[:16])
    assert result["n"] == 16
    assert result["median_spearman"] < 0.5 and result["mean_spearman"] < 0.5
    assert result["passed"]
    # Not a fluke of noisy maps: the trained model gives the same maps twice.
    np.testing.assert_allclose(explainer.maps(pixels[:4], targets[:4], "gradcam"), maps[:4],
                               atol=1e-5)
