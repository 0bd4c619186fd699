"""Multi-stage transfer (``--weights RUN_DIR``, issue 17 point 3): a finished run's backbone,
loaded bit for bit, its classifier dropped, the provenance chain recorded, a crafted run
refused with one MedtlError, and frozen features never shared with other weights.

Stage 1 trains every layer from random weights (ImageNet is not on a test machine); stage 2 is
a frozen (hybrid) run on stage 1's backbone; a third stage is built from stage 2.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import medtl
from medtl.errors import MedtlError, WeightsError
from medtl.export.card import card_markdown, model_card
from medtl.models import create_backbone
from medtl.models.backbone import layout
from medtl.models.weights import weights_info_from_dict
from medtl.training.features import weights_key
from medtl.training.loop import seeded
from tests.conftest import write_blob_images

COMMON = dict(image_size=64, quiet=True, seed=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two stages, trained once for the module: random -> A (full) -> B (hybrid on A)."""
    root = tmp_path_factory.mktemp("stages")
    data = write_blob_images(root / "blobs", n_per_class=8, size=64)
    a = medtl.train(data, strategy="full", weights="random", epochs=1, augment="none",
                    out=root / "A", **COMMON)
    b = medtl.train(data, strategy="hybrid", head="logreg", weights=str(a.path),
                    out=root / "B", **COMMON)
    return {"data": data, "A": a.path, "B": b.path}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _body(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith(("classifier.", "imagenet_pool."))}


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_backbone_is_loaded_bit_for_bit_and_the_head_is_not(runs):
    source = _body(load_file(runs["A"] / "model" / "model.safetensors"))
    bb = create_backbone("mobilenet_v2", weights=runs["A"])
    _assert_same_tensors(_body(bb.state_dict()), source)
    # A's classifier (2 classes) is not carried over: the builder's own stands until the new
    # task resets it.
    assert bb.num_classes == 1000
    # End to end: B is frozen on A's backbone, so the backbone B saved is A's, every tensor.
    _assert_same_tensors(_body(load_file(runs["B"] / "model" / "backbone.safetensors")), source)


def test_a_frozen_runs_backbone_is_the_one_it_used(runs):
    source = _body(load_file(runs["B"] / "model" / "backbone.safetensors"))
    bb = create_backbone("mobilenet_v2", weights=runs["B"])
    _assert_same_tensors(_body(bb.state_dict()), source)


def test_the_provenance_chain_is_recorded_in_config_model_json_and_card(runs):
    a_cfg = json.loads((runs["A"] / "config.json").read_text())
    w = json.loads((runs["B"] / "config.json").read_text())["weights"]
    assert w["kind"] == "run" and w["requested"] == str(runs["A"])
    assert w["source"] == f"run:{runs['A'].resolve()}"
    assert w["sha256"] == _sha(runs["A"] / "model" / "model.safetensors")
    assert w["data_fingerprint"] == a_cfg["data"]["fingerprint"]
    assert [s["kind"] for s in w["chain"]] == ["random"]
    assert "path" not in w  # config.json names the run, not files on this machine
    card = model_card(medtl.load_run(runs["B"]))
    assert card["model_details"]["weights"]["requested"] == "A"
    chain = card["model_details"]["weights"]["chain"]
    assert [s["source"] for s in chain] == ["random", "run:A"]
    md = card_markdown(card)
    assert "Transfer chain: random -> run:A (data " in md and str(runs["A"]) not in md


def test_a_third_stage_extends_the_chain_through_model_json(runs):
    """B's model.json keeps its record whole; a run started from B lists random, A, then B."""
    loaded = medtl.load_run(runs["B"]).load_model(quiet=True).model_.backbone.weights_info
    assert [s.source for s in loaded.stages()] == ["random", f"run:{runs['A'].resolve()}"]
    info = create_backbone("mobilenet_v2", weights=runs["B"]).weights_info
    b_cfg = json.loads((runs["B"] / "config.json").read_text())
    assert [(s.kind, s.source) for s in info.stages()] == [
        ("random", "random"), ("run", f"run:{runs['A'].resolve()}"),
        ("run", f"run:{runs['B'].resolve()}")]
    assert info.sha256 == _sha(runs["B"] / "model" / "backbone.safetensors")
    assert info.data_fingerprint == b_cfg["data"]["fingerprint"]
    assert weights_info_from_dict(json.loads(json.dumps(info.to_dict()))) == info
    # An earlier stage that holds a chain of its own is not medtl's record: refused.
    nested = info.to_dict()
    nested["chain"][1]["chain"] = [{"kind": "random", "source": "random"}]
    with pytest.raises(WeightsError, match="chain of its own"):
        weights_info_from_dict(nested)


def test_another_backbone_is_refused_before_training(runs, tmp_path, capsys):
    with pytest.raises(WeightsError, match=r"trained 'mobilenet_v2', not 'resnet18'"):
        create_backbone("resnet18", weights=runs["A"])
    with pytest.raises(MedtlError, match="trained 'mobilenet_v2'"):
        medtl.train(runs["data"], backbone="resnet18", strategy="hybrid", weights=str(runs["A"]),
                    out=tmp_path / "x", **COMMON)
    assert not (tmp_path / "x").exists()
    # The CLI: exit 2, one line naming both backbones.
    from tests.test_cli import one_line_error, run_cli

    code, _, err = run_cli(["train", runs["data"], "--backbone", "resnet18", "--strategy",
                            "hybrid", "--weights", runs["A"], "--quiet", "--out",
                            tmp_path / "y"], capsys)
    assert code == 2 and "--backbone mobilenet_v2" in one_line_error(err)
    assert not (tmp_path / "y").exists()


def test_a_one_channel_run_for_three_channel_input_is_refused_clearly(runs, tmp_path):
    run = shutil.copytree(runs["A"], tmp_path / "grey")
    path = run / "model" / "model.safetensors"
    sd = load_file(path)
    lay = layout("mobilenet_v2")
    key = next(k for k, b in lay.backbone_to_builder.items() if b == lay.first_conv_key)
    sd[key] = sd[key].sum(1, keepdim=True).contiguous()
    save_file(sd, path)
    with pytest.raises(WeightsError, match="1-channel input; create the backbone with in_chans=1"):
        create_backbone("mobilenet_v2", weights=run)
    assert create_backbone("mobilenet_v2", weights=run, in_chans=1).in_chans == 1


def _craft(run: Path, how: str) -> None:
    model = run / "model" / "model.safetensors"
    if how == "no config.json":
        (run / "config.json").unlink()
    elif how == "no model file":
        model.unlink()
    elif how == "tensors of other shapes":  # every name right, the shapes not
        save_file({k: torch.zeros(3) for k in load_file(model)}, model)
    elif how == "a stray tensor":
        save_file({**load_file(model), "blocks.evil.weight": torch.zeros(1)}, model)
    elif how == "a pickle named safetensors":
        torch.save({"x": torch.zeros(1)}, model)
    elif how == "a link to a device":
        model.unlink()
        model.symlink_to("/dev/zero")
    elif how == "a bad recorded digest":
        meta = json.loads((run / "model" / "model.json").read_text())
        meta["weights_info"]["sha256"] = "/../../etc"
        (run / "model" / "model.json").write_text(json.dumps(meta))
    elif how == "a truncated run":
        meta = json.loads((run / "model" / "model.json").read_text())
        meta["keep"] = 3
        (run / "model" / "model.json").write_text(json.dumps(meta))


CRAFTED = ("no config.json", "no model file", "tensors of other shapes", "a stray tensor",
           "a pickle named safetensors", "a link to a device", "a bad recorded digest",
           "a truncated run")


@pytest.mark.parametrize("how", CRAFTED)
def test_a_crafted_run_is_refused_with_one_error(runs, tmp_path, how):
    run = shutil.copytree(runs["A"], tmp_path / "crafted", symlinks=True)
    _craft(run, how)
    with pytest.raises(MedtlError) as err:
        create_backbone("mobilenet_v2", weights=run)
    assert "\n" not in str(err.value) and str(run) in str(err.value)


def test_medtl_train_checks_the_whole_run_first(runs, tmp_path):
    run = shutil.copytree(runs["A"], tmp_path / "crafted")
    (run / "metrics.json").write_text("[1, 2]")  # not read by the resolver: load_run's check
    with pytest.raises(MedtlError, match="metrics"):
        medtl.train(runs["data"], strategy="hybrid", weights=str(run), out=tmp_path / "x",
                    **COMMON)
    assert not (tmp_path / "x").exists()


def test_the_feature_cache_key_follows_the_run_weights(runs):
    """Frozen features key on the backbone's tensors: a run's trained backbone never shares
    the cache with the weights it started from; the same tensors share it, wherever loaded."""
    with seeded(0):
        start = create_backbone("mobilenet_v2", weights="random")
    trained = create_backbone("mobilenet_v2", weights=runs["A"])
    frozen_on_a = create_backbone("mobilenet_v2", weights=runs["B"])
    assert weights_key(trained) != weights_key(start)
    assert weights_key(frozen_on_a) == weights_key(trained)
