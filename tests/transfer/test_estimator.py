"""TransferClassifier keeps scikit-learn's estimator contract, and the strategy registry takes a
strategy written outside the package."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import medtl
from medtl.training.options import TrainOptions
from medtl.transfer.estimator import TransferClassifier
from medtl.transfer.fitted import FrozenModel
from medtl.transfer.heads import SklearnHead
from medtl.transfer.strategies import STRATEGIES, FrozenStrategy, register_strategy


def test_parameters_are_the_options_and_round_trip_through_clone_and_set_params():
    clf = TransferClassifier("resnet18", strategy="hybrid", head="svm", epochs=3, threads=1)
    assert set(clf.get_params()) == set(TrainOptions.names())
    assert clf.get_params()["head"] == "svm" and clf.get_params()["epochs"] == 3
    twin = clone(clf)
    assert twin is not clf and twin.get_params() == clf.get_params()
    assert twin.set_params(strategy="auto", seed=7) is twin
    assert twin.strategy == "auto" and twin.seed == 7 and clf.strategy == "hybrid"
    assert clone(twin).get_params() == twin.get_params()
    # repr names what differs from the defaults, as scikit-learn's estimators do.
    assert " ".join(repr(clf).split()) == ("TransferClassifier(backbone='resnet18', epochs=3, "
                                           "head='svm', strategy='hybrid', threads=1)")
    with pytest.raises(ValueError, match="Invalid parameter"):
        clf.set_params(no_such_option=1)
    with pytest.raises(TypeError, match="unexpected"):
        TransferClassifier(no_such_option=1)


def test_init_stores_parameters_only_and_fit_checks_them():
    clf = TransferClassifier(strategy="no-such-strategy", class_weight="sometimes")
    assert clf.strategy == "no-such-strategy"  # stored as given, as scikit-learn requires
    with pytest.raises(medtl.MedtlError, match="class weight"):
        clf.fit(None, None)
    with pytest.raises(medtl.MedtlError, match="unknown strategy"):
        clf.set_params(class_weight="auto").fit(None, None)


def test_predicting_before_fit_raises_not_fitted():
    clf = TransferClassifier(strategy="hybrid")
    with pytest.raises(NotFittedError):
        clf.predict_proba([])
    with pytest.raises(NotFittedError):
        clf.predict([])
    with pytest.raises(NotFittedError):
        clf.save("unused")


class _NearestCentroidHead(SklearnHead):
    """A head that is no registered one: each class's mean feature, softmax of -distance."""

    def fit(self, x, y, x_val, y_val):
        self.centroids_ = np.stack([x[y == c].mean(0) for c in np.unique(y)])
        self.params_ = {"centroids": len(self.centroids_)}
        return self

    def predict_proba(self, x):
        d = -np.linalg.norm(x[:, None, :] - self.centroids_[None], axis=2)
        e = np.exp(d - d.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    @property
    def n_parameters(self) -> int:
        return int(self.centroids_.size)


@pytest.fixture
def toy_strategy():
    @register_strategy
    class NearestCentroid(FrozenStrategy):
        name = "toy-centroid"

        def fit_head(self, x, y, xv, yv, classes, balanced):
            head = _NearestCentroidHead(head="toy").fit(x, y, xv, yv)
            return head, [{"stage": "toy", "centroids": len(classes)}]

    yield NearestCentroid
    STRATEGIES.pop("toy-centroid")


def test_a_strategy_registered_outside_the_package_trains_and_predicts(toy_strategy,
                                                                      blob_data):
    ds = medtl.load_dataset(blob_data)
    clf = TransferClassifier(strategy="toy-centroid", image_size=32, quiet=True)
    clf.fit(ds.split("train"), ds.split("val"))
    assert isinstance(clf.model_, FrozenModel)
    assert clf.history_ == [{"stage": "toy", "centroids": 2}]
    proba = clf.predict_proba(ds.split("test"))
    assert proba.shape == (len(ds.split("test")), 2)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert (clf.predict(ds.split("test")) == ds.split("test").labels).mean() > 0.7
    assert clf.model_.n_trainable == clf.model_.head.centroids_.size
    assert clf.model_.torch_module() is None  # no gradient: explanations fall back


def test_the_registry_lists_the_published_strategies():
    assert {"feature-extractor", "hybrid", "fine-tune", "full", "scratch", "truncated",
            "auto"} <= set(STRATEGIES)


@pytest.mark.parametrize("strategy, extra, trainable_blocks", [
    ("truncated", {"keep": 3}, 3),   # 0.1 derived the architecture from the options
    ("fine-tune", {"unfreeze": 2}, 2),
])
def test_a_network_model_saved_as_medtl_0_1_did_loads_and_predicts_the_same(
        blob_data, tmp_path, strategy, extra, trainable_blocks):
    """medtl 0.1's model.json had no kind, keep or trainable_blocks: the loader derives them from
    the options it recorded (the committed 0.1 fixture is a frozen run; this is the network
    kind, written by today's code and stripped to 0.1's keys)."""
    import json

    ds = medtl.load_dataset(blob_data)
    clf = TransferClassifier(strategy=strategy, image_size=32, epochs=1, augment="none",
                             quiet=True, **extra).fit(ds.split("train"), ds.split("val"))
    expected = clf.predict_proba(ds.split("test"))
    model_dir = clf.save(tmp_path / "model")
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["kind"] == "network" and meta["trainable_blocks"] == trainable_blocks
    for key in ("format", "kind", "keep", "trainable_blocks"):
        meta.pop(key)
    (model_dir / "model.json").write_text(json.dumps(meta))
    loaded = TransferClassifier.load(model_dir, quiet=True)
    np.testing.assert_array_equal(loaded.predict_proba(ds.split("test")), expected)
    assert loaded.model_.n_trainable == clf.model_.n_trainable
    assert loaded.get_params() == {**clf.get_params(), "threads": None, "device": "auto"}


@pytest.mark.parametrize("strategy", ["feature-extractor", "fine-tune"])
def test_fit_leaves_the_callers_generators_and_thread_count_alone(blob_data, strategy):
    import random

    import torch

    ds = medtl.load_dataset(blob_data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    try:
        clf = TransferClassifier(strategy=strategy, image_size=32, epochs=2, augment="none",
                                 threads=2, quiet=True).fit(ds.split("train"), ds.split("val"))
        clf.predict_proba(ds.split("test"))
        assert torch.get_num_threads() == 1  # threads=2 held only during the calls
        assert torch.equal(torch.get_rng_state(), before[0])
        assert np.array_equal(np.random.get_state()[1], before[1])
        assert random.getstate() == before[2]
    finally:
        torch.set_num_threads(threads)


def test_an_option_the_strategy_ignores_is_warned_about_and_its_own_are_recorded(caplog):
    from medtl.transfer.strategies import get_strategy

    TransferClassifier(strategy="hybrid", keep=3, head="svm").make_strategy()
    assert "--keep 3 has no effect with --strategy hybrid" in caplog.text
    assert "--head" not in caplog.text  # hybrid's own
    caplog.clear()
    TransferClassifier(strategy="truncated", keep=3).make_strategy()
    assert "no effect" not in caplog.text
    options = TransferClassifier(strategy="truncated", keep=3).options
    assert get_strategy("truncated")(options).own_values()["keep"] == 3
    assert "lr_decay" not in get_strategy("scratch").own_options  # one rate for every block
