"""auto on a saturated validation set: the decision rule, the frozen stage's heads chosen on
validation only, the plan and ETA, and --time-budget (the clock is replaced, nothing sleeps)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from medtl.data import load_dataset
from medtl.errors import MedtlError
from medtl.training.options import TrainOptions
from medtl.transfer import autoplan, gradual
from medtl.transfer.estimator import TransferClassifier
from medtl.transfer.fitted import FrozenModel
from medtl.transfer.gradual import StageResult, decide, val_figures
from medtl.transfer.strategies import FineTuneStrategy, _Climb

from ..conftest import write_blob_images


def stage(name: str, y: np.ndarray, proba: np.ndarray) -> StageResult:
    return StageResult(name, 0, epochs=1, best_epoch=1, seconds=0.0, trainable_params=0,
                       **val_figures(y, proba))


def two_class(p_right: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Probabilities that give each image's true class ``p_right``."""
    proba = np.empty((len(y), 2))
    proba[np.arange(len(y)), y] = p_right
    proba[np.arange(len(y)), 1 - y] = 1 - p_right
    return proba


# ------------------------------------------------------------------------------ the rule
def test_saturated_auc_is_decided_by_log_loss():
    y = np.array([0, 1] * 50)
    vague = stage("frozen", y, two_class(np.full(100, 0.6), y))
    sharp = stage("top 1", y, two_class(np.full(100, 0.95), y))
    assert vague.val_auc == sharp.val_auc == 1.0  # saturated: AUC cannot tell them apart
    assert vague.val_accuracy == sharp.val_accuracy == 1.0
    kept, why = decide(sharp, vague)
    assert kept and "log-loss" in why
    assert decide(vague, sharp)[0] is False  # and not the other way round


def test_auc_decides_when_it_clearly_differs():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 100)
    # 'ranks' separates better (AUC 0.945) but is vague (log-loss 0.68, accuracy 0.75);
    # 'sharp' ranks worse (0.932) yet is more accurate and confident: AUC decides.
    a = 0.5 + 0.01 * (y + 0.5 * rng.standard_normal(200))
    b = np.clip(0.2 + 0.6 * y + 0.3 * rng.standard_normal(200), 0.02, 0.98)
    ranks = stage("ranks", y, np.c_[1 - a, a])
    sharp = stage("sharp", y, np.c_[1 - b, b])
    assert ranks.val_auc - sharp.val_auc > 0.01 and ranks.val_auc < gradual.AUC_SATURATED
    assert sharp.val_log_loss < ranks.val_log_loss and sharp.val_accuracy > ranks.val_accuracy
    kept, why = decide(sharp, ranks)
    assert not kept and why.startswith("AUC")
    assert decide(ranks, sharp)[0] is True


def test_the_mri_example_goes_to_the_head_with_better_validation_accuracy():
    # Issue 17: macro AUC 0.99-0.995 for every candidate, validation accuracy 0.944 vs 0.959 on
    # about 1,140 images. The one with the lower AUC but higher accuracy must win.
    common = dict(epochs=1, best_epoch=1, seconds=0.0, trainable_params=0, n_val=1140)
    linear = StageResult("linear", 0, 0.995, val_accuracy=0.944, val_log_loss=0.15, **common)
    svm = StageResult("svm", 0, 0.990, val_accuracy=0.959, val_log_loss=0.16, **common)
    assert decide(svm, linear)[0] and not decide(linear, svm)[0]
    assert "accuracy" in decide(svm, linear)[1]
    # Below saturation a clear AUC gap still decides, as before.
    low = StageResult("low", 0, 0.90, val_accuracy=0.96, val_log_loss=0.1, **common)
    assert decide(low, linear)[0] is False


# ------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """Visible classes in train and val; the test split's labels swapped, so a choice made on
    test would be the opposite of one made on validation."""
    root = write_blob_images(tmp_path_factory.mktemp("auto") / "blobs", n_per_class=14,
                             splits=("train", "val"))
    write_blob_images(root, n_per_class=9, seed=1, splits=("test",))
    (root / "test" / "disc").rename(root / "test" / "tmp")
    (root / "test" / "bar").rename(root / "test" / "disc")
    (root / "test" / "tmp").rename(root / "test" / "bar")
    ds = load_dataset(root)
    return ds.split("train"), ds.split("val"), ds.split("test")


def test_heads_are_compared_on_validation_only_and_a_winning_hybrid_is_the_run(
        blobs, tmp_path, monkeypatch):
    from medtl.transfer import strategies
    from medtl.transfer.heads import HEADS, LinearHeadTrainer

    train, val, test = blobs
    seen: list[np.ndarray] = []
    original = gradual.val_figures

    def spy(y_true, proba):
        seen.append(np.asarray(y_true).copy())
        return original(y_true, proba)

    monkeypatch.setattr(gradual, "val_figures", spy)

    # A near-untrained linear head (lr 1e-7) and one hybrid head, kNN: kNN wins the frozen
    # stage; a first trainable stage that ends with a blank classifier cannot beat it, so the
    # run is kNN.
    class Weak(LinearHeadTrainer):
        def __init__(self, **kw):
            super().__init__(**{**kw, "lr": 1e-7, "epochs": 1})

    train_stage = FineTuneStrategy.train_stage

    def blanked(strategy, model, *args, **kw):
        result = train_stage(strategy, model, *args, **kw)
        model.network.classifier.weight.data.zero_()
        model.network.classifier.bias.data.zero_()
        return result

    monkeypatch.setattr(strategies, "LinearHeadTrainer", Weak)
    monkeypatch.setattr(strategies, "HEADS", {"knn": HEADS["knn"]})
    monkeypatch.setattr(FineTuneStrategy, "train_stage", blanked)
    clf = TransferClassifier(strategy="auto", unfreeze=1, epochs=1, image_size=64,
                             augment="none", quiet=True).fit(train, val)
    frozen = clf.stages_[0]
    assert [c["head"] for c in frozen["candidates"]] == ["linear", "knn"]
    assert all({"val_auc", "val_accuracy", "val_log_loss"} <= set(c)
               for c in frozen["candidates"])
    # Every figure the choice read was computed against the validation labels, never test's.
    assert seen and all(np.array_equal(s, val.labels) for s in seen)
    assert not any(np.array_equal(s, test.labels) for s in seen)
    assert frozen["head"] == "knn" and not clf.stages_[1]["accepted"], clf.stages_
    assert isinstance(clf.model_, FrozenModel) and clf.head_name_ == "knn"
    val_acc = np.mean(clf.predict(val) == val.labels)
    assert val_acc == pytest.approx(frozen["val_accuracy"])
    # Saved and loaded like any hybrid run.
    again = TransferClassifier.load(clf.save(tmp_path / "model"), quiet=True)
    np.testing.assert_array_equal(again.predict_proba(test), clf.predict_proba(test))
    rows = [r for r in clf.history_ if r.get("candidate")]
    assert [r["candidate"] for r in rows] == ["linear", "knn"]


class FakeClock:
    """``autoplan.now``: the frozen stage takes 20 s and each epoch 30 s, whatever the CPU."""

    def __init__(self, monkeypatch) -> None:
        self.t = 1000.0
        monkeypatch.setattr(autoplan, "now", lambda: self.t)
        frozen, train_stage = _Climb._frozen_stage, FineTuneStrategy.train_stage

        def slow_frozen(climb, *args):
            out = frozen(climb, *args)
            self.t += 20
            return out

        def slow_stage(strategy, *args, on_epoch_end=None, **kw):
            def tick(epoch):
                self.t += 30
                on_epoch_end(epoch)
            return train_stage(strategy, *args, on_epoch_end=tick, **kw)

        monkeypatch.setattr(_Climb, "_frozen_stage", slow_frozen)
        # kNN alone of the hybrid heads: the forest's grid is the slow part of the frozen stage.
        from medtl.transfer import strategies
        from medtl.transfer.heads import HEADS

        monkeypatch.setattr(strategies, "HEADS", {"knn": HEADS["knn"]})
        monkeypatch.setattr(FineTuneStrategy, "train_stage", slow_stage)


FAST = dict(strategy="auto", weights="random", image_size=32, augment="none", quiet=True)


def test_the_budget_skips_a_stage_that_cannot_finish_and_keeps_the_best(blobs, monkeypatch,
                                                                        caplog):
    train, val, _ = blobs
    FakeClock(monkeypatch)
    # Every stage counts as better, so only the budget can end this climb.
    monkeypatch.setattr(gradual, "decide", lambda new, best, min_delta=0: (True, "forced"))
    caplog.set_level(logging.INFO, logger="medtl")
    # 20 s + 30 s spent; 'fine-tune top 2' would need ~35 s more (30 s per epoch measured at
    # the top block, scaled by the blocks it trains): past 1.2 min, so it is not started.
    clf = TransferClassifier(**FAST, epochs=1, unfreeze=3, time_budget=1.2).fit(train, val)
    assert [s["stage"] for s in clf.stages_] == ["feature-extractor", "fine-tune top 1"]
    assert all(s["accepted"] for s in clf.stages_)
    assert ("time budget reached after stage 2 'fine-tune top 1' (0.8 min elapsed; budget "
            "0.4 min left; stage 3 'fine-tune top 2' would need about 0.6 min); kept stage 2 "
            "'fine-tune top 1'") in caplog.text
    # The plan is announced first, and the estimate follows the first stage.
    assert ("auto plan: 4 stages ('feature-extractor' -> 'fine-tune top 1' -> 'fine-tune top "
            "2' -> 'fine-tune top 3'), up to 1 epochs each; time budget 1.2 min") in caplog.text
    # After the frozen stage, a first estimate from the feature pass (CPU-dependent) ...
    assert re.search(r"auto: 0\.3 min elapsed; estimated [0-9.]+ min left for 3 more stage\(s\)"
                     r", [0-9.]+ s per epoch", caplog.text)
    # ... then from the measured epoch, which shows the rest cannot fit.
    assert ("auto: 0.8 min elapsed; estimated 0.0 min left for 0 more stage(s), 30.0 s per "
            "epoch with the top block trainable; 2 more would not fit the budget; 0.8 min in "
            "all; budget 0.4 min left") in caplog.text


def test_the_budget_ending_during_a_stage_stops_it_and_keeps_the_best(blobs, monkeypatch,
                                                                      caplog):
    train, val, _ = blobs
    FakeClock(monkeypatch)
    caplog.set_level(logging.INFO, logger="medtl")
    clf = TransferClassifier(**FAST, epochs=3, unfreeze=2, time_budget=1.0).fit(train, val)
    # 20 s + 2 epochs of 30 s = 80 s > 60 s: the second epoch ends the climb, not the third.
    assert [s["stage"] for s in clf.stages_] == ["feature-extractor", "fine-tune top 1"]
    stopped = clf.stages_[1]
    assert not stopped["accepted"] and stopped["epochs"] == 2
    assert stopped["decision"].startswith("stopped: time budget reached")
    assert ("time budget reached during stage 2 'fine-tune top 1'; kept stage 1 "
            "'feature-extractor'") in caplog.text


def test_the_budget_option_is_checked_and_may_change_on_resume():
    from medtl.transfer.strategies import RESUME_EXEMPT, AutoStrategy

    with pytest.raises(MedtlError, match="--time-budget 0"):
        TrainOptions(time_budget=0).check()
    assert AutoStrategy.takes("time_budget") and not FineTuneStrategy.takes("time_budget")
    # More time for an interrupted climb is not a different climb.
    assert "time_budget" in RESUME_EXEMPT


def test_the_plan_estimates_from_the_measured_epoch(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(autoplan, "now", lambda: clock["t"])
    stages = gradual.plan_stages(["a", "b", "c", "d"], full_name="full")
    plan = autoplan.ClimbPlan(stages, 4, epochs=2, budget_s=600.0)
    assert plan.left_s(stages[1:]) is None  # nothing measured yet: no estimate
    clock["t"] = 30.0
    plan.observe_frozen(30.0, feature_s=10.0)
    plan.observe_epoch(1, 15.0)  # f = 15 / (1 + 2/4) = 10 s
    assert plan.epoch_s(4) == pytest.approx(30.0)
    # Stages of 2 x 15, 2 x 20, 2 x 25 and 2 x 30 s: all but the last fit in 600 s.
    assert plan.left_s(stages[1:]) == pytest.approx(30 + 40 + 50 + 60)
    clock["t"] = 500.0
    assert plan.left_s(stages[1:]) == pytest.approx(30 + 40)
    assert "estimated 1.2 min left" in plan.progress(stages[1:])
    clock["t"] = 560.0
    assert plan.fits(stages[1]) and not plan.fits(stages[4]) and not plan.over()
    clock["t"] = 600.0
    assert plan.over()
