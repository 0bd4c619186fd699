"""A site's round of training (medtl.federated.local): what it changes, FedProx, DP-SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtl.federated.local import (
    FeatureExtractorRecipe,
    Privacy,
    Schedule,
    SiteData,
    noise_multiplier,
    spent_epsilon,
)
from medtl.training.options import TrainOptions


def _site(n: int = 120, dim: int = 1280, seed: int = 0) -> SiteData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, dim, generator=g) + y[:, None].float() * 0.5
    return SiteData(x, y, x[:40], y[:40], [])


def _recipe(**kw) -> FeatureExtractorRecipe:
    return FeatureExtractorRecipe(TrainOptions(strategy="feature-extractor", **kw), ["a", "b"])


def test_a_round_changes_the_shared_layer_and_not_the_fixed_standardisation():
    recipe = _recipe()
    head = recipe.initial()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    recipe.train_round(head, _site(), seed=1, schedule=Schedule(1, 2), balanced=False)
    after = head.state_dict()
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    # mean 0 and scale 1, never estimated from a site's features (they would travel)
    assert torch.equal(after["mean"], torch.zeros(1280)) and torch.equal(after["std"],
                                                                          torch.ones(1280))


def test_round_is_repeatable_for_its_seed():
    recipe = _recipe()
    a, b = recipe.initial(), recipe.initial()
    for head in (a, b):
        recipe.train_round(head, _site(), seed=7, schedule=Schedule(1, 1), balanced=True)
    assert torch.equal(a.fc.weight, b.fc.weight)


def _distance_moved(mu: float) -> float:
    recipe = _recipe(lr=1e-2)
    head = recipe.initial()
    start = head.fc.weight.detach().clone()
    recipe.train_round(head, _site(), seed=3, schedule=Schedule(1, 3, mu=mu), balanced=False)
    return float((head.fc.weight - start).norm())


def test_fedprox_pulls_the_site_towards_the_global_model():
    plain, prox = _distance_moved(0.0), _distance_moved(10.0)
    assert prox < 0.5 * plain, (plain, prox)


def test_fedprox_adds_mu_times_the_distance_to_the_gradient():
    from medtl.federated.local import _Proximal

    layer = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    prox = _Proximal(layer, mu=0.5)
    with torch.no_grad():
        layer.weight.add_(2.0)  # now 2 away from the anchor
    layer(torch.zeros(1, 3)).sum().backward()  # the loss's own gradient is 0
    prox.remove()
    assert torch.allclose(layer.weight.grad, torch.full((1, 3), 1.0))  # 0.5 * 2


def test_dp_noise_meets_the_epsilon_asked_for():
    privacy = Privacy(epsilon=8.0, delta=1e-5)
    q, epochs = 64 / 1000, 100
    sigma = noise_multiplier(privacy, q, epochs)
    eps = spent_epsilon(privacy, q, sigma, int(epochs / q))
    assert 7.5 < eps <= 8.0 + 0.01
    # fewer rounds at the same noise spend less
    assert spent_epsilon(privacy, q, sigma, int(epochs / q) // 4) < eps


def test_a_private_round_trains_and_leaves_a_plain_head():
    pytest.importorskip("opacus")
    recipe = _recipe()
    head = recipe.initial()
    start = head.fc.weight.detach().clone()
    recipe.train_round(head, _site(), seed=1,
                       schedule=Schedule(2, 1, privacy=Privacy(epsilon=8.0)), balanced=True)
    assert not torch.equal(head.fc.weight, start)
    assert set(head.state_dict()) == {"mean", "std", "fc.weight", "fc.bias"}
    assert np.isfinite(recipe.to_arrays(head)["fc.weight"]).all()


def test_confusion_counts_are_the_global_models_on_validation():
    recipe = _recipe()
    head = recipe.initial()
    data = _site()
    counts = recipe.confusion(head, data)
    assert sum(counts.values()) == len(data.y_val)
    pred = recipe.proba(head, data.x_val).argmax(1)
    assert counts["c1_1"] == int(((pred == 1) & (data.y_val.numpy() == 1)).sum())


def test_a_fine_tune_round_trains_the_shared_blocks_and_nothing_frozen():
    from medtl.federated.local import FineTuneRecipe
    from medtl.federated.shared import shared_names

    recipe = FineTuneRecipe(TrainOptions(strategy="fine-tune", weights="random", image_size=32,
                                         augment="none", quiet=True), ["a", "b"])
    net = recipe.initial()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (16, 32, 32, 3), generator=g, dtype=torch.uint8)
    y = torch.arange(16) % 2
    recipe.train_round(net, SiteData(x, y, x[:8], y[:8], []), seed=1,
                       schedule=Schedule(1, 1), balanced=False)
    shared = set(shared_names(net))
    after = net.state_dict()
    # num_batches_tracked: the trained block's own step counter (an integer, kept locally)
    changed = {k for k in after if not torch.equal(before[k], after[k])
               and not k.endswith("num_batches_tracked")}
    assert changed and changed <= shared, changed - shared  # frozen blocks bitwise the same
    assert any(k.endswith("running_mean") for k in changed)  # the top block's BN statistics
    assert "classifier.weight" in changed or any(k.startswith("classifier") for k in changed)


def test_a_private_rounds_noise_is_secret_so_not_repeatable_from_the_plan():
    """The plan (seed, site, round) is known to the server: DP noise drawn from it could be
    subtracted. Two private rounds from the same plan differ."""
    pytest.importorskip("opacus")
    recipe = _recipe()
    a, b = recipe.initial(), recipe.initial()
    for head in (a, b):
        recipe.train_round(head, _site(), seed=5,
                           schedule=Schedule(2, 1, privacy=Privacy(epsilon=8.0)), balanced=False)
    assert not torch.equal(a.fc.weight, b.fc.weight)
