"""What one site does with its own data: prepare it once, train a round, count on validation.

A *recipe* (one per federated strategy, a registry as strategies have) builds the model every
site starts from, names the tensors that travel (``medtl.federated.shared``), and trains them
locally for ``local_epochs`` per round. The same recipe trains the baselines: a site alone and
the pooled data are federations of one site, so "the same recipe" is the same code.

- ``feature-extractor``: frozen ImageNet features, computed once per site (and cached on disk
  like any run's), and a linear head trained on them. The head's standardisation is fixed
  (mean 0, scale 1), not estimated: estimated statistics would be the sites' feature means,
  which must not travel. Optional differential privacy (Opacus DP-SGD) of the head's updates.
- ``fine-tune``: the top ``--unfreeze`` blocks and the classifier, trained on the site's images
  through the shared training loop; their BatchNorm statistics travel with them.

FedProx (``mu`` > 0) adds ``mu/2 * |w - w_global|^2`` to each site's loss, as a gradient hook
on each shared parameter, so the training loop needs no change.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from medtl.errors import MedtlError
from medtl.federated.shared import get_shared, load_shared, shared_names
from medtl.training.options import TrainOptions

log = logging.getLogger("medtl")


@dataclass(frozen=True)
class Privacy:
    """Differential privacy of a site's updates (DP-SGD): each site's records are protected at
    (``epsilon``, ``delta``) over every round it may train in."""

    epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0

    def check(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise MedtlError(f"--dp-epsilon {self.epsilon}: must be a positive number")
        if not 0 < self.delta < 1:
            raise MedtlError(f"--dp-delta {self.delta}: must lie in (0, 1)")
        if not self.max_grad_norm > 0:
            raise MedtlError(f"--dp-clip {self.max_grad_norm}: must be positive")


@dataclass(frozen=True)
class Schedule:
    """How every site trains: rounds, local epochs per round, FedProx's mu, privacy."""

    rounds: int
    local_epochs: int
    mu: float = 0.0
    privacy: Privacy | None = None


@dataclass
class SiteData:
    """One site's prepared training and validation data (features or decoded images)."""

    x: Any
    y: torch.Tensor
    x_val: Any
    y_val: torch.Tensor
    skipped: list[str]


class Recipe:
    """How a federated strategy builds, trains and scores its shared tensors at a site."""

    name: ClassVar[str]
    # What ``prepare`` computes is kept on disk (the feature cache), so preparing a site once
    # before the rounds spares its rounds the work.
    cached_on_disk: ClassVar[bool] = False

    def __init__(self, options: TrainOptions, classes: Sequence[str]) -> None:
        self.options = options
        self.classes = list(classes)

    # -- the model ------------------------------------------------------------------------
    def initial(self) -> nn.Module:
        """The model every site starts from, the same for a seed (no data read)."""
        raise NotImplementedError

    def names(self, model: nn.Module) -> list[str]:
        return shared_names(model)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shared tensors' names and shapes: all a message's arrays may be."""
        model = self.initial()
        state = model.state_dict()
        return {n: tuple(state[n].shape) for n in self.names(model)}

    # -- one site -------------------------------------------------------------------------
    def prepare(self, train, val) -> SiteData:
        raise NotImplementedError

    def train_round(self, model: nn.Module, data: SiteData, *, seed: int, schedule: Schedule,
                    balanced: bool) -> None:
        raise NotImplementedError

    def proba(self, model: nn.Module, x) -> np.ndarray:
        raise NotImplementedError

    def fitted(self, model: nn.Module):
        """The FittedModel a run saves (medtl.transfer.fitted)."""
        raise NotImplementedError

    # -- shared by every recipe -----------------------------------------------------------
    def from_arrays(self, arrays: dict[str, np.ndarray], *, source: str) -> nn.Module:
        model = self.initial()
        load_shared(model, arrays, self.names(model), source=source)
        return model

    def to_arrays(self, model: nn.Module) -> dict[str, np.ndarray]:
        return get_shared(model, self.names(model))

    def confusion(self, model: nn.Module, data: SiteData) -> dict[str, int]:
        """The global model's confusion counts on the site's validation split."""
        proba = self.proba(model, data.x_val)
        pred = proba.argmax(1)
        y = data.y_val.numpy()
        k = len(self.classes)
        m = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
        return {f"c{t}_{p}": int(m[t, p]) for t in range(k) for p in range(k)}


RECIPES: dict[str, type[Recipe]] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    RECIPES[cls.name] = cls
    return cls


def get_recipe(name: str) -> type[Recipe]:
    from medtl.errors import check_choice

    check_choice("federated strategy", name, RECIPES)
    return RECIPES[name]


def round_seed(seed: int, site: int, server_round: int) -> int:
    """Each site's shuffling and dropout in each round: different, and repeatable."""
    return int(np.random.SeedSequence([seed, site, server_round]).generate_state(1)[0])


def balanced_weights(y: torch.Tensor, k: int) -> torch.Tensor:
    counts = torch.bincount(y, minlength=k).float()
    return torch.where(counts > 0, len(y) / (k * counts.clamp(min=1)), torch.zeros_like(counts))


class _Proximal:
    """FedProx: ``mu * (w - w_global)`` added to each shared parameter's gradient."""

    def __init__(self, model: nn.Module, mu: float) -> None:
        self.handles = []
        if mu <= 0:
            return
        for p in model.parameters():
            if p.requires_grad:
                anchor = p.detach().clone()
                self.handles.append(p.register_hook(_prox_hook(p, anchor, mu)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _prox_hook(p: torch.Tensor, anchor: torch.Tensor, mu: float) -> Callable:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad + mu * (p.detach() - anchor)
    return hook


# ---------------------------------------------------------------------------- frozen features
@register_recipe
class FeatureExtractorRecipe(Recipe):
    """A linear head on frozen features; the features never leave the site."""

    name = "feature-extractor"
    cached_on_disk = True
    _backbones: ClassVar[dict[tuple, Any]] = {}

    def _backbone(self):
        from medtl.data.transforms import Preprocessing
        from medtl.models import create_backbone
        from medtl.training.loop import seeded
        from medtl.training.options import resolve_device
        from medtl.transfer.fitted import make_extractor

        o = self.options
        key = (o.backbone, o.weights, o.in_chans, o.image_size, o.engine, o.cache)
        if key not in self._backbones:
            with seeded(o.seed):
                backbone = create_backbone(o.backbone, weights=o.weights, in_chans=o.in_chans)
            backbone.reset_classifier(0)
            pre = Preprocessing.for_spec(backbone.spec, o.image_size, channels=o.in_chans)
            extractor = make_extractor(backbone, pre, o, resolve_device(o.device))
            self._backbones.clear()  # one backbone per process at a time
            self._backbones[key] = (backbone, pre, extractor)
        return self._backbones[key]

    def _dim(self) -> int:
        from medtl.models import get_spec

        return int(get_spec(self.options.backbone).feature_dim)

    def initial(self) -> nn.Module:
        from medtl.training.loop import seeded
        from medtl.transfer.heads import LinearHead

        with seeded(self.options.seed):
            return LinearHead(self._dim(), len(self.classes)).eval()

    def names(self, model: nn.Module) -> list[str]:
        # The fixed standardisation buffers stay at every site: only the linear layer travels.
        return [n for n, p in model.named_parameters() if p.requires_grad]

    def prepare(self, train, val) -> SiteData:
        from medtl.transfer.strategies import _features

        _, _, extractor = self._backbone()
        skipped: list[str] = []
        x, y = _features(extractor, train, self.options.skip_bad, skipped)
        xv, yv = _features(extractor, val, self.options.skip_bad, skipped)
        return SiteData(torch.from_numpy(x).float(), torch.from_numpy(y).long(),
                        torch.from_numpy(xv).float(), torch.from_numpy(yv).long(), skipped)

    def train_round(self, model, data, *, seed, schedule, balanced) -> None:
        o = self.options
        k = len(self.classes)
        # A private round's sampling and noise must be unknown to whoever receives the
        # update: drawn from a secret seed, not the plan's (so it is not repeatable, by design).
        private = schedule.privacy is not None
        gen = torch.Generator().manual_seed(secrets.randbits(63) if private else seed)
        dataset = torch.utils.data.TensorDataset(data.x, data.y)
        loader = torch.utils.data.DataLoader(dataset, batch_size=min(o.batch_size, len(dataset)),
                                             shuffle=True, generator=gen)
        weight = balanced_weights(data.y, k) if balanced else None
        criterion = nn.CrossEntropyLoss(weight=weight)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=o.lr, weight_decay=1e-2)
        prox = _Proximal(model, schedule.mu)
        trained = model
        if private:
            trained, optimizer, loader = _make_private(model, optimizer, loader, schedule,
                                                       len(dataset), gen)
        with torch.random.fork_rng(), warnings.catch_warnings():
            # Opacus' per-example hooks fire on inputs that need no gradient (the features):
            # PyTorch's note on that is expected here.
            warnings.filterwarnings("ignore", message="Full backward hook")
            torch.manual_seed(seed)
            for _ in range(schedule.local_epochs):
                for xb, yb in loader:
                    if len(yb) == 0:  # Poisson sampling may draw an empty batch
                        continue
                    optimizer.zero_grad(set_to_none=True)
                    loss = criterion(trained(xb), yb)
                    loss.backward()
                    optimizer.step()
        prox.remove()
        if private:
            trained._close()  # Opacus' hooks off: the plain head is what travels
        model.eval()

    def proba(self, model, x) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model.eval()(x), 1).numpy()

    def fitted(self, model):
        from medtl.transfer.fitted import FrozenModel

        backbone, pre, extractor = self._backbone()
        fitted = FrozenModel(backbone, model.eval(), self.classes, pre, self.options)
        fitted.extractor = extractor
        return fitted


def noise_multiplier(privacy: Privacy, sample_rate: float, epochs: int) -> float:
    """DP-SGD's noise for (epsilon, delta) after ``epochs`` passes at ``sample_rate``."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # "optimal order is the largest alpha": a short schedule
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=privacy.epsilon,
                                      target_delta=privacy.delta, sample_rate=sample_rate,
                                      epochs=epochs, accountant="rdp"))


def spent_epsilon(privacy: Privacy, sample_rate: float, sigma: float, steps: int) -> float:
    """The epsilon an RDP accountant gives for ``steps`` DP-SGD steps (Opacus' accountant)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(privacy.delta))


def _make_private(model, optimizer, loader, schedule: Schedule, n: int, gen):
    try:
        from opacus import PrivacyEngine
    except ImportError as exc:
        raise MedtlError("differential privacy needs Opacus: pip install 'medtl[federated]'"
                         ) from exc
    privacy = schedule.privacy
    q = loader.batch_size / n
    sigma = noise_multiplier(privacy, q, schedule.rounds * schedule.local_epochs)
    engine = PrivacyEngine(secure_mode=False)
    with warnings.catch_warnings():  # Opacus' notes on secure RNG and its own defaults
        warnings.simplefilter("ignore")
        return engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                   noise_multiplier=sigma, max_grad_norm=privacy.max_grad_norm,
                                   poisson_sampling=True, noise_generator=gen)


# ---------------------------------------------------------------------------- fine-tuning
@register_recipe
class FineTuneRecipe(Recipe):
    """The top ``--unfreeze`` blocks and the classifier, trained on each site's images."""

    name = "fine-tune"

    def _strategy(self):
        from medtl.transfer.strategies import get_strategy

        return get_strategy("fine-tune")(self.options)

    def initial(self) -> nn.Module:
        strategy = self._strategy()
        network = strategy.build(len(self.classes))
        strategy.mark_trainable(network)
        return network.eval()

    def prepare(self, train, val) -> SiteData:
        from medtl.data.transforms import Preprocessing
        from medtl.models import get_spec

        pre = Preprocessing.for_spec(get_spec(self.options.backbone), self.options.image_size,
                                     channels=self.options.in_chans)
        skipped: list[str] = []
        x, y, xv, yv = self._strategy().images(train, val, pre, skipped)
        return SiteData(x, y, xv, yv, skipped)

    def _model(self, network):
        from medtl.data.transforms import Preprocessing
        from medtl.transfer.fitted import NetworkModel

        pre = Preprocessing.for_spec(network.spec, self.options.image_size,
                                     channels=self.options.in_chans)
        return NetworkModel(network, self.classes, pre, self.options)

    def train_round(self, model, data, *, seed, schedule, balanced) -> None:
        if schedule.privacy is not None:
            raise MedtlError("--dp with --strategy fine-tune: Opacus cannot train BatchNorm "
                             "layers privately; use --strategy feature-extractor")
        prox = _Proximal(model, schedule.mu)
        try:
            # Patience past the round's epochs: each round trains all of them (FedAvg's local
            # update), and one local epoch (the default) is also its best.
            self._strategy().train_stage(
                self._model(model), (data.x, data.y, data.x_val, data.y_val), "local round",
                balanced, None, False, seed=seed, epochs=schedule.local_epochs)
        finally:
            prox.remove()

    def proba(self, model, x) -> np.ndarray:
        from medtl.training.loop import predict_proba

        fitted = self._model(model)
        return predict_proba(model.eval(), x, fitted.loop_config())

    def fitted(self, model):
        return self._model(model.eval())
