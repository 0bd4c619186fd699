"""Training recipes of issue 17 point 5 in the loop: label smoothing and an EMA of the weights.

Each check is against the formula, computed by hand: the smoothed loss of the first batch, the
EMA after every optimizer step, and a resume that continues the EMA where it stopped.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medtl.errors import MedtlError
from medtl.training.loop import CHECKPOINT_NAME, Callback, TrainConfig, fit, load_checkpoint
from tests.training.test_loop import TinyNet, groups, make_data

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def data():
    return (*make_data(48, 1), *make_data(24, 2))


def _inputs(x: torch.Tensor) -> torch.Tensor:
    """The loop's normalisation of uint8 NHWC images (ImageInputs with no augmentation)."""
    xf = x.permute(0, 3, 1, 2).float() / 255.0
    return (xf - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_label_smoothing_changes_the_training_loss_by_the_formula(data):
    x, y = data[0], data[1]
    eps = 0.2
    torch.manual_seed(0)
    model = TinyNet().eval()  # dropout off, so the first batch's loss is deterministic here
    with torch.no_grad():
        logits = model(_inputs(x))
        logp = torch.log_softmax(logits, 1)
        nll = nn.functional.nll_loss(logp, y)
        expected = float((1 - eps) * nll - eps * logp.mean(1).mean())
    # One step over the whole set: the recorded train loss is the loss of the initial weights.
    m = copy.deepcopy(model)
    cfg = TrainConfig(epochs=1, batch_size=len(y), label_smoothing=eps, patience=5)
    hist = fit(m, groups(m), *data, cfg, train_mode=lambda mod: mod.eval()).history
    assert hist[0]["train_loss"] == pytest.approx(expected, rel=1e-5)
    plain = copy.deepcopy(model)
    cfg0 = TrainConfig(epochs=1, batch_size=len(y), patience=5)
    hist0 = fit(plain, groups(plain), *data, cfg0, train_mode=lambda mod: mod.eval()).history
    assert hist0[0]["train_loss"] == pytest.approx(float(nll), rel=1e-5)
    # Validation loss stays plain cross-entropy (of the weights after the step).
    with torch.no_grad():
        val_ce = float(nn.functional.cross_entropy(m.float()(_inputs(data[2])), data[3]))
    assert hist[0]["val_loss"] == pytest.approx(val_ce, rel=1e-5)


class _Record(Callback):
    """The raw and the EMA weights at the end of each epoch, and what early stopping kept."""

    def __init__(self) -> None:
        self.raw: list[dict] = []
        self.ema: list[dict] = []
        self.kept: dict[int, dict] = {}  # epoch -> the state early stopping kept at it

    def on_epoch_end(self, state) -> None:
        self.raw.append(copy.deepcopy(state.model.state_dict()))
        if state.best["epoch"] == state.epoch:
            self.kept[state.epoch] = copy.deepcopy(state.best["state"])
        if state.ema is not None:
            self.ema.append(copy.deepcopy(state.ema.module.state_dict()))


def test_ema_weights_equal_the_manual_ema_and_are_what_is_kept(data):
    decay, n = 0.7, 5
    # One optimizer step per epoch: the raw weights after each step are recorded.
    # A small constant rate: validation improves every epoch, so every epoch's EMA is kept.
    cfg = TrainConfig(epochs=n, batch_size=len(data[1]), patience=n, seed=1,
                      schedule="constant")
    torch.manual_seed(0)
    start = TinyNet()
    raw_run = _Record()
    m0 = copy.deepcopy(start)
    fit(m0, groups(m0, 1e-3), *data, cfg, callbacks=[raw_run])
    ema_run = _Record()
    m1 = copy.deepcopy(start)
    result = fit(m1, groups(m1, 1e-3), *data, TrainConfig(**{**cfg.__dict__, "ema": decay}),
                 callbacks=[ema_run])
    # The EMA does not change the training itself: the same raw weights, step by step.
    for a, b in zip(raw_run.raw, ema_run.raw, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    manual = None
    for t, w in enumerate(raw_run.raw):
        manual = ({k: v.clone() for k, v in w.items()} if manual is None else
                  {k: (decay * manual[k] + (1 - decay) * w[k]) if v.is_floating_point() else w[k]
                   for k, v in w.items()})
        for k, v in manual.items():
            if v.is_floating_point():
                torch.testing.assert_close(ema_run.ema[t][k], v, rtol=1e-5, atol=1e-6)
    # What early stopping keeps, fit returns and a run saves is the EMA, not the raw weights.
    later = [e for e, kept in ema_run.kept.items() if e > 1]
    assert later, "no epoch after the first improved: the check below would prove nothing"
    for e in later:
        kept = ema_run.kept[e]
        assert all(torch.equal(kept[k], ema_run.ema[e - 1][k]) for k in kept)
        assert not all(torch.equal(kept[k], ema_run.raw[e - 1][k]) for k in kept)
    best = ema_run.ema[result.best_epoch - 1]
    assert all(torch.equal(m1.state_dict()[k], best[k]) for k in best)


class _Stop(Exception):
    pass


class _StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, state) -> None:
        if state.epoch == self.epoch:
            raise _Stop


def test_a_resumed_run_continues_the_ema(data, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=16, patience=3, ema=0.9)
    torch.manual_seed(0)
    start = TinyNet()
    whole = copy.deepcopy(start)
    fit(whole, groups(whole), *data, cfg)
    part = copy.deepcopy(start)
    with pytest.raises(_Stop):
        fit(part, groups(part), *data, cfg, checkpoint_dir=tmp_path, callbacks=[_StopAfter(2)])
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt["ema"] is not None and int(ckpt["ema"]["n_averaged"]) == 2 * 3
    resumed = copy.deepcopy(start)
    fit(resumed, groups(resumed), *data, cfg, checkpoint_dir=tmp_path, resume=True)
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    # Another decay is another training: refused, not silently mixed.
    with pytest.raises(MedtlError, match="ema"):
        other = copy.deepcopy(start)
        fit(other, groups(other), *data, TrainConfig(**{**cfg.__dict__, "ema": 0.5}),
            checkpoint_dir=tmp_path, resume=True)


@pytest.mark.parametrize("bad", [dict(label_smoothing=1.0), dict(label_smoothing=-0.1),
                                 dict(ema=1.0), dict(ema=0.0)])
def test_out_of_range_recipes_are_refused(data, bad):
    m = TinyNet()
    with pytest.raises(MedtlError):
        fit(m, groups(m), *data, TrainConfig(epochs=1, **bad))


def test_the_options_reach_the_loop_are_recorded_and_bad_values_refused(tmp_path, capsys):
    """The estimator's options reach the loop and the saved run; the CLI flags exit 2 on a bad
    value before any work; a recorded value is checked when a shared run is opened."""
    import json

    import medtl
    from medtl.transfer.estimator import TransferClassifier
    from tests.conftest import write_blob_images
    from tests.test_cli import one_line_error, run_cli

    data = write_blob_images(tmp_path / "blobs", n_per_class=6, size=32,
                             splits=("train", "val"))
    ds = medtl.load_dataset(data)
    seen: list[tuple] = []
    real_fit = fit

    def spy(*args, **kwargs):
        seen.append((args[6].label_smoothing, args[6].ema))
        return real_fit(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("medtl.training.loop.fit", spy)
        clf = TransferClassifier("mobilenet_v2", strategy="full", weights="random",
                                 image_size=32, epochs=1, augment="none", quiet=True,
                                 label_smoothing=0.1, ema=0.9)
        clf.fit(ds.split("train"), ds.split("val"))
    assert seen == [(0.1, 0.9)]
    out = medtl.save_run(clf, tmp_path / "run").path
    meta = json.loads((out / "model" / "model.json").read_text())
    assert (meta["params"]["label_smoothing"], meta["params"]["ema"]) == (0.1, 0.9)
    meta["params"]["ema"] = "0.9; rm -rf"
    (out / "model" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(MedtlError, match="ema"):
        medtl.load_run(out)
    common = ["--strategy", "full", "--weights", "random", "--quiet"]
    for flag, value in (("--label-smoothing", "1"), ("--ema", "1.5")):
        code, _, err = run_cli(["train", data, *common, flag, value, "--out", tmp_path / "x"],
                               capsys)
        assert code == 2 and flag in one_line_error(err)
