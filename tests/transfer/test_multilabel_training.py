"""Issue 21, training: multi-label targets (an (n, K) float matrix, NaN unknown) through the loop,
the linear and one-vs-rest heads, every strategy and the fitted model.

The synthetic set: each image shows a disc, a bar, both or neither (labels "disc", "bar"), some
targets unknown (NaN). Unknown targets must never reach a loss, a gradient, a head or a score.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medtl.data.dataset import Dataset, Record
from medtl.errors import MedtlError
from medtl.training import distributed, loop
from medtl.training.loop import (
    Inputs,
    MaskedBCEWithLogits,
    TrainConfig,
    data_digest,
    masked_bce_parts,
    positive_weights,
)
from medtl.training.options import TrainOptions
from medtl.training.selection import known_accuracy, mean_label_auc, selection_score
from medtl.transfer import estimator, gradual, strategies
from medtl.transfer.estimator import TransferClassifier
from medtl.transfer.fitted import FittedModel, FrozenModel, NetworkModel
from medtl.transfer.freezing import frozen_blocks
from medtl.transfer.gradual import val_figures
from medtl.transfer.heads import HEADS, LinearHeadTrainer, MaskedOneVsRest, SklearnHead
from medtl.transfer.strategies import FineTuneStrategy, HybridStrategy

from ..conftest import blob_image

LABELS = ["disc", "bar"]
NAN = float("nan")
# engine torch: on 32-px images the frozen features need no ONNX export (seconds per test)
FAST = dict(image_size=32, augment="none", quiet=True, threads=1, engine="torch")


def shapes_image(rng: np.random.Generator, disc: bool, bar: bool, size: int = 48) -> np.ndarray:
    img = rng.integers(0, 60, (size, size), dtype=np.uint8)
    for shape, on in (("disc", disc), ("bar", bar)):
        if on:
            img = np.maximum(img, blob_image(rng, shape, size))
    return img


def write_two_label_set(root, n_train: int = 24, n_val: int = 12, n_test: int = 8,
                        seed: int = 0) -> Dataset:
    """Every combination of disc and bar in turn; every fifth image's disc target unknown."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            disc, bar = i % 2, (i // 2) % 2
            path = root / f"{split}_{i:03d}.png"
            Image.fromarray(shapes_image(rng, bool(disc), bool(bar))).save(path)
            targets = (NAN if i % 5 == 4 else float(disc), float(bar))
            records.append(Record(str(path), 0, split, f"{split}{i}", targets=targets))
    return Dataset(records, LABELS)


@pytest.fixture(scope="module")
def two_label(tmp_path_factory):
    ds = write_two_label_set(tmp_path_factory.mktemp("multilabel") / "images")
    assert ds.multilabel
    return ds.split("train"), ds.split("val"), ds.split("test")


STRATEGY_PARAMS = {
    "feature-extractor": dict(strategy="feature-extractor"),
    # --calibrate: skipped for multi-label, with a log line (test below)
    "hybrid": dict(strategy="hybrid", head="logreg", calibrate=True),
    "fine-tune": dict(strategy="fine-tune", weights="random", epochs=1),
    "full": dict(strategy="full", weights="random", epochs=1),
    "auto": dict(strategy="auto", weights="random", epochs=1, unfreeze=1),
}


# One frozen and one network model fit the out-of-distribution detector: it reads features only.
WITH_OOD = ("feature-extractor", "fine-tune")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def fitted(two_label):
    """Each strategy fitted once on the two-label set (on first use), with its log lines."""
    train, val, _ = two_label
    cache: dict[str, tuple[TransferClassifier, list[str], list]] = {}

    def get(name: str) -> tuple[TransferClassifier, list[str], list]:
        """The fitted classifier, its log lines, and the (y, proba) auto's decisions read."""
        if name not in cache:
            seen: list[tuple[np.ndarray, np.ndarray]] = []

            def spy(y_true, proba, figures=gradual.val_figures):
                seen.append((np.asarray(y_true).copy(), np.asarray(proba).copy()))
                return figures(y_true, proba)

            logger = logging.getLogger("medtl")
            handler, level = _Lines(), logger.level
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            try:
                with pytest.MonkeyPatch.context() as mp:
                    # auto's frozen stage: two hybrid heads (the forest's 300 trees a label
                    # and grid point are the slow part, and add nothing here)
                    mp.setattr(strategies, "HEADS",
                               {k: HEADS[k] for k in ("logreg", "prototype")})
                    mp.setattr(gradual, "val_figures", spy)
                    if name not in WITH_OOD:  # 2 s of CPU a fit (a 1280-dim Cholesky)
                        mp.setattr(estimator, "fit_ood", lambda *a, **kw: None)
                    clf = TransferClassifier(**FAST, **STRATEGY_PARAMS[name]).fit(train, val)
            finally:
                logger.removeHandler(handler)
                logger.setLevel(level)
            cache[name] = (clf, handler.lines, seen)
        return cache[name]
    return get


# ------------------------------------------------------------------------------ the criterion
def _loss_and_grad(logits: torch.Tensor, target: torch.Tensor, mask=None, pos_weight=None):
    z = logits.clone().requires_grad_(True)
    total, count = masked_bce_parts(z, target, pos_weight, mask)
    loss = total / count.clamp(min=1)
    loss.backward()
    return float(loss.detach()), z.grad.clone()


def test_masked_entries_never_reach_the_loss_or_its_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g)
    target = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 1]],
                          dtype=torch.float32)
    mask = torch.ones_like(target, dtype=torch.bool)
    mask[1, 2] = mask[4, 0] = mask[5, 1] = False
    pw = torch.tensor([2.0, 0.5, 1.5])
    base = _loss_and_grad(logits, target, mask, pw)
    flipped = target.clone()
    flipped[~mask] = 1 - flipped[~mask]  # the would-be values of the masked targets, flipped
    for other in (flipped, torch.where(mask, target, torch.zeros_like(target)),
                  torch.where(mask, target, torch.ones_like(target)),
                  torch.where(mask, target, torch.full_like(target, NAN))):
        loss, grad = _loss_and_grad(logits, other, mask, pw)
        assert loss == base[0]
        assert torch.equal(grad, base[1])
    assert (base[1][~mask] == 0).all()
    # Without the mask the flipped targets count, and the figures change.
    loss, grad = _loss_and_grad(logits, flipped, None, pw)
    assert loss != base[0] and not torch.equal(grad, base[1])
    # NaN is the mask by default: the criterion the loop uses gives the same numbers.
    with_nan = torch.where(mask, target, torch.full_like(target, NAN))
    z = logits.clone().requires_grad_(True)
    crit = MaskedBCEWithLogits(pw)(z, with_nan)
    crit.backward()
    assert float(crit.detach()) == base[0] and torch.equal(z.grad, base[1])
    # The value: the mean over the known entries of the weighted binary cross-entropy.
    p = torch.sigmoid(logits.double())
    each = -(pw.double() * target * torch.log(p) + (1 - target) * torch.log1p(-p))
    assert base[0] == pytest.approx(float(each[mask].mean()), rel=1e-6)


def test_a_batch_without_any_known_target_gives_zero_loss_and_zero_gradient():
    z = torch.randn(4, 2).requires_grad_(True)
    loss = MaskedBCEWithLogits(torch.tensor([3.0, 0.2]))(z, torch.full((4, 2), NAN))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(z.grad, torch.zeros(4, 2))


def test_pos_weight_is_negatives_over_positives_of_the_known_training_targets():
    y = np.array([[1, 0, NAN], [0, 0, 1], [NAN, 1, 1], [0, 0, NAN], [1, NAN, 1], [0, 0, 1]],
                 dtype=np.float32)
    # disc: 2 positives, 3 negatives; bar: 1 and 4; third: 4 positives, no negative -> 1.
    np.testing.assert_allclose(positive_weights(y), [3 / 2, 4 / 1, 1.0])
    # What the loop's criterion holds with class weighting on (and none without).
    x = torch.zeros(len(y), 3)
    yt = torch.from_numpy(y)
    _, crit = loop._start(torch.nn.Linear(3, 3), [{"name": "h", "params": [], "lr": 1e-3}],
                          yt, yt, TrainConfig(class_weight="balanced"), torch.device("cpu"))
    assert isinstance(crit, MaskedBCEWithLogits)
    np.testing.assert_allclose(crit.pos_weight.numpy(), [1.5, 4.0, 1.0])
    _, plain = loop._start(torch.nn.Linear(3, 3), [{"name": "h", "params": [], "lr": 1e-3}],
                           yt, yt, TrainConfig(), torch.device("cpu"))
    assert plain.pos_weight is None
    Inputs().check(x, yt, "train")  # 2-D float targets with NaN are accepted


def test_targets_other_than_one_zero_or_unknown_are_refused():
    x = torch.zeros(3, 4)
    with pytest.raises(MedtlError, match="1, 0 or NaN"):
        Inputs().check(x, torch.tensor([[1.0, 0.5], [0, 1], [1, 1]]), "train")
    with pytest.raises(MedtlError, match="no known target"):
        Inputs().check(x, torch.full((3, 2), NAN), "val")


def test_under_ddp_the_shares_losses_average_to_the_global_batch_mean(monkeypatch):
    """Each process's part is its known entries' sum over the global known count, times N: DDP
    averaging the two parts' gradients gives the gradient of the global batch's mean."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 2, generator=g)
    target = torch.tensor([[1, 0], [NAN, 1], [0, 0], [1, NAN], [NAN, NAN], [0, 1], [1, 1],
                           [0, NAN]])
    crit = MaskedBCEWithLogits(torch.tensor([2.0, 0.5]))
    whole = logits.clone().requires_grad_(True)
    crit(whole, target).backward()
    halves = (slice(0, 4), slice(4, 8))
    total_known = float((~torch.isnan(target)).sum())
    monkeypatch.setattr(distributed, "all_sum", lambda value, group: torch.tensor(total_known))
    group = distributed.Group(rank=0, world_size=2, local_rank=0, local_world_size=2,
                              backend="gloo")
    loss = loop._global_mean(crit, group)
    parts = logits.clone().requires_grad_(True)
    averaged = sum(loss(parts[h], target[h]) for h in halves) / 2  # DDP's mean of the parts
    averaged.backward()
    assert float(averaged.detach()) == pytest.approx(float(crit(logits, target)), rel=1e-6)
    torch.testing.assert_close(parts.grad, whole.grad)


def test_nan_targets_hash_alike_whatever_their_bits():
    a = torch.tensor([[1.0, NAN], [0.0, 1.0]])
    b = a.clone()
    b.view(torch.int32)[0, 1] = 0x7FC00001  # another NaN payload
    assert torch.isnan(b[0, 1])
    assert data_digest(a) == data_digest(b)
    assert data_digest(a) != data_digest(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


# ------------------------------------------------------------------------------ scores
def test_validation_scores_average_labels_over_their_known_rows():
    y = np.array([[1, 0], [0, NAN], [1, 1], [NAN, 0], [0, 1]])
    p = np.array([[0.9, 0.2], [0.3, 0.99], [0.6, 0.4], [0.1, 0.7], [0.7, 0.8]])
    disc = roc_auc_score([1, 0, 1, 0], [0.9, 0.3, 0.6, 0.7])
    bar = roc_auc_score([0, 1, 0, 1], [0.2, 0.4, 0.7, 0.8])
    assert mean_label_auc(y, p) == pytest.approx((disc + bar) / 2)
    assert selection_score(y, p) == pytest.approx((disc + bar) / 2)
    # A label without both a known positive and negative has no AUC and is left out.
    assert mean_label_auc(np.array([[1, 0], [1, 1], [NAN, 0]]), p[:3]) == pytest.approx(
        roc_auc_score([0, 1, 0], [0.2, 0.99, 0.4]))
    right = [1, 1, 1, 1, 0, 0, 0, 1]  # p >= 0.5 against the 8 known entries, row by row
    assert known_accuracy(y, p) == pytest.approx(np.mean(right))
    figures = val_figures(y, p)
    known = ~np.isnan(y)
    pk = p[known]
    yk = y[known]
    bce = -np.mean(yk * np.log(pk) + (1 - yk) * np.log(1 - pk))
    assert figures["val_auc"] == pytest.approx((disc + bar) / 2)
    assert figures["val_log_loss"] == pytest.approx(bce)
    assert figures["val_accuracy"] == pytest.approx(np.mean(right)) and figures["n_val"] == 5


# ------------------------------------------------------------------------------ heads
def _feature_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60, 5))
    y = np.stack([(x[:, 0] + 0.5 * rng.normal(size=60) > 0),
                  (x[:, 1] - x[:, 2] + 0.5 * rng.normal(size=60) > 0.3)], axis=1).astype(float)
    y[rng.random(y.shape) < 0.2] = np.nan
    return x[:40], y[:40], x[40:], y[40:]


def test_one_vs_rest_logreg_equals_logistic_regression_per_label_on_known_rows():
    x, y, xv, yv = _feature_problem()
    head = SklearnHead("logreg").fit(x, y, xv, yv, labels=LABELS)
    assert isinstance(head.estimator_, MaskedOneVsRest) and head.multilabel
    proba = head.predict_proba(xv)
    assert proba.shape == (len(xv), 2)
    for k in range(2):
        known = ~np.isnan(y[:, k])
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=head.params_["C"],
                                                                 max_iter=2000))
        ref.fit(x[known], y[known, k].astype(int))
        np.testing.assert_allclose(proba[:, k], ref.predict_proba(xv)[:, 1], rtol=1e-10)
    # The grid point chosen is the one with the best mean validation AUC over labels.
    assert head.params_["C"] == max(head.search_, key=lambda r: r["val_score"])["C"]
    best = [r for r in head.search_ if r["C"] == head.params_["C"]][0]
    assert best["val_score"] == pytest.approx(mean_label_auc(yv, proba))


@pytest.mark.parametrize("name", ["logreg", "prototype"])
def test_the_folded_linear_layers_sigmoid_is_the_heads_probability(name):
    x, y, xv, yv = _feature_problem(1)
    head = SklearnHead(name).fit(x, y, xv, yv)
    layer = head.as_linear()
    assert layer.out_features == 2
    with torch.no_grad():
        folded = torch.sigmoid(layer(torch.from_numpy(xv).float()).double()).numpy()
    np.testing.assert_allclose(folded, head.predict_proba(xv), atol=1e-5)


@pytest.mark.parametrize("name", ["svm", "rf", "knn", "prototype"])
def test_other_heads_are_one_vs_rest_too_and_load_back_safely(name, monkeypatch, tmp_path):
    import skops.io as sio
    from sklearn.ensemble import RandomForestClassifier

    # A 10-tree forest, one grid point: the one-vs-rest wrapping is what is tested here.
    monkeypatch.setitem(HEADS, "rf", lambda seed, cw: [({"min_samples_leaf": 1}, (
        RandomForestClassifier(n_estimators=10, class_weight=cw, random_state=seed)))])
    x, y, xv, yv = _feature_problem(2)
    head = SklearnHead(name).fit(x, y, xv, yv, labels=LABELS)
    proba = head.predict_proba(xv)
    assert proba.shape == (len(xv), 2) and ((proba >= 0) & (proba <= 1)).all()
    assert (head.as_linear() is None) == (name != "prototype") and head.n_parameters >= 0
    # The head file: skops, the head's own trusted types plus the one-vs-rest wrapper.
    path = tmp_path / "head.skops"
    path.write_bytes(sio.dumps(head.estimator_))
    again = SklearnHead.load(path, name, multilabel=True)
    np.testing.assert_array_equal(again.predict_proba(xv), proba)
    with pytest.raises(MedtlError, match="refusing to load types"):
        SklearnHead.load(path, name)  # a single-label model's head never holds the wrapper


def test_a_label_with_one_known_value_in_training_cannot_be_fitted():
    x, y, xv, yv = _feature_problem()
    y[:, 1] = np.where(np.isnan(y[:, 1]), np.nan, 1.0)
    with pytest.raises(MedtlError, match="bar: the training split"):
        SklearnHead("logreg").fit(x, y, xv, yv, labels=LABELS)


def test_the_linear_head_trains_masked_and_picks_the_epoch_on_mean_auc():
    x, y, xv, yv = _feature_problem(3)
    trainer = LinearHeadTrainer(epochs=30, seed=0, balanced=True)
    head = trainer.fit(x, y, xv, yv, 2)
    assert head.fc.out_features == 2
    best = trainer.history_[trainer.best_epoch_ - 1]
    with torch.no_grad():
        proba = torch.sigmoid(head.eval()(torch.from_numpy(xv).float()).double()).numpy()
    assert best["val_auc"] == pytest.approx(mean_label_auc(yv, proba))
    assert best["val_auc"] == max(r["val_auc"] for r in trainer.history_)


# ------------------------------------------------------------------------------ strategies
def _check_probabilities(proba: np.ndarray, n: int) -> None:
    assert proba.shape == (n, 2) and np.isfinite(proba).all()
    assert ((proba >= 0) & (proba <= 1)).all()
    assert not np.allclose(proba.sum(axis=1), 1.0)  # independent sigmoids, not a softmax


@pytest.mark.parametrize("name", list(STRATEGY_PARAMS))
def test_every_strategy_fits_two_labels_with_sigmoid_outputs(two_label, fitted, name, tmp_path):
    train, val, test = two_label
    clf, _, seen = fitted(name)
    assert clf.multilabel_ and clf.model_.multilabel and clf.classes_ == LABELS
    proba = clf.predict_proba(test)
    _check_probabilities(proba, len(test))
    assert clf.predict(test).shape == (len(test), 2)
    if name in WITH_OOD:  # the detector fits on features, whatever the labels
        assert clf.model_.ood is not None
        features, again = clf.model_.features_and_proba(test)
        assert np.isfinite(clf.model_.ood.score(features)).all()
        # Every path to the probabilities gives the same sigmoids: from images, from features
        # in one pass, from features (TTA's per-view step).
        np.testing.assert_allclose(again, proba, rtol=1e-6)
        with torch.no_grad():  # as TTA calls it
            from_features = clf.model_._proba_of_features(torch.from_numpy(features))
        np.testing.assert_allclose(from_features, proba, rtol=1e-5)
    if name in ("feature-extractor", "hybrid"):
        # ImageNet features separate disc from bar: the frozen head learns both labels.
        assert mean_label_auc(train.labels, clf.predict_proba(train)) > 0.8
    if name == "auto":
        # Every candidate and stage was judged on validation's targets and sigmoids.
        assert len(seen) >= 3
        for y_seen, p_seen in seen:
            np.testing.assert_array_equal(y_seen, val.labels)
            assert p_seen.shape == (len(val), 2)
            assert not np.allclose(p_seen.sum(axis=1), 1.0)
        frozen = clf.stages_[0]
        assert {c["head"] for c in frozen["candidates"]} >= {"linear", "logreg"}
        # What the climb decided on is the final model's masked figures on validation.
        chosen = [s for s in clf.stages_ if s["accepted"]][-1]
        again = val_figures(val.labels, clf.predict_proba(val))
        assert again["val_auc"] == pytest.approx(mean_label_auc(val.labels,
                                                                clf.predict_proba(val)))
        for key in ("val_auc", "val_accuracy", "val_log_loss", "n_val"):
            assert chosen[key] == pytest.approx(again[key], rel=1e-4), key
    # Saved and loaded: the flag and the probabilities come back.
    again = TransferClassifier.load(clf.save(tmp_path / "model"), quiet=True)
    assert again.model_.multilabel and again.multilabel_
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["multilabel"] is True
    # auto here folds a head fitted on random weights' tiny features into huge weights: a
    # reloaded network differs by ~3e-6 there, single-label alike (measured), float32 noise.
    np.testing.assert_allclose(again.predict_proba(test), proba, rtol=1e-6,
                               atol=1e-5 if name == "auto" else 1e-7)


def test_a_single_label_model_json_has_no_multilabel_key(fitted, tmp_path):
    m = fitted("feature-extractor")[0].model_
    single = FrozenModel(m.backbone, m.head, ["no bar", "bar"], m.preprocessing, m.options)
    assert not single.multilabel
    meta = json.loads((single.save(tmp_path / "m") / "model.json").read_text())
    assert "multilabel" not in meta
    assert not FittedModel.load(tmp_path / "m", quiet=True).multilabel


def test_a_one_vs_rest_head_file_is_refused_for_a_single_label_model(fitted, tmp_path):
    clf = fitted("hybrid")[0]
    clf.save(tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    meta = json.loads(path.read_text())
    del meta["multilabel"]
    path.write_text(json.dumps(meta))
    with pytest.raises(MedtlError, match="refusing to load types"):
        FittedModel.load(tmp_path / "m", quiet=True)
    # ... and a single-label head file in a multi-label model is refused too.
    import skops.io as sio

    (tmp_path / "m" / "head.skops").write_bytes(sio.dumps(clf.model_.head.estimator_
                                                          .estimators_[0]))
    meta["multilabel"] = True
    path.write_text(json.dumps(meta))
    with pytest.raises(MedtlError, match="holds a single-label head"):
        FittedModel.load(tmp_path / "m", quiet=True)
    meta["multilabel"] = "yes"
    path.write_text(json.dumps(meta))
    with pytest.raises(MedtlError, match="not true or false"):
        FittedModel.load(tmp_path / "m", quiet=True)


def test_frozen_blocks_stay_bitwise_frozen_under_multilabel_fine_tune(two_label):
    train, val, _ = two_label
    options = TrainOptions(**FAST, strategy="fine-tune", weights="random", epochs=2,
                           unfreeze=1, backbone="resnet18")
    start = FineTuneStrategy(options).build(2)
    clf = TransferClassifier.from_options(options).fit(train, val)
    net = clf.model_.network
    assert isinstance(clf.model_, NetworkModel)
    frozen = frozen_blocks(net)
    assert frozen and len(frozen) == len(net.blocks) - 1
    for name in frozen:  # parameters and BatchNorm statistics alike
        before = start.blocks[name].state_dict()
        for key, t in net.blocks[name].state_dict().items():
            assert torch.equal(before[key], t), (name, key)
    top = list(net.blocks)[-1]
    assert any(not torch.equal(dict(start.blocks[top].state_dict())[k], t)
               for k, t in net.blocks[top].state_dict().items())


def test_class_weighting_auto_follows_the_most_imbalanced_label():
    strategy = HybridStrategy(TrainOptions())
    balanced = np.array([[1, 0], [0, 1], [1, 1], [0, 0]] * 3, dtype=float)
    assert not strategy.use_class_weights(balanced, LABELS)
    rare = balanced.copy()
    rare[:, 1] = 0
    rare[0, 1] = 1  # bar: 1 positive, 11 negatives
    assert strategy.use_class_weights(rare, LABELS)
    common = 1 - rare  # the other way round: 11 positives, 1 negative
    assert strategy.use_class_weights(common, LABELS)
    assert HybridStrategy(TrainOptions(class_weight="balanced")).use_class_weights(balanced,
                                                                                   LABELS)
    assert not HybridStrategy(TrainOptions(class_weight="none")).use_class_weights(rare, LABELS)


def test_calibration_is_skipped_for_multilabel(fitted):
    clf, lines, _ = fitted("hybrid")
    assert clf.calibrate and clf.model_.temperature is None
    assert any(line.startswith("calibration: skipped") for line in lines)


# ------------------------------------------------------------------------------ refused
@pytest.mark.parametrize("params, option", [
    (dict(sampler="balanced"), "--sampler balanced"),
    (dict(mix="mixup"), "--mix mixup"),
    (dict(mix="cutmix"), "--mix cutmix"),
    (dict(mix=None, augment="strong"), "--mix both"),  # an older run's preset mixing
    (dict(label_smoothing=0.1), "--label-smoothing 0.1"),
])
def test_options_without_meaning_for_multilabel_are_refused_before_training(
        two_label, params, option, monkeypatch):
    train, val, _ = two_label

    def never(*args, **kw):
        raise AssertionError("images were decoded before the refusal")

    monkeypatch.setattr(strategies, "decode_images", never)
    kw = {**FAST, **params}
    clf = TransferClassifier(**kw, strategy="full", weights="random", epochs=1)
    with pytest.raises(MedtlError, match=option) as err:
        clf.fit(train, val)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, option", [
    (dict(sampler="balanced"), "--sampler balanced"),
    (dict(mix="mixup"), "--mix mixup"),
    (dict(label_smoothing=0.1), "--label-smoothing"),
])
def test_the_loop_itself_refuses_them(change, option):
    x = torch.randn(6, 3)
    y = torch.tensor([[1, 0], [0, 1], [NAN, 1], [1, 1], [0, 0], [1, NAN]])
    model = torch.nn.Linear(3, 2)
    with pytest.raises(MedtlError, match=option):
        loop.fit(model, [{"name": "h", "params": model.parameters(), "lr": 1e-2}], x, y, x, y,
                 TrainConfig(epochs=1, **change), inputs=Inputs())


def test_an_interrupted_multilabel_fit_resumes_bitwise(tmp_path):
    x, y, xv, yv = (torch.from_numpy(a).float() for a in _feature_problem(4))
    config = TrainConfig(epochs=3, batch_size=8, patience=5, class_weight="balanced")

    def run(ckpt, resume=False, stop=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.3),
                                    torch.nn.Linear(8, 2))

        def hook(epoch):
            if epoch == stop:
                raise KeyboardInterrupt
        result = loop.fit(model, [{"name": "h", "params": model.parameters(), "lr": 1e-2}],
                          x, y, xv, yv, config, inputs=Inputs(), checkpoint_dir=ckpt,
                          resume=resume, on_epoch_end=hook if stop else None)
        return result, model

    whole, m1 = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop=1)
    again, m2 = run(tmp_path / "b", resume=True)
    assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in whole.history]
    assert all(np.isfinite(r["val_loss"]) for r in whole.history)
    for k, t in m1.state_dict().items():
        assert torch.equal(t, m2.state_dict()[k]), k


def test_the_frozen_model_applies_sigmoids_to_its_linear_head(two_label, fitted):
    test = two_label[2]
    model: FrozenModel = fitted("feature-extractor")[0].model_
    f = model.features(test)
    with torch.no_grad():
        logits = model.torch_module()(torch.zeros(1, 3, 32, 32))
        head_logits = model.head.eval()(torch.from_numpy(f).float())
    assert logits.shape == (1, 2)
    np.testing.assert_allclose(model.predict_proba_features(f),
                               torch.sigmoid(head_logits).double().numpy(), rtol=1e-6)
    # A temperature (from a model.json) never rescales a multi-label model's sigmoids.
    plain = model.predict_proba_features(f)
    model.temperature = 2.0
    try:
        np.testing.assert_array_equal(model.predict_proba_features(f), plain)
    finally:
        model.temperature = None
