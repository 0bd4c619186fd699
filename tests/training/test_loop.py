"""The shared training loop: learning, determinism, SIGKILL-safe resume, frozen parts, imbalance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from medtl.errors import MedtlError
from medtl.training.loop import (
    CHECKPOINT_NAME,
    TrainConfig,
    epoch_indices,
    fit,
    load_checkpoint,
    predict_proba,
)


def make_data(n: int, seed: int, minority: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """32x32 RGB uint8: class 1 a bright disc, class 0 a bright bar, at random places, on noise."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < minority).long()
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    imgs = torch.rand(n, 32, 32, generator=g) * 80
    for i in range(n):
        cy, cx = torch.randint(10, 22, (2,), generator=g).tolist()
        if y[i] == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
        else:
            mask = ((yy - cy).abs() <= 1) & ((xx - cx).abs() <= 8)
        imgs[i][mask] = 230
    x = imgs.to(torch.uint8).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
    return x, y


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.1)  # draws from the global RNG, which a resume must restore
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(self.drop(x.mean(dim=(2, 3))))


def groups(model: nn.Module, lr: float = 1e-2) -> list[dict]:
    return [{"name": "all", "params": [p for p in model.parameters() if p.requires_grad],
             "lr": lr}]


@pytest.fixture(scope="module")
def data():
    return (*make_data(160, 1), *make_data(64, 2))


def test_learns_the_shapes(data):
    torch.manual_seed(0)
    model = TinyNet()
    cfg = TrainConfig(epochs=4, batch_size=16, warmup_epochs=0.5, patience=10)
    result = fit(model, groups(model), *data, cfg)
    assert result.best_val_auc > 0.9
    assert not model.training
    h = result.history
    assert [e["epoch"] for e in h] == [1, 2, 3, 4]
    assert set(h[0]) == {"epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "lr_all",
                         "trainable_params", "seconds"}
    assert h[0]["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert h[-1]["lr_all"] < h[1]["lr_all"]  # the cosine decays
    proba = predict_proba(model, data[2], cfg)
    assert proba.dtype.name == "float64" and proba.shape == (64, 2)
    assert abs(proba.sum(axis=1) - 1).max() < 1e-9


def test_same_seed_is_identical(data):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TinyNet()
        cfg = TrainConfig(epochs=2, batch_size=32, seed=3)
        result = fit(model, groups(model), *data, cfg, augment=_flip)
        runs.append((result.history, model.state_dict()))
    # Everything but the wall time of each epoch.
    assert [{**h, 'seconds': 0} for h in runs[0][0]] == [{**h, 'seconds': 0} for h in runs[1][0]]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=g, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def resumable_run(ckpt: str, resume: bool, kill_at: int) -> tuple[dict, dict]:
    """The run the SIGKILL test interrupts, in a subprocess, and repeats without a break."""
    torch.manual_seed(0)
    model = TinyNet()
    x, y = make_data(96, 1)
    xv, yv = make_data(32, 2)
    cfg = TrainConfig(epochs=4, batch_size=16, seed=7, patience=10)
    epochs_run = []

    def on_epoch_end(epoch: int) -> None:
        epochs_run.append(epoch)
        if epoch == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    result = fit(model, groups(model), x, y, xv, yv, cfg, checkpoint_dir=ckpt or None,
                 resume=resume, augment=_flip, on_epoch_end=on_epoch_end)
    summary = {"history": result.history, "best_epoch": result.best_epoch,
               "epochs_run": epochs_run, "resumed_s": result.resumed_s}
    return json.loads(json.dumps(summary)), model.state_dict()


SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, {tests!r})
    from training.test_loop import resumable_run

    out, ckpt, resume, kill_at = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    summary, state = resumable_run(ckpt, resume, kill_at)
    torch.save(state, out + ".pt")
    with open(out + ".json", "w") as f:
        json.dump(summary, f)
""")


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).resolve().parents[1])))

    def run(out: str, resume: bool, kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), str(tmp_path / out), str(ckpt_dir), str(int(resume)),
             str(kill_at)], capture_output=True, text=True, timeout=120,
        )

    ckpt_dir = tmp_path / "ckpt"
    killed = run("killed", False, 2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_checkpoint(ckpt_dir / CHECKPOINT_NAME)["epoch"] == 2
    assert not list(ckpt_dir.glob("*.tmp"))
    resumed = run("resumed", True, -1)
    assert resumed.returncode == 0, resumed.stderr

    a = json.loads((tmp_path / "resumed.json").read_text())
    b, wb = resumable_run("", False, -1)  # uninterrupted, no checkpoints, in this process
    assert a.pop("epochs_run") == [3, 4]  # it continued, not started again
    assert b.pop("epochs_run") == [1, 2, 3, 4]
    assert len(a["history"]) == 4
    # The killed process's two epochs still count in the run's training time.
    seconds = [row.pop("seconds") for row in a["history"]]
    assert all(s > 0 for s in seconds)
    assert a.pop("resumed_s") == pytest.approx(sum(seconds[:2]))
    assert b.pop("resumed_s") == 0.0
    for row in b["history"]:
        row.pop("seconds")
    assert a == b
    wa = torch.load(tmp_path / "resumed.pt")
    for k, v in wa.items():
        assert torch.equal(v, wb[k]), k


def test_truncated_checkpoint_is_refused(tmp_path, data):
    torch.manual_seed(0)
    model = TinyNet()
    cfg = TrainConfig(epochs=1, batch_size=64)
    fit(model, groups(model), *data, cfg, checkpoint_dir=tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    assert load_checkpoint(path)["epoch"] == 1
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MedtlError, match=CHECKPOINT_NAME):
        load_checkpoint(path)
    with pytest.raises(MedtlError, match="damaged or incomplete"):
        fit(TinyNet(), groups(TinyNet()), *data, cfg, checkpoint_dir=tmp_path, resume=True)


def test_resume_refuses_changed_settings(tmp_path, data):
    model = TinyNet()
    fit(model, groups(model), *data, TrainConfig(epochs=1, batch_size=64),
        checkpoint_dir=tmp_path)
    with pytest.raises(MedtlError, match="batch_size"):
        fit(model, groups(model), *data, TrainConfig(epochs=1, batch_size=32),
            checkpoint_dir=tmp_path, resume=True)


def test_frozen_parts_and_eval_batchnorm_unchanged(data):
    torch.manual_seed(0)
    model = TinyNet()
    for p in [*model.conv1.parameters(), *model.bn1.parameters()]:
        p.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.state_dict().items()
              if k.startswith(("conv1.", "bn1."))}
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def keep_bn1_eval(m: TinyNet) -> None:
        m.train()
        m.bn1.eval()

    result = fit(model, groups(model), *data, TrainConfig(epochs=2, batch_size=32),
                 train_mode=keep_bn1_eval)
    after = model.state_dict()
    assert "bn1.running_mean" in frozen and "bn1.num_batches_tracked" in frozen
    for k, v in frozen.items():
        assert torch.equal(v, after[k]), k
    for k in ("conv2.weight", "bn2.weight", "bn2.running_mean", "head.weight"):
        assert not torch.equal(before[k], after[k]), k
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result.history[0]["trainable_params"] == n_trainable


def test_balanced_sampler_and_class_weight(data):
    x, y = make_data(200, 5, minority=0.15)
    n_min = int(y.sum())
    assert 10 < n_min < 50
    drawn = epoch_indices(y, seed=0, epoch=1, balanced=True)
    assert len(drawn) == len(y)
    minority_draws = int(y[drawn].sum())
    assert 0.4 < minority_draws / len(y) < 0.6
    assert not torch.equal(drawn, epoch_indices(y, seed=0, epoch=2, balanced=True))
    assert torch.equal(drawn, epoch_indices(y, seed=0, epoch=1, balanced=True))

    torch.manual_seed(0)
    model = TinyNet()
    cfg = TrainConfig(epochs=1, batch_size=50, class_weight="balanced", sampler="balanced")
    result = fit(model, groups(model), x, y, data[2], data[3], cfg)
    assert result.history[0]["train_loss"] > 0
    with pytest.raises(MedtlError, match="sampler"):
        fit(model, groups(model), x, y, data[2], data[3], TrainConfig(sampler="uniform"))
