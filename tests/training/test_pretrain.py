"""Self-supervised pretraining (medtl pretrain): weights that change, load with --weights and
say where they came from; bitwise resume; each method; one-line errors; checked provenance."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lightly")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import medtl  # noqa: E402
from medtl.errors import MedtlError, WeightsError  # noqa: E402
from medtl.models import create_backbone  # noqa: E402
from medtl.models.backbone import WeightsInfo  # noqa: E402
from medtl.models.weights import MAX_CHAIN, weights_info_from_dict  # noqa: E402
from medtl.training.loop import seeded  # noqa: E402

from ..conftest import write_blob_images  # noqa: E402
from ..test_cli import one_line_error, run_cli  # noqa: E402

# Tiny and single-threaded: two cores are shared with other jobs, and two threads fighting
# for one core cost tenfold.
FAST = {"backbone": "mobilenet_v2", "image_size": 32, "batch_size": 8, "threads": 1,
        "quiet": True}
SHA = "a" * 64
FP = "b" * 64


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 train and 16 test images, 32 px."""
    return write_blob_images(tmp_path_factory.mktemp("ssl") / "blobs", n_per_class=8, size=32)


def test_pretraining_changes_the_backbone_and_a_run_records_where_it_came_from(data, tmp_path):
    out = tmp_path / "cxr-simclr.safetensors"
    result = medtl.pretrain(data, out, method="simclr", start="imagenet", epochs=1, **FAST)
    assert result.path == out and out.is_file()
    assert not (tmp_path / "cxr-simclr.safetensors.partial").exists()

    start = create_backbone("mobilenet_v2", "imagenet")
    start.reset_classifier(0)
    before = start.state_dict()
    after = load_file(str(out))
    assert after.keys() == before.keys()
    weights = [k for k in before if k.endswith(".weight")]
    changed = [k for k in weights if not torch.equal(before[k], after[k])]
    assert changed == weights, f"unchanged: {sorted(set(weights) - set(changed))[:5]}"

    # The metadata: the method, ImageNet's sha256, the train images' fingerprint (not test's).
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    started = json.loads(meta["start"])
    assert meta["method"] == "simclr" and started["kind"] == "imagenet"
    assert started["sha256"] == start.weights_info.sha256
    train = medtl.load_dataset(data, val_fraction=0.0).split("train")
    keys = sorted(train.content_key(i) for i in range(len(train)))
    assert meta["data_fingerprint"] == hashlib.sha256(
        "".join(f"{k}\n" for k in keys).encode()).hexdigest()
    assert meta["images"] == "16" and meta["splits"] == "train"

    run = medtl.train(data, backbone="mobilenet_v2", strategy="feature-extractor",
                      weights=str(out), image_size=32, epochs=3, out=tmp_path / "run",
                      engine="torch", quiet=True, threads=1)
    w = run.config["weights"]
    assert w["kind"] == "file" and w["method"] == "simclr"
    assert w["data_fingerprint"] == meta["data_fingerprint"]
    assert [(s["kind"], s["sha256"]) for s in w["chain"]] == [
        ("imagenet", start.weights_info.sha256)]
    # model.json's record reads back, checked, with the method; and the run's frozen backbone
    # holds the pretrained tensors, not ImageNet's.
    model_json = json.loads((run.path / "model" / "model.json").read_text())
    info = weights_info_from_dict(model_json["weights_info"])
    assert info.method == "simclr" and info.chain[0].kind == "imagenet"
    saved = load_file(str(run.path / "model" / "backbone.safetensors"))
    assert all(torch.equal(saved[k], after[k]) for k in after)


class _Stop(Exception):
    pass


def test_resume_after_one_epoch_is_bitwise_the_uninterrupted_run(data, tmp_path):
    # BYOL: the saved (online) encoder takes every optimizer step; DINO's teacher would not
    # show the last one (its momentum reaches 1 there).
    args = {"method": "byol", "start": "random", "epochs": 2, **FAST}
    straight = medtl.pretrain(data, tmp_path / "a.safetensors", **args)

    def stop(epoch: int) -> None:
        if epoch == 1:
            raise _Stop

    out = tmp_path / "b.safetensors"
    with pytest.raises(_Stop):
        medtl.pretrain(data, out, on_epoch_end=stop, **args)
    assert not out.exists() and (tmp_path / "b.safetensors.partial" / "checkpoint.pt").is_file()
    with pytest.raises(MedtlError, match="pass --resume"):
        medtl.pretrain(data, out, **args)
    with pytest.raises(MedtlError, match="epochs: 2 -> 3"):
        medtl.pretrain(data, out, resume=True, **{**args, "epochs": 3})
    # A new process starts with other generator states: none of them may matter.
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    resumed = medtl.pretrain(data, out, resume=True, **args)

    a, b = load_file(str(straight.path)), load_file(str(resumed.path))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    assert not (tmp_path / "b.safetensors.partial").exists()


@pytest.mark.parametrize(("method", "saved"), [("simclr", "encoder"), ("byol", "online encoder"),
                                               ("dino", "teacher")])
def test_each_method_takes_a_step_and_its_file_loads(data, tmp_path, method, saved):
    out = tmp_path / f"{method}.safetensors"
    # One batch of all 16 images: one optimizer step.
    result = medtl.pretrain(data, out, method=method, start="random", epochs=1,
                            **{**FAST, "batch_size": 16})
    assert len(result.history) == 1 and torch.isfinite(torch.tensor(result.history[0]["loss"]))
    assert result.metadata["saved"] == saved
    # Which network the file holds: after a single step DINO's teacher still has the start's
    # parameters (its momentum is 1 at the last step), the trained encoders do not.
    with seeded(0):
        start = create_backbone("mobilenet_v2", weights="random")
    params = [k for k, _ in start.named_parameters() if not k.startswith("classifier.")]
    file = load_file(str(out))
    same = [torch.equal(file[k], start.state_dict()[k]) for k in params]
    assert all(same) if method == "dino" else not any(same)
    bb = create_backbone("mobilenet_v2", weights=str(out))
    info = bb.weights_info
    assert info.kind == "file" and info.method == method
    assert [s.kind for s in info.chain] == ["random"]


def test_mistakes_are_one_line_before_anything_is_written(data, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    base = ["pretrain", data, "--from", "random", "--epochs", "1", "--image-size", "32",
            "--quiet", "--out", out]
    code, _, err = run_cli([*base, "--method", "mocov9"], capsys)
    assert code == 2 and "mocov9" in one_line_error(err) and "simclr" in err
    code, _, err = run_cli([*base, "--method", "simclr", "--splits", "train,test"], capsys)
    assert code == 2 and "test split is never used" in one_line_error(err)
    code, _, err = run_cli([*base, "--method", "simclr", "--splits", "val"], capsys)
    assert code == 2 and "no split val" in one_line_error(err)
    assert not out.exists() and not Path(f"{out}.partial").exists()
    out.write_bytes(b"mine")
    code, _, err = run_cli([*base, "--method", "simclr"], capsys)
    assert code == 2 and "--overwrite" in one_line_error(err)
    assert out.read_bytes() == b"mine"


def _record(**changes) -> dict:
    stage = {"kind": "imagenet", "source": "package:x", "path": None, "sha256": SHA}
    return {"kind": "file", "source": "file:/w.safetensors", "path": None, "sha256": SHA,
            "method": "byol", "data_fingerprint": FP, "chain": [stage], **changes}


def test_crafted_pretraining_records_are_refused():
    info = weights_info_from_dict(_record())
    assert info.method == "byol" and info.data_fingerprint == FP
    assert info.to_dict() == {**_record(), "chain": [{**_record()["chain"][0]}]}
    # Other kinds keep the record they always wrote.
    assert WeightsInfo("file", "file:/w", None, SHA).to_dict().keys() == {
        "kind", "source", "path", "sha256"}
    bad = {
        "method": _record(method="mocov9"),
        "method on another kind": _record(kind="imagenet"),
        "fingerprint": _record(data_fingerprint="../../etc/passwd"),
        "no fingerprint": _record(data_fingerprint=None),
        "nested chain": _record(chain=[{**_record(), "chain": [_record()["chain"][0]]}]),
        "long chain": _record(chain=[_record()["chain"][0]] * (MAX_CHAIN + 1)),
    }
    for name, record in bad.items():
        with pytest.raises(WeightsError):
            weights_info_from_dict(record)
            pytest.fail(f"accepted a crafted record ({name})")


def test_a_weights_file_with_crafted_metadata_is_refused(tmp_path):
    bb = create_backbone("mobilenet_v2", weights="random")
    bb.reset_classifier(0)
    path = tmp_path / "crafted.safetensors"
    start = json.dumps({"kind": "imagenet", "source": "package:x", "path": None, "sha256": SHA})
    save_file({k: v.contiguous() for k, v in bb.state_dict().items()}, str(path),
              metadata={"medtl_pretrain": "1", "method": "evil", "data_fingerprint": FP,
                        "start": start})
    with pytest.raises(WeightsError, match="evil"):
        create_backbone("mobilenet_v2", weights=str(path))


def test_the_model_card_names_the_pretraining_stage():
    from medtl.export.card import _chain_line, _weights_chain

    w = {"kind": "file", "source": "file:/data/kermany-simclr.safetensors", "sha256": "a" * 64,
         "method": "simclr", "data_fingerprint": "b" * 64,
         "chain": [{"kind": "imagenet", "source": "package:weights", "sha256": "c" * 64}]}
    assert _chain_line(_weights_chain(w)) == (
        "package:weights -> file:kermany-simclr.safetensors (self-supervised simclr on data "
        "bbbbbbbbbbbb)")
