"""The rule of what crosses the network (medtl.federated.shared), and the guard every site runs.

Nothing here needs data or a running federation: messages are built by hand, so every way a
changed client could leak (features, labels, a loss, extra tensors) is tried directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from medtl.federated.apps import Plan, only_parameters_and_counts
from medtl.federated.local import FeatureExtractorRecipe, FineTuneRecipe
from medtl.federated.shared import (
    FederationError,
    check_reply,
    load_shared,
    shared_names,
)
from medtl.training.options import TrainOptions

SHAPES = {"fc.weight": (2, 4), "fc.bias": (2,)}


def _arrays(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in arrays.items()})


def _good(**extra_metrics) -> RecordDict:
    return RecordDict({
        "arrays": _arrays(**{"fc.weight": np.zeros((2, 4), np.float32),
                             "fc.bias": np.zeros(2, np.float32)}),
        "metrics": MetricRecord({"num-examples": 10, **extra_metrics})})


def test_parameters_and_counts_pass():
    check_reply(_good(), SHAPES, train=True, num_classes=2, source="t")
    check_reply(RecordDict({"metrics": MetricRecord({"num-examples": 5, "c0_0": 3, "c1_1": 2})}),
                SHAPES, train=False, num_classes=2, source="t")


@pytest.mark.parametrize("leak", [
    "features",    # a record of its own
    "labels",
])
def test_a_record_beyond_arrays_and_metrics_is_refused(leak):
    content = _good()
    content[leak] = _arrays(x=np.ones((3, 4), np.float32))
    with pytest.raises(FederationError, match="a site sends only"):
        check_reply(content, SHAPES, train=True, num_classes=2, source="t")


def test_an_array_beyond_the_models_is_refused():
    content = _good()
    content["arrays"]["features"] = Array.from_numpy_ndarray(np.ones((3, 4), np.float32))
    with pytest.raises(FederationError, match=r"arrays \[features\] not expected"):
        check_reply(content, SHAPES, train=True, num_classes=2, source="t")


def test_a_parameter_of_another_shape_is_refused():
    content = _good()
    content["arrays"]["fc.weight"] = Array.from_numpy_ndarray(np.zeros((3, 4), np.float32))
    with pytest.raises(FederationError, match="shape"):
        check_reply(content, SHAPES, train=True, num_classes=2, source="t")


@pytest.mark.parametrize("metrics, why", [
    ({"loss": 0.3}, "not counts"),                 # a number derived from labels
    ({"patient": 17}, "not counts"),               # an ID disguised as a count
    ({"c0_0": 2.5}, "not a count"),                # confusion counts are integers
    ({"c0_0": -1}, "not a count"),
])
def test_only_counts_in_metrics(metrics, why):
    content = RecordDict({"metrics": MetricRecord({"num-examples": 4, **metrics})})
    with pytest.raises(FederationError, match=why):
        check_reply(content, SHAPES, train=False, num_classes=2, source="t")


def test_confusion_counts_only_of_the_runs_classes():
    check_reply(_good(c0_0=3, c1_1=4), SHAPES, train=True, num_classes=2, source="t")
    with pytest.raises(FederationError, match=r"\[c2_0\] are not counts"):
        check_reply(_good(c2_0=3), SHAPES, train=True, num_classes=2, source="t")


def test_a_site_loads_only_the_models_shapes():
    head = torch.nn.Linear(4, 2)
    with pytest.raises(FederationError, match="shape"):
        load_shared(head, {"weight": np.zeros((2, 5), np.float32),
                           "bias": np.zeros(2, np.float32)}, ["weight", "bias"], source="s")
    with pytest.raises(FederationError, match="NaN"):
        load_shared(head, {"weight": np.full((2, 4), np.nan, np.float32),
                           "bias": np.zeros(2, np.float32)}, ["weight", "bias"], source="s")


def test_fine_tune_shares_the_trainable_blocks_and_their_batchnorm_only():
    options = TrainOptions(backbone="mobilenet_v2", strategy="fine-tune", weights="random",
                           unfreeze=1)
    network = FineTuneRecipe(options, ["a", "b"]).initial()
    names = shared_names(network)
    top = list(network.blocks)[-1]
    assert names and all(n.startswith(("classifier", f"blocks.{top}")) or top in n
                         for n in names), names
    state = network.state_dict()
    trainable = {n for n, p in network.named_parameters() if p.requires_grad}
    assert trainable <= set(names)
    # The top block's BatchNorm statistics travel; a frozen block's never do.
    assert any(n.endswith("running_mean") for n in names)
    frozen_bn = [n for n in state if n.endswith("running_mean") and n not in names]
    assert frozen_bn and not any(top in n for n in frozen_bn)


def test_feature_extractor_shares_the_linear_layer_only():
    recipe = FeatureExtractorRecipe(TrainOptions(strategy="feature-extractor"), ["a", "b"])
    assert recipe.shapes() == {"fc.weight": (2, 1280), "fc.bias": (2,)}


@pytest.fixture
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_the_sites_guard_stops_a_leaking_reply(task_identity):
    """A site whose handler tried to send its features: the guard raises, nothing is sent."""
    plan = Plan(options=TrainOptions(strategy="feature-extractor").to_dict(),
                classes=["a", "b"], rounds=1, local_epochs=1)
    msg = Message(RecordDict({"config": ConfigRecord({"plan": plan.for_sites(),
                                                      "server-round": 1})}),
                  dst_node_id=1, message_type="train")

    def honest(m, ctx):
        return Message(RecordDict({
            "arrays": _arrays(**{"fc.weight": np.zeros((2, 1280), np.float32),
                                 "fc.bias": np.zeros(2, np.float32)}),
            "metrics": MetricRecord({"num-examples": 3})}), reply_to=m)

    def leaking(m, ctx):
        reply = honest(m, ctx)
        reply.content["features"] = _arrays(x=np.ones((3, 1280), np.float32))
        return reply

    assert only_parameters_and_counts(msg, None, honest).content["metrics"]["num-examples"] == 3
    with pytest.raises(FederationError, match="a site sends only"):
        only_parameters_and_counts(msg, None, leaking)


def _reply_from(node: int, content: RecordDict) -> Message:
    request = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=node, message_type="train")
    reply = Message(content, reply_to=request)
    reply.metadata.__dict__["_src_node_id"] = node  # as the SuperLink stamps it
    return reply


def test_the_server_drops_a_leaking_reply_and_stops_below_min_sites(task_identity):
    from medtl.federated.apps import _strategy

    plan = Plan(options=TrainOptions(strategy="feature-extractor").to_dict(),
                classes=["a", "b"], rounds=1, local_epochs=1, min_sites=2)
    strategy = _strategy(plan, SHAPES)
    leaking = _good()
    leaking["labels"] = _arrays(y=np.ones(10, np.float32))
    honest = [_reply_from(1, _good()), _reply_from(2, _good())]
    arrays, metrics = strategy.aggregate_train(1, [*honest, _reply_from(3, leaking)])
    assert metrics["sites"] == 2 and metrics["num-examples"] == 20  # the leaking one dropped
    with pytest.raises(FederationError, match="1 site\\(s\\) answered, fewer than --min-sites 2"):
        strategy.aggregate_train(2, [honest[0], _reply_from(3, leaking)])
