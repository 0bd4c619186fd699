"""Mixup and CutMix (``--mix``, issue 17 point 5): the batch and loss by their formulas, the
training step only, resume, the --augment preset's default and the refusal by frozen strategies.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from medtl.errors import MedtlError
from medtl.training.loop import TrainConfig, epoch_indices, fit
from medtl.training.mixing import (
    CUTMIX_ALPHA,
    MIXUP_ALPHA,
    MixedBatch,
    mix_batch,
    mix_generator,
)
from medtl.training.options import TrainOptions
from tests.training.test_loop import TinyNet, groups, make_data
from tests.training.test_recipes import _inputs, _Stop, _StopAfter


@pytest.fixture(scope="module")
def data():
    return (*make_data(48, 1), *make_data(24, 2))


def _seeded_beta(seed: int, epoch: int, alpha: float) -> float:
    """The first Beta draw of the epoch's mixing stream, computed here from its definition."""
    return float(np.random.default_rng(np.random.SeedSequence([seed, epoch, 2])).beta(alpha,
                                                                                      alpha))


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 16, 20, generator=g), torch.arange(n) % 3


def test_mixup_is_the_convex_combination_with_the_seeded_lambda():
    x, y = _batch()
    out = mix_batch(x, y, "mixup", mix_generator(3, 1))
    lam = _seeded_beta(3, 1, MIXUP_ALPHA)
    assert out.kind == "mixup" and out.lam == lam and 0.0 <= lam <= 1.0
    torch.testing.assert_close(out.x, lam * x + (1 - lam) * x.flip(0))
    assert torch.equal(out.y_a, y) and torch.equal(out.y_b, y.flip(0))


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_pastes_one_box_whose_area_is_the_adjusted_lambda(seed):
    x, y = _batch()
    h, w = x.shape[-2:]
    out = mix_batch(x, y, "cutmix", mix_generator(seed, 1))
    assert out.kind == "cutmix"
    changed = (out.x != x).any(dim=(0, 1))  # (H, W): where another image was pasted
    top, bottom, left, right = out.box
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert torch.equal(changed, inside)
    assert torch.equal(out.x[..., inside], x.flip(0)[..., inside])
    assert torch.equal(out.x[..., ~inside], x[..., ~inside])
    assert out.lam == pytest.approx(1 - int(inside.sum()) / (h * w))
    # The box's sides are sqrt(1 - lambda) of the image's for the seeded Beta(1, 1) draw, less
    # what the borders clip.
    ratio = math.sqrt(1 - _seeded_beta(seed, 1, CUTMIX_ALPHA))
    assert bottom - top <= 2 * (int(h * ratio) // 2) and right - left <= 2 * (int(w * ratio) // 2)


def test_both_picks_each_kind_about_half_the_time():
    x, y = _batch()
    rng = mix_generator(0, 1)
    kinds = [mix_batch(x, y, "both", rng).kind for _ in range(400)]
    assert 150 < kinds.count("cutmix") < 250 and set(kinds) == {"mixup", "cutmix"}


def test_the_mixed_loss_is_the_lambda_weighted_loss_of_both_targets():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(8, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0]), label_smoothing=0.1)
    # lambda 1: the plain loss, class weights and label smoothing included.
    assert torch.equal(MixedBatch(None, y, y.flip(0), 1.0, "mixup").loss(weighted, logits),
                       weighted(logits, y))
    # Any lambda, plain cross-entropy: the loss of the mixed (soft) target, as mixup defines it.
    lam, plain = 0.3, nn.CrossEntropyLoss()
    soft = lam * nn.functional.one_hot(y, 3) + (1 - lam) * nn.functional.one_hot(y.flip(0), 3)
    torch.testing.assert_close(MixedBatch(None, y, y.flip(0), lam, "mixup").loss(plain, logits),
                               plain(logits, soft.float()))


def test_the_loop_trains_on_the_mixed_batch_and_loss(data):
    x, y = data[0], data[1]
    seed = 7  # lambda 0.78: near 0.5 the mixed batch is nearly symmetric under reversal,
    # and either target alone would give about the same loss
    torch.manual_seed(0)
    # A linear model: its logits differ from image to image, so the loss tells the targets
    # apart (a network whose output hardly depends on the image gives any permutation of the
    # labels the same mean loss).
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    with torch.no_grad():
        model[1].weight.mul_(10)  # confident: far from the log 2 of every label alike
    order = epoch_indices(y, seed=seed, epoch=1)
    lam = _seeded_beta(seed, 1, MIXUP_ALPHA)
    assert 0.7 < lam < 0.9
    with torch.no_grad():
        xin, yin = _inputs(x[order]), y[order]
        logits = model(lam * xin + (1 - lam) * xin.flip(0))
        expected = float(lam * nn.functional.cross_entropy(logits, yin)
                         + (1 - lam) * nn.functional.cross_entropy(logits, yin.flip(0)))
    cfg = TrainConfig(epochs=1, batch_size=len(y), seed=seed, mix="mixup")
    m = copy.deepcopy(model)
    hist = fit(m, groups(m), *data, cfg).history
    assert hist[0]["train_loss"] == pytest.approx(expected, rel=1e-5)


class _SeenInEval(TinyNet):
    """TinyNet that keeps every input it is given in eval mode (validation's)."""

    def __init__(self) -> None:
        super().__init__()
        self.eval_inputs: list[torch.Tensor] = []
        self.train_inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (self.train_inputs if self.training else self.eval_inputs).append(x.detach().clone())
        return super().forward(x)


def test_validation_never_sees_a_mixed_image(data, monkeypatch):
    import medtl.training.loop as loop

    calls = []
    real = loop.mix_batch
    monkeypatch.setattr(loop, "mix_batch", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = _SeenInEval()
    cfg = TrainConfig(epochs=2, batch_size=16, mix="both", seed=1)
    fit(model, groups(model), *data, cfg)
    assert len(calls) == 2 * 3  # every training batch, nothing else
    val_inputs = torch.cat(model.eval_inputs)
    expected = _inputs(data[2])
    assert len(val_inputs) == 2 * len(expected)
    torch.testing.assert_close(val_inputs[:len(expected)], expected)
    torch.testing.assert_close(val_inputs[len(expected):], expected)
    # ... while training did see mixed images (none of them is an unmixed training image).
    order = epoch_indices(data[1], seed=1, epoch=1)
    assert not torch.allclose(model.train_inputs[0], _inputs(data[0][order[:16]]))


def test_a_resumed_run_mixes_as_an_uninterrupted_one(data, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=16, patience=3, mix="both", seed=2)
    torch.manual_seed(0)
    start = TinyNet()
    whole = copy.deepcopy(start)
    plain = fit(whole, groups(whole), *data, cfg).history
    part = copy.deepcopy(start)
    with pytest.raises(_Stop):
        fit(part, groups(part), *data, cfg, checkpoint_dir=tmp_path, callbacks=[_StopAfter(2)])
    resumed = copy.deepcopy(start)
    history = fit(resumed, groups(resumed), *data, cfg, checkpoint_dir=tmp_path,
                  resume=True).history
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in plain]
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    # Other mixing is another training: refused, not silently continued.
    with pytest.raises(MedtlError, match="mix"):
        other = copy.deepcopy(start)
        fit(other, groups(other), *data, TrainConfig(**{**cfg.__dict__, "mix": "mixup"}),
            checkpoint_dir=tmp_path, resume=True)


def test_a_checkpoint_from_before_mix_resumes_as_unmixed_only(data, tmp_path):
    """A checkpoint written before --mix existed trained unmixed: it resumes with none and is
    refused with mixing; an unknown kind is refused by the loop itself."""
    from medtl.training.loop import CHECKPOINT_NAME, load_checkpoint, save_checkpoint

    cfg = TrainConfig(epochs=1, batch_size=48)
    model = TinyNet()
    fit(model, groups(model), *data, cfg, checkpoint_dir=tmp_path)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    del ckpt["config"]["mix"]
    save_checkpoint(tmp_path / CHECKPOINT_NAME, ckpt)
    with pytest.raises(MedtlError, match="mix: 'none' -> 'both'"):
        fit(model, groups(model), *data, TrainConfig(**{**cfg.__dict__, "mix": "both"}),
            checkpoint_dir=tmp_path, resume=True)
    fit(model, groups(model), *data, cfg, checkpoint_dir=tmp_path, resume=True)  # accepted
    with pytest.raises(MedtlError, match="--mix"):
        fit(model, groups(model), *data, TrainConfig(epochs=1, mix="cutout"))


def test_no_preset_mixes_by_default_and_an_explicit_value_wins():
    """Mixing is opt-in since it lowered validation AUC on BreastMNIST (issue 17)."""
    for augment in ("none", "basic", "strong"):
        assert TrainOptions(augment=augment).resolved_mix == "none"
    assert TrainOptions(augment="basic", mix="cutmix").resolved_mix == "cutmix"


@pytest.mark.parametrize(("augment", "resolved"), [("strong", "both"), ("basic", "none")])
def test_an_older_runs_unset_mix_reads_as_its_preset_did(augment, resolved):
    """Runs made while --augment strong implied both recorded options.mix = None: read back
    (resume, a loaded run) they keep what they trained with."""
    options = TrainOptions.from_mapping({"augment": augment, "mix": None})
    assert options.resolved_mix == resolved


def test_frozen_strategies_refuse_mix_but_not_the_strong_preset():
    from medtl.transfer.estimator import TransferClassifier

    for strategy in ("hybrid", "feature-extractor"):
        TransferClassifier(strategy=strategy, augment="strong").make_strategy()  # no refusal
        TransferClassifier(strategy=strategy, mix="none").make_strategy()
        with pytest.raises(MedtlError, match="--mix mixup"):
            TransferClassifier(strategy=strategy, mix="mixup").make_strategy()
    for strategy in ("auto", "fine-tune", "full", "scratch", "truncated"):
        TransferClassifier(strategy=strategy, mix="cutmix").make_strategy()
    with pytest.raises(MedtlError, match="--mix"):
        TrainOptions(mix="cutout").check()


def test_the_run_records_the_resolved_mix_and_the_loop_gets_it():
    """What config.json's strategy_params hold (Strategy.own_values) and what the training loop
    is given (NetworkModel.loop_config): the resolved value, the options keep what was asked."""
    from medtl.data.transforms import Preprocessing
    from medtl.models.registry import get_spec
    from medtl.transfer.estimator import TransferClassifier
    from medtl.transfer.fitted import NetworkModel

    for augment, mix, resolved in (("strong", "none", "none"), ("basic", "cutmix", "cutmix"),
                                   ("strong", "mixup", "mixup")):
        clf = TransferClassifier(strategy="full", augment=augment, mix=mix)
        assert clf.make_strategy().own_values()["mix"] == resolved
        assert clf.options.to_dict()["mix"] == mix
        pre = Preprocessing.for_spec(get_spec("mobilenet_v2"), 32)
        model = NetworkModel(TinyNet(), ["a", "b"], pre, clf.options.replace(device="cpu"))
        assert model.loop_config().mix == resolved


def test_cli_refuses_mix_for_hybrid_and_a_bad_value_in_one_line(tmp_path, capsys, monkeypatch):
    """Refused before any work: no training, no run directory."""
    from tests.conftest import write_blob_images
    from tests.test_cli import FAST, one_line_error, run_cli

    def no_training(*args, **kwargs):
        raise AssertionError("trained before refusing --mix")

    monkeypatch.setattr("medtl.training.loop.fit", no_training)
    monkeypatch.setattr("medtl.transfer.strategies.FrozenStrategy.fit", no_training)
    blobs = write_blob_images(tmp_path / "blobs", n_per_class=2, size=32,
                              splits=("train", "val"))
    for args in (["--strategy", "hybrid", "--mix", "mixup"],
                 ["--strategy", "feature-extractor", "--mix", "cutmix"],
                 ["--strategy", "full", "--mix", "cutout"]):
        code, _, err = run_cli(["train", blobs, *FAST, *args, "--out", tmp_path / "x"], capsys)
        line = one_line_error(err)
        assert code == 2 and "--mix" in line, line
        assert not (tmp_path / "x").exists()


@pytest.mark.slow  # two whole runs; the OOD detector's fit is most of it (about 25 s)
def test_cli_runs_record_the_mix_in_config_json(tmp_path, capsys):
    """--augment strong alone trains without mixing and --mix cutmix with it, recorded in
    config.json; a tampered recorded value is refused when the run is opened."""
    import medtl
    from tests.conftest import write_blob_images
    from tests.test_cli import run_cli

    blobs = write_blob_images(tmp_path / "blobs", n_per_class=6, size=32,
                              splits=("train", "val"))
    common = ["--backbone", "mobilenet_v2", "--weights", "random", "--image-size", "32",
              "--epochs", "1", "--batch-size", "8", "--quiet", "--strategy", "full"]
    seen: list[str] = []
    real_fit = fit

    def spy(*args, **kwargs):
        seen.append(args[6].mix)
        return real_fit(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("medtl.training.loop.fit", spy)
        for name, extra in (("strong", []), ("cutmix", ["--mix", "cutmix"])):
            code, _, err = run_cli(["train", blobs, *common, "--augment", "strong", *extra,
                                    "--out", tmp_path / name], capsys)
            assert code in (0, None), err
    assert seen == ["none", "cutmix"]
    for name in ("strong", "cutmix"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["strategy_params"]["mix"] == config["options"]["mix"] == name.replace(
            "strong", "none")
    meta_path = tmp_path / "strong" / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["params"]["mix"] = "both\n; rm -rf"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(MedtlError, match="mix"):
        medtl.load_run(tmp_path / "strong")
