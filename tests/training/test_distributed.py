"""DDP training (medtl.training.distributed): two gloo processes on CPU train as one process on
the same global batch; the shares of a batch are disjoint and cover it.

Each test starts its processes itself (torch.multiprocessing, a free loopback port), as torchrun
would set them up; the end-to-end ``medtl train --devices 2`` is tests/test_ddp_run.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from medtl.training import distributed
from medtl.training.loop import TrainConfig, fit

from .test_loop import TinyNet, make_data

N_TRAIN, BATCH, EPOCHS = 30, 8, 3  # 30 = 3 full global batches and one of 6


class PlainNet(nn.Module):
    """No BatchNorm, no dropout: what one process and two compute alike. (BatchNorm sees each
    process's share of the batch unless --sync-bn, which PyTorch runs on GPUs only; dropout
    draws per process.)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class Interrupted(Exception):
    pass


def _stop_after(epoch: int):
    def hook(done: int) -> None:
        if done == epoch:
            raise Interrupted
    return hook


def _train(out: Path, tag: str, net: type[nn.Module] = PlainNet, *,
           checkpoint_dir: Path | None = None, resume: bool = False, on_epoch_end=None,
           ) -> None:
    """Train ``net``; write the history, the weights and the batch sizes this process saw."""
    torch.manual_seed(0)
    model = net()
    # 30 images, 10 of class 1: balanced class weights make the loss a weighted mean.
    x, y = make_data(N_TRAIN, seed=1, minority=0.3)
    xv, yv = make_data(16, seed=2)
    seen: list[int] = []
    model.register_forward_pre_hook(
        lambda m, args: seen.append(len(args[0])) if m.training else None)
    config = TrainConfig(epochs=EPOCHS, batch_size=BATCH, patience=EPOCHS, seed=3,
                         class_weight="balanced", mean=(0.5,) * 3, std=(0.25,) * 3,
                         threads=1)
    result = fit(model, [{"name": "all", "params": model.parameters(), "lr": 3e-3}],
                 x, y, xv, yv, config, checkpoint_dir=checkpoint_dir, resume=resume,
                 on_epoch_end=on_epoch_end)
    (out / f"{tag}.json").write_text(json.dumps({
        "loss": [r["train_loss"] for r in result.history],
        "val_auc": [r["val_auc"] for r in result.history], "seen": seen}))
    torch.save(model.state_dict(), out / f"{tag}.pt")


def _worker(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.join("cpu")
    try:
        _train(out, f"rank{rank}")
        _train(out, f"bn-rank{rank}", TinyNet)
        # Interrupted after epoch 1, then resumed from rank 0's checkpoint; TinyNet's dropout
        # draws from each process's own generator, whose state the checkpoint must restore.
        with contextlib.suppress(Interrupted):
            _train(out, "unused", TinyNet, checkpoint_dir=out / "ckpt",
                   on_epoch_end=_stop_after(1))
        _train(out, f"resumed-rank{rank}", TinyNet, checkpoint_dir=out / "ckpt", resume=True)
    finally:
        distributed.leave()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    _train(out, "single")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return out


def _read(out: Path, tag: str) -> tuple[dict, dict]:
    return (json.loads((out / f"{tag}.json").read_text()),
            torch.load(out / f"{tag}.pt", weights_only=True))


def test_two_processes_train_as_one_on_the_same_global_batch(trained):
    single, w1 = _read(trained, "single")
    rank0, w0 = _read(trained, "rank0")
    # Stated tolerance: float32 sums in another order (two halves, then gloo's all-reduce).
    assert rank0["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=1e-6)
    assert rank0["val_auc"] == pytest.approx(single["val_auc"], abs=1e-9)
    for name, t in w1.items():
        torch.testing.assert_close(w0[name], t, rtol=1e-4, atol=1e-5, msg=name)


def test_every_process_ends_with_the_same_weights(trained):
    _, w0 = _read(trained, "rank0")
    _, w1 = _read(trained, "rank1")
    for name, t in w0.items():
        assert torch.equal(t, w1[name]), name


def test_processes_with_batchnorm_and_dropout_stay_in_step(trained):
    """Each process's BatchNorm sees its own share and its dropout its own draws, but rank 0's
    running statistics are given to all at each epoch's end: every process then scores
    validation alike (the same early stopping) and ends with the same tensors."""
    h0, w0 = _read(trained, "bn-rank0")
    h1, w1 = _read(trained, "bn-rank1")
    assert h0["val_auc"] == h1["val_auc"]
    assert h0["loss"] == h1["loss"]  # the global batch's loss, reported alike
    for name, t in w0.items():
        assert torch.equal(t, w1[name]), name


def test_an_interrupted_ddp_fit_resumes_bitwise(trained):
    for rank in (0, 1):
        whole, w = _read(trained, f"bn-rank{rank}")
        again, w2 = _read(trained, f"resumed-rank{rank}")
        assert again["loss"] == whole["loss"]
        for name, t in w.items():
            assert torch.equal(t, w2[name]), (rank, name)


def test_each_process_trains_on_its_own_share_of_every_batch(trained):
    single, _ = _read(trained, "single")
    r0, _ = _read(trained, "rank0")
    r1, _ = _read(trained, "rank1")
    per_epoch = [BATCH] * (N_TRAIN // BATCH) + [N_TRAIN % BATCH]
    assert single["seen"] == per_epoch * EPOCHS
    # Every global batch split in two, the halves adding up to it: no sample twice, none lost.
    halves = [n // 2 for n in per_epoch] * EPOCHS
    assert r0["seen"] == halves and r1["seen"] == halves


def test_shards_are_disjoint_and_cover_the_batch():
    batch = torch.arange(11)
    groups = [distributed.Group(rank=r, world_size=3, local_rank=r, local_world_size=3,
                                backend="gloo") for r in range(3)]
    parts = [distributed.shard(batch, g) for g in groups]
    assert sorted(torch.cat(parts).tolist()) == list(range(11))
    assert distributed.shard(batch, None) is batch


def test_sync_bn_is_refused_on_cpu():
    from medtl.errors import MedtlError

    with pytest.raises(MedtlError, match="GPU"):
        distributed.check_sync_bn("cpu")
    distributed.check_sync_bn("cuda")  # allowed where PyTorch can do it
