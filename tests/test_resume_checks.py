"""--resume refuses any change of request or data (issue 15): the draft records what was asked
(request.json) before any training, and a resume that differs in any setting but those saying
where and how verbosely it runs is refused in one line naming each difference; the training
loop's checkpoints and the auto climb's state refuse the same for Python callers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import medtl
import medtl.workflow
from medtl import run as bundle
from medtl.cli import main
from medtl.errors import MedtlError
from medtl.training.loop import TrainConfig, fit

from .conftest import blob_image, write_blob_images

OPTIONS = dict(strategy="full", weights="random", image_size=32, epochs=1, augment="none",
               quiet=True)


def _interrupted(monkeypatch, data: Path, out: Path, **options) -> None:
    """A run killed after training, before scoring: a draft with a checkpoint."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(medtl.workflow, "_split_metrics", killed)
        with pytest.raises(KeyboardInterrupt):
            medtl.train(data, out=out, **options)
    assert bundle.resumable(out)


def _draft_bytes(out: Path) -> dict[str, bytes]:
    d = bundle.partial_dir(out)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "log.txt"}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    return write_blob_images(tmp_path_factory.mktemp("rs") / "blobs", n_per_class=8)


def test_resume_refuses_any_change_in_one_line_and_continues_an_unchanged_run(
        blobs, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(blobs, data)
    out = tmp_path / "run"
    _interrupted(monkeypatch, data, out, **OPTIONS)
    before = _draft_bytes(out)
    assert "request.json" in before
    refused = {
        "--lr 0.001 -> 0.01": dict(OPTIONS, lr=1e-2),
        "--backbone 'mobilenet_v2' -> 'resnet18'": dict(OPTIONS, backbone="resnet18"),
        "--positive-class (none) -> 'bar'": dict(OPTIONS, positive_class="bar"),
        "--epochs 1 -> 3; --augment 'none' -> 'basic'": dict(OPTIONS, augment="basic",
                                                              epochs=3),
    }
    for said, options in refused.items():
        with pytest.raises(MedtlError, match="--resume refused") as err:
            medtl.train(data, out=out, resume=True, **options)
        message = str(err.value)
        assert "\n" not in message and f"run's: {said}. " in message, message
    # One image more: the data differ, named by count and fingerprint.
    extra = data / "train" / "disc" / "extra.png"
    Image.fromarray(blob_image(np.random.default_rng(9), "disc", 48)).save(extra)
    with pytest.raises(MedtlError, match=r"data images 32 -> 33; data fingerprint "
                                         r"[0-9a-f]{12} -> [0-9a-f]{12}\. ") as err:
        medtl.train(data, out=out, resume=True, **OPTIONS)
    assert "\n" not in str(err.value)
    # The CLI says it in one line and exits 2.
    with pytest.raises(SystemExit) as exc:
        main(["train", str(data), "--strategy", "full", "--weights", "random", "--image-size",
              "32", "--epochs", "1", "--augment", "none", "--quiet", "--out", str(out),
              "--resume"])
    err_text = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err_text.splitlines()) == 1
    assert "data images 32 -> 33" in err_text and "Traceback" not in err_text
    extra.unlink()
    # Nothing refused touched the draft or made the run; the same request then continues it,
    # and --device, --threads, --quiet may differ.
    assert _draft_bytes(out) == before and not out.exists()
    run = medtl.train(data, out=out, resume=True, **dict(OPTIONS, device="cpu", threads=1))
    assert run.metrics["timing"]["resumed_s"] > 0
    assert not (out / "request.json").exists() and not bundle.partial_dir(out).exists()


def test_the_auto_climb_and_cross_validation_folds_are_guarded(blobs, tmp_path, monkeypatch):
    from medtl.data import load_dataset
    from medtl.transfer.estimator import TransferClassifier
    from medtl.transfer.strategies import FineTuneStrategy

    # auto, interrupted as its first trainable stage starts: climb.pt holds the probe stage.
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    options = dict(OPTIONS, strategy="auto", epochs=1, unfreeze=1)
    out = tmp_path / "auto"
    with monkeypatch.context() as m:
        m.setattr(FineTuneStrategy, "train_stage", stopped)
        with pytest.raises(KeyboardInterrupt):
            medtl.train(blobs, out=out, **options)
    assert (bundle.partial_dir(out) / "checkpoints" / "climb.pt").is_file()
    with pytest.raises(MedtlError, match=r"run's: --unfreeze 1 -> 2\. "):
        medtl.train(blobs, out=out, resume=True, **dict(options, unfreeze=2))
    # From Python, the climb's own state refuses it too.
    ds = load_dataset(blobs)
    changed = {k: v for k, v in options.items() if k != "quiet"} | {"unfreeze": 2}
    with pytest.raises(MedtlError, match=r"climb.pt: cannot resume the climb with different "
                                         r"settings \(unfreeze: 1 -> 2; stages: "):
        TransferClassifier(**changed, quiet=True).fit(
            ds.split("train"), ds.split("val"), resume=True,
            checkpoint_dir=bundle.partial_dir(out) / "checkpoints")
    # Cross-validation: fold 1 finished, fold 2 interrupted; then another head is refused.
    cv = dict(strategy="hybrid", weights="random", image_size=32, quiet=True, folds=2)
    out = tmp_path / "cv"
    original = medtl.workflow._fit_and_write
    calls = []

    def second_fold_killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(medtl.workflow, "_fit_and_write", second_fold_killed)
        with pytest.raises(KeyboardInterrupt):
            medtl.train(blobs, out=out, **cv)
    with pytest.raises(MedtlError, match=r"run's: --head 'logreg' -> 'knn'\. "):
        medtl.train(blobs, out=out, resume=True, **dict(cv, head="knn"))
    fold1 = (bundle.partial_dir(out) / "folds" / "fold-1" / "config.json").read_bytes()
    run = medtl.train(blobs, out=out, resume=True, **cv)
    assert (out / "folds" / "fold-1" / "config.json").read_bytes() == fold1  # kept
    assert len(run.metrics["cv"]["per_fold"]) == 2
    assert run.config["positive_class"] == "disc" and run.metrics["positive_class"] == "disc"


class _Tiny(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def _groups(model: nn.Module, lr: float) -> list[dict]:
    return [{"name": "all", "params": list(model.parameters()), "lr": lr}]


def test_the_loop_refuses_other_learning_rates_data_or_network(tmp_path):
    """For Python callers of the loop (TransferClassifier.fit(resume=True)): before this, a
    changed rate was overridden by the saved optimizer, changed data continued silently and
    another network was a traceback."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (16, 8, 8, 3), dtype=torch.uint8, generator=g)
    y = torch.tensor([0, 1] * 8)
    cfg = TrainConfig(epochs=1, batch_size=8, patience=5)
    torch.manual_seed(0)
    fit(_Tiny(), _groups(_Tiny(), 1e-3), x, y, x, y, cfg, checkpoint_dir=tmp_path)
    model = _Tiny()
    with pytest.raises(MedtlError, match=r"learning rates: \{'all': 0.001\} -> "
                                         r"\{'all': 0.01\}"):
        fit(model, _groups(model, 1e-2), x, y, x, y, cfg, checkpoint_dir=tmp_path, resume=True)
    x2 = x.clone()
    x2[0, 0, 0, 0] ^= 1
    with pytest.raises(MedtlError, match=r"training data: sha256 [0-9a-f]{12} -> "):
        fit(model, _groups(model, 1e-3), x2, y, x, y, cfg, checkpoint_dir=tmp_path,
            resume=True)
    with pytest.raises(MedtlError, match=r"patience: 5 -> 3"):
        fit(model, _groups(model, 1e-3), x, y, x, y, TrainConfig(epochs=1, batch_size=8,
                                                                   patience=3),
            checkpoint_dir=tmp_path, resume=True)
    wide = _Tiny(width=6)
    with pytest.raises(MedtlError, match="holds another network"):
        fit(wide, _groups(wide, 1e-3), x, y, x, y, cfg, checkpoint_dir=tmp_path, resume=True)
    # Where it runs is not a change: threads and quiet may differ.
    fit(model, _groups(model, 1e-3), x, y, x, y,
        TrainConfig(epochs=1, batch_size=8, patience=5, threads=1, quiet=False),
        checkpoint_dir=tmp_path, resume=True)
