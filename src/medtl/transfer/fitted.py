"""The fitted-model contract: what every trained medtl model can do, whatever its strategy.

``predict_proba`` on images, ``save(dir)`` / ``load(dir)``, parameter counts, preprocessing, and
the torch module to explain or export (``None`` for black-box heads). Two implementations:

- ``FrozenModel``: a frozen backbone's pooled features and a head on them (a linear torch head,
  or a scikit-learn classifier); features are computed by ``training.features`` (ONNX Runtime on
  CPU, cached).
- ``NetworkModel``: one trained network, backbone and classifier (fine-tune, full, scratch,
  truncated, the climb of ``auto``).

The model directory (``RUN/model/``) holds ``model.json`` and the weights (safetensors; a
scikit-learn head as skops) and ``ood.npz``, the out-of-distribution detector on the pooled
features (medtl.transfer.ood); it is enough to predict with no other file. Bundles written by
medtl 0.1 (no ``kind`` in model.json), or before the detector (no ``ood.npz``), still load.

A multi-label model (``multilabel`` True; model.json's ``"multilabel": true``, written only
then) names its labels in ``classes`` and predicts (n, K) independent sigmoids: each column is
P(label present) and rows do not sum to 1. Its ``torch_module`` still gives logits (apply a
sigmoid, not a softmax), and it is never temperature-scaled.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from medtl.data.transforms import Preprocessing
from medtl.errors import DataReadError, MedtlError
from medtl.files import MAX_JSON_BYTES, atomic_path, atomic_write, read_json
from medtl.models import create_backbone
from medtl.training.loop import seeded
from medtl.training.options import TrainOptions, resolve_device
from medtl.transfer.heads import LinearHead, SklearnHead
from medtl.transfer.meta import MODEL_FORMAT, check_model_meta, options_from_meta
from medtl.transfer.ood import OOD_FILE, MahalanobisDetector

log = logging.getLogger("medtl")

MODEL_JSON = "model.json"


class FittedModel(ABC):
    """A trained model: classes, preprocessing, options it was trained (or is run) with."""

    kind: ClassVar[str]

    def __init__(self, classes: list[str], preprocessing: Preprocessing,
                 options: TrainOptions, temperature: float | None = None, *,
                 multilabel: bool = False) -> None:
        self.classes = list(classes)
        # Multi-label: ``classes`` are labels and probabilities independent sigmoids.
        self.multilabel = bool(multilabel)
        self.preprocessing = preprocessing
        self.options = options
        self.temperature = temperature
        self.device = resolve_device(options.device)
        # The out-of-distribution detector on the backbone's pooled features (None: a run
        # saved before the guard existed); fitted by TransferClassifier.fit, saved as ood.npz.
        self.ood: MahalanobisDetector | None = None

    # ---------------------------------------------------------------------- the contract
    @abstractmethod
    def predict_proba(self, data, *, calibrated: bool = True, cache: bool = True,
                      ) -> np.ndarray:
        """(n, n_classes) probabilities; NaN rows for images skipped as unreadable."""

    @abstractmethod
    def features_and_proba(self, data, *, calibrated: bool = True, cache: bool = True,
                           ) -> tuple[np.ndarray, np.ndarray]:
        """The backbone's pooled features (n, dim) and the probabilities (n, n_classes) they
        give, from one pass over the images; NaN rows for images skipped as unreadable."""

    def predict_proba_ood(self, data, *, calibrated: bool = True, cache: bool = True,
                          ) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and out-of-distribution scores (n,) (Mahalanobis distance of the
        features; None when the model has no detector), features computed once."""
        if self.ood is None:
            return self.predict_proba(data, calibrated=calibrated, cache=cache), None
        features, proba = self.features_and_proba(data, calibrated=calibrated, cache=cache)
        return proba, self.ood.score(features)

    # ---------------------------------------------------------------------- test-time views
    @property
    def tta(self) -> str:
        """The test-time augmentation predictions use (medtl.transfer.tta; "none": off)."""
        return getattr(self.options, "tta", "none")

    def tta_views(self):
        """The TTAViews of :attr:`tta` (a MedtlError where the run's augmentation forbids
        them), or None with TTA off."""
        from medtl.data.tta import make_views

        if self.tta == "none":
            return None
        return make_views(self.tta, self.preprocessing, augment=self.options.augment,
                          hflip=self.options.hflip)

    def _tta_features_and_proba(self, data, *, calibrated: bool, cache: bool,
                                ) -> tuple[np.ndarray, np.ndarray]:
        """The unaugmented view's pooled features and the mean over :meth:`tta_views` of the
        uncalibrated probabilities, then calibrated: what the exported graph computes."""
        from medtl.console import progress_bar
        from medtl.training.loop import ImageInputs, torch_threads

        views, pre = self.tta_views(), self.preprocessing
        device, batch = torch.device(self.device), min(self.options.batch_size, 32)
        backbone = self.backbone.to(device).eval()
        inputs = ImageInputs(pre.model_mean, pre.model_std)
        v, dim, k = views.to(device).n_views, int(backbone.num_features), len(self.classes)
        feats = np.full((len(data), dim), np.nan, dtype=np.float32)
        out = np.full((len(data), k), np.nan)
        with progress_bar("predicting (TTA)", len(data),
                          quiet=self.options.quiet or not cache) as advance, \
                torch_threads(self.options.threads), torch.no_grad():
            for x, keep, _ in iter_decoded(data, pre, PREDICT_CHUNK,
                                           skip_bad=self.options.skip_bad, advance=advance):
                for start in range(0, len(keep), batch):
                    xb = inputs.eval_batch(x[start:start + batch], device)
                    f = backbone.forward_features(views(xb)).float()
                    p = self._proba_of_features(f)
                    rows = keep[start:start + batch]
                    out[rows] = p.reshape(v, -1, k).mean(axis=0)
                    feats[rows] = f.reshape(v, -1, dim)[0].cpu().numpy()
        return feats, (self.calibrate(out) if calibrated else out)

    def _proba_of_features(self, features: torch.Tensor) -> np.ndarray:
        """Uncalibrated probabilities (n, K) float64 of pooled features (TTA's per-view step)."""
        raise MedtlError(f"--tta is not supported for a {type(self).__name__}")

    @property
    @abstractmethod
    def backbone(self) -> nn.Module:
        """The network whose blocks, spec and weights provenance the model carries."""

    @abstractmethod
    def torch_module(self) -> nn.Module | None:
        """Normalised pixels (N, C, S, S) to class logits, or ``None`` when no gradient exists
        (a scikit-learn head other than logistic regression)."""

    @property
    @abstractmethod
    def n_trainable(self) -> int:
        """Parameters that training set (a scikit-learn head: values its fit set)."""

    @property
    @abstractmethod
    def n_total(self) -> int: ...

    @property
    @abstractmethod
    def engine(self) -> str | None:
        """What computes predictions: ``onnxruntime``, ``torch-cpu``, ..."""

    @abstractmethod
    def _save_weights(self, directory: Path) -> dict[str, Any]:
        """Write the weight files; return the kind's own model.json entries."""

    @classmethod
    @abstractmethod
    def _load(cls, directory: Path, meta: dict[str, Any], options: TrainOptions
              ) -> FittedModel: ...

    # ---------------------------------------------------------------------- shared
    def adapted(self) -> None:
        """The backbone's tensors changed in place (AdaBN, medtl.transfer.adapt): drop what
        was computed from the old ones. Nothing to drop for a network predicting directly."""
        return None

    def calibrate(self, proba: np.ndarray) -> np.ndarray:
        """Temperature scaling fitted on validation, if any (every arg-max is kept); never for
        a multi-label model (its sigmoids are not one distribution to rescale)."""
        if self.temperature is None or self.multilabel:
            return proba
        from scipy.special import softmax

        from medtl.training.calibration import logits_from_proba

        out = np.full_like(proba, np.nan)
        ok = np.isfinite(proba).all(axis=1)
        out[ok] = softmax(logits_from_proba(proba[ok]) / self.temperature, axis=1)
        return out

    def save(self, directory: str | Path) -> Path:
        """Write the model directory: weights, then model.json (its presence marks it whole)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": MODEL_FORMAT, "kind": self.kind,
            "params": {k: v for k, v in self.options.to_dict().items() if k != "quiet"},
            "classes": self.classes, "preprocessing": self.preprocessing.to_dict(),
            "num_classes": len(self.classes),
            "weights_info": self.backbone.weights_info.to_dict(),
            "temperature": self.temperature,
            **self._save_weights(directory),
        }
        if self.multilabel:  # only then: single-label model.json files stay as they were
            meta["multilabel"] = True
        if self.ood is not None:
            self.ood.save(directory)
        else:
            (directory / OOD_FILE).unlink(missing_ok=True)  # never a stale detector
        atomic_write(directory / MODEL_JSON, json.dumps(meta, indent=2))
        return directory

    @staticmethod
    def load(directory: str | Path, *, device: str = "auto", quiet: bool = False,
             skip_bad: bool = False, threads: int | None = None) -> FittedModel:
        """A model directory written by :meth:`save` (or by medtl 0.1). Every value of its
        model.json is checked first (:func:`read_model_meta`): a run is untrusted input."""
        directory = Path(directory)
        meta, options = read_model_meta(directory, device=device, quiet=quiet,
                                        skip_bad=skip_bad, threads=threads)
        kind = meta.get("kind") or ("network" if (directory / "model.safetensors").exists()
                                    else "frozen")  # medtl 0.1 wrote no kind
        cls = {c.kind: c for c in (FrozenModel, NetworkModel)}[kind]
        multilabel = meta.get("multilabel", False)
        if not isinstance(multilabel, bool):
            raise MedtlError(f"{directory / MODEL_JSON}: multilabel {str(multilabel)[:40]!r} "
                             "is not true or false")
        meta["multilabel"] = multilabel
        model = cls._load(directory, meta, options)
        model.temperature = meta["temperature"]
        model.ood = MahalanobisDetector.load(directory, dim=int(model.backbone.num_features))
        return model


def read_model_meta(directory: str | Path, **runtime: Any) -> tuple[dict[str, Any],
                                                                     TrainOptions]:
    """model.json of a model directory, read (bounded, a regular file) and checked, and the
    training options it records with this machine's ``runtime`` settings (device, quiet,
    skip_bad, threads). Values come out typed: ``preprocessing`` a Preprocessing,
    ``weights_info`` a WeightsInfo."""
    meta_path = Path(directory) / MODEL_JSON
    try:
        raw = read_json(meta_path, max_bytes=MAX_JSON_BYTES)
    except FileNotFoundError:
        raise MedtlError(f"{directory}: not a medtl model directory (no {MODEL_JSON})") from None
    meta = check_model_meta(raw, meta_path)
    return meta, options_from_meta(meta.get("params"), str(meta_path), **runtime)


# ------------------------------------------------------------------------------ frozen
class FeaturesThenHead(nn.Module):
    """A frozen backbone's pooled features followed by a head: pixels to class logits
    (multi-label: per-label logits, whose sigmoids are the probabilities)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))


class FrozenModel(FittedModel):
    """Frozen backbone features and a head: ``LinearHead`` or ``SklearnHead``."""

    kind = "frozen"

    def __init__(self, backbone: nn.Module, head: LinearHead | SklearnHead, classes: list[str],
                 preprocessing: Preprocessing, options: TrainOptions,
                 temperature: float | None = None, *, multilabel: bool = False) -> None:
        super().__init__(classes, preprocessing, options, temperature, multilabel=multilabel)
        self._backbone = backbone.eval()
        self.head = head
        self.extractor = make_extractor(backbone, preprocessing, options, self.device)

    @property
    def backbone(self) -> nn.Module:
        return self._backbone

    def adapted(self) -> None:
        # A new extractor: its ONNX graph and its feature-cache key come from the new tensors.
        writes = getattr(self.extractor, "cache_writes", True)
        self.extractor = make_extractor(self._backbone, self.preprocessing, self.options,
                                        self.device)
        self.extractor.cache_writes = writes

    def features(self, data, *, cache: bool = True) -> np.ndarray:
        """Frozen features (n, feature_dim); rows of unreadable images are NaN with skip_bad."""
        return self.extractor.transform(data, skip_bad=self.options.skip_bad, use_cache=cache,
                                        progress=cache)

    def predict_proba_features(self, x: np.ndarray, *, calibrated: bool = True) -> np.ndarray:
        out = np.full((len(x), len(self.classes)), np.nan)
        ok = np.isfinite(x).all(axis=1)
        if ok.any():
            if isinstance(self.head, SklearnHead):
                out[ok] = self.head.predict_proba(x[ok])
            else:
                with torch.no_grad():
                    logits = self.head.eval()(torch.from_numpy(x[ok]).float())
                    out[ok] = _probabilities(logits, self.multilabel).double().numpy()
        return self.calibrate(out) if calibrated else out

    def predict_proba(self, data, *, calibrated: bool = True, cache: bool = True) -> np.ndarray:
        if self.tta != "none":
            return self._tta_features_and_proba(data, calibrated=calibrated, cache=cache)[1]
        return self.predict_proba_features(self.features(data, cache=cache),
                                           calibrated=calibrated)

    def features_and_proba(self, data, *, calibrated: bool = True, cache: bool = True,
                           ) -> tuple[np.ndarray, np.ndarray]:
        if self.tta != "none":
            return self._tta_features_and_proba(data, calibrated=calibrated, cache=cache)
        x = self.features(data, cache=cache)
        return x, self.predict_proba_features(x, calibrated=calibrated)

    def _proba_of_features(self, features: torch.Tensor) -> np.ndarray:
        return self.predict_proba_features(features.cpu().numpy(), calibrated=False)

    def torch_module(self) -> nn.Module | None:
        head = self.head.as_linear() if isinstance(self.head, SklearnHead) else self.head
        return None if head is None else FeaturesThenHead(self._backbone, head).eval()

    @property
    def n_trainable(self) -> int:
        if isinstance(self.head, SklearnHead):
            return self.head.n_parameters
        return sum(p.numel() for p in self.head.parameters() if p.requires_grad)

    @property
    def n_total(self) -> int:
        return sum(p.numel() for p in self._backbone.parameters()) + self.n_trainable

    @property
    def engine(self) -> str | None:
        return self.extractor.engine_used

    def _save_weights(self, directory: Path) -> dict[str, Any]:
        _save_safetensors(self._backbone, directory / "backbone.safetensors")
        if isinstance(self.head, SklearnHead):
            import skops.io as sio

            atomic_write(directory / "head.skops", sio.dumps(self.head.estimator_))
        else:
            _save_safetensors(self.head, directory / "head.safetensors")
        return {"feature_dim": int(self._backbone.num_features),
                "head_params": getattr(self.head, "params_", None)}

    @classmethod
    def _load(cls, directory: Path, meta: dict[str, Any], options: TrainOptions) -> FrozenModel:
        with seeded(0):  # weights are overwritten: only keep the caller's generator untouched
            backbone = create_backbone(options.backbone, weights="random",
                                       in_chans=options.in_chans)
            backbone.reset_classifier(0)
        _load_weights(backbone, directory / "backbone.safetensors")
        # Provenance as recorded at training time (checked by check_model_meta), shown and
        # saved again; never trusted as an identity (the feature cache keys on the loaded
        # tensors themselves) nor opened as a file.
        backbone.weights_info = meta["weights_info"]
        dim = int(backbone.num_features)
        if meta.get("feature_dim", dim) != dim:
            raise MedtlError(f"{directory / MODEL_JSON}: feature_dim {meta['feature_dim']} is "
                             f"not the {dim} features of {options.backbone}")
        if (directory / "head.skops").exists():
            head: LinearHead | SklearnHead = SklearnHead.load(
                directory / "head.skops", options.head, multilabel=meta["multilabel"])
            if getattr(head.estimator_, "n_features_in_", dim) != dim:
                raise MedtlError(f"{directory / 'head.skops'}: expects "
                                 f"{head.estimator_.n_features_in_} features, the backbone "
                                 f"gives {dim}")
        else:
            with seeded(0):
                head = LinearHead(dim, len(meta["classes"]))
            _load_weights(head, directory / "head.safetensors")
        if isinstance(head, SklearnHead) and head.multilabel and \
                len(head.estimator_.estimators_) != len(meta["classes"]):
            raise MedtlError(f"{directory / 'head.skops'}: {len(head.estimator_.estimators_)} "
                             f"one-vs-rest estimators for {len(meta['classes'])} labels")
        return cls(backbone, head.eval() if isinstance(head, nn.Module) else head,
                   meta["classes"], meta["preprocessing"], options,
                   multilabel=meta["multilabel"])


def make_extractor(backbone: nn.Module, preprocessing: Preprocessing, options: TrainOptions,
                   device: str):
    from medtl.training.features import FrozenFeatures

    return FrozenFeatures(backbone, preprocessing, engine=options.engine, device=device,
                          batch_size=options.batch_size, cache=options.cache,
                          quiet=options.quiet, threads=options.threads)


# ------------------------------------------------------------------------------ network
class NetworkModel(FittedModel):
    """One trained network (Backbone or TruncatedBackbone with its classifier)."""

    kind = "network"

    def __init__(self, network: nn.Module, classes: list[str], preprocessing: Preprocessing,
                 options: TrainOptions, temperature: float | None = None, *,
                 multilabel: bool = False) -> None:
        super().__init__(classes, preprocessing, options, temperature, multilabel=multilabel)
        self.network = network

    @property
    def backbone(self) -> nn.Module:
        return self.network

    def predict_proba(self, data, *, calibrated: bool = True, cache: bool = True) -> np.ndarray:
        """Decoded and predicted :data:`PREDICT_CHUNK` images at a time, so peak memory does not
        grow with ``len(data)``; chunks are whole batches of the images read, so the batches,
        and the probabilities, are those of decoding everything at once."""
        if self.tta != "none":
            return self._tta_features_and_proba(data, calibrated=calibrated, cache=cache)[1]
        from medtl.training.loop import predict_proba

        config = self.loop_config()
        out = np.full((len(data), len(self.classes)), np.nan)
        for x, keep in self._decoded_chunks(data, config, cache):
            out[keep] = predict_proba(self.network, x, config, multilabel=self.multilabel)
        return self.calibrate(out) if calibrated else out

    def _decoded_chunks(self, data, config, cache: bool):
        """(pixels, indices) of whole batches of :data:`PREDICT_CHUNK` images at a time, under
        one progress bar: the streaming both prediction paths share."""
        from medtl.console import progress_bar

        chunk = -(-max(1, PREDICT_CHUNK) // config.batch_size) * config.batch_size
        with progress_bar("predicting", len(data),
                          quiet=self.options.quiet or not cache) as advance:
            for x, keep, _ in iter_decoded(data, self.preprocessing, chunk,
                                           skip_bad=self.options.skip_bad, advance=advance):
                if len(keep):
                    yield x, keep

    def features_and_proba(self, data, *, calibrated: bool = True, cache: bool = True,
                           ) -> tuple[np.ndarray, np.ndarray]:
        """Pooled features and probabilities in one forward pass per chunk (``forward`` is
        ``classifier(forward_features(x))`` for every network medtl trains), streamed as
        :meth:`predict_proba` streams."""
        if self.tta != "none":
            return self._tta_features_and_proba(data, calibrated=calibrated, cache=cache)
        config = self.loop_config()
        feats = np.full((len(data), int(self.network.num_features)), np.nan, dtype=np.float32)
        out = np.full((len(data), len(self.classes)), np.nan)
        for x, keep in self._decoded_chunks(data, config, cache):
            feats[keep], out[keep] = _features_then_proba(self.network, x, config,
                                                          multilabel=self.multilabel)
        return feats, (self.calibrate(out) if calibrated else out)

    def _proba_of_features(self, features: torch.Tensor) -> np.ndarray:
        logits = self.network.classifier(features)
        return _probabilities(logits.float().double(), self.multilabel).cpu().numpy()

    def loop_config(self, **changes: Any):
        """The training loop's settings for this model (batches, device, normalisation)."""
        from medtl.training.loop import TrainConfig

        o = self.options
        settings = dict(batch_size=min(o.batch_size, 32), patience=o.patience, seed=o.seed,
                        device=self.device, mean=self.preprocessing.model_mean,
                        std=self.preprocessing.model_std, quiet=o.quiet, threads=o.threads,
                        label_smoothing=o.label_smoothing, ema=o.ema, mix=o.resolved_mix,
                        precision=o.precision)
        return TrainConfig(**{**settings, **changes})

    def torch_module(self) -> nn.Module:
        return self.network.eval()

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.network.parameters() if p.requires_grad)

    @property
    def n_total(self) -> int:
        return sum(p.numel() for p in self.network.parameters())

    @property
    def engine(self) -> str:
        return f"torch-{self.device}"

    def trainable_blocks(self) -> int:
        """How many top blocks train (they are the top ones for every strategy)."""
        from medtl.transfer.freezing import frozen_blocks

        return len(self.network.blocks) - len(frozen_blocks(self.network))

    def _save_weights(self, directory: Path) -> dict[str, Any]:
        _save_safetensors(self.network, directory / "model.safetensors")
        return {"feature_dim": int(self.network.num_features), "head_params": None,
                "keep": getattr(self.network, "keep", None),
                "trainable_blocks": self.trainable_blocks()}

    @classmethod
    def _load(cls, directory: Path, meta: dict[str, Any], options: TrainOptions
              ) -> NetworkModel:
        from medtl.transfer.freezing import TruncatedBackbone, set_trainable

        num_classes = len(meta["classes"])
        keep = meta.get("keep")
        with seeded(0):  # weights are overwritten: only keep the caller's generator untouched
            bb = create_backbone(options.backbone, weights="random", in_chans=options.in_chans)
            bb.reset_classifier(num_classes)
            if "kind" not in meta and options.strategy == "truncated":  # medtl 0.1
                keep = options.keep if options.keep is not None else max(1, len(bb.blocks) // 2)
            if keep is not None and not 1 <= keep <= len(bb.blocks):
                raise MedtlError(f"{directory / MODEL_JSON}: keep {keep} is outside the 1.."
                                 f"{len(bb.blocks)} blocks of {options.backbone}")
            network = TruncatedBackbone(bb, keep, num_classes) if keep else bb
        trainable = meta.get("trainable_blocks")
        if trainable is None:  # medtl 0.1 recorded no count: what its loader marked
            climbs = options.strategy == "auto" or options.gradual
            trainable = 0 if climbs else (len(network.blocks) if options.strategy != "fine-tune"
                                          else (1 if options.unfreeze is None
                                                else options.unfreeze))
        if not 0 <= trainable <= len(network.blocks):
            raise MedtlError(f"{directory / MODEL_JSON}: trainable_blocks {trainable} is outside "
                             f"the 0..{len(network.blocks)} blocks of the network")
        set_trainable(network, unfreeze=trainable)
        _load_weights(network, directory / "model.safetensors")
        network.weights_info = meta["weights_info"]  # provenance only, as for frozen models
        network.eval()
        return cls(network, meta["classes"], meta["preprocessing"], options,
                   multilabel=meta.get("multilabel", False))


def _probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Softmax over classes; multi-label: each label's sigmoid."""
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


@torch.no_grad()
def _features_then_proba(network: nn.Module, x_uint8: torch.Tensor, config, *,
                         multilabel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """training.loop.predict_proba's batches, device, layout and autocast, keeping the pooled
    features on the way: the probabilities are the same numbers predict_proba gives."""
    from medtl.training.loop import ImageInputs, _autocast, torch_threads

    if getattr(network, "imagenet_pool", None) is not None:  # never so after reset_classifier
        raise MedtlError("a network with its ImageNet classifier has no single feature layer")
    device = torch.device(config.device)
    network.to(device=device, memory_format=torch.channels_last).eval()
    inputs = ImageInputs(config.mean, config.std)
    feats, probas = [], []
    with torch_threads(config.threads):
        for start in range(0, len(x_uint8), config.batch_size):
            xb = inputs.eval_batch(x_uint8[start:start + config.batch_size], device)
            with _autocast(device):
                f = network.forward_features(xb)
                logits = network.classifier(f)
            feats.append(f.float().cpu().numpy())
            probas.append(_probabilities(logits.float().double(), multilabel).cpu().numpy())
    return np.concatenate(feats), np.concatenate(probas)


def decode_images(data, preprocessing: Preprocessing, *, skip_bad: bool, quiet: bool,
                  ) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Decode and resize once into uint8 (N, S, S, 3): no epoch decodes a JPEG again.

    Returns the images, the indices of ``data`` they are, and why others were skipped. All of
    them are held at once, which training needs; prediction streams with :func:`iter_decoded`.
    """
    from medtl.console import progress_bar

    size = preprocessing.size
    with progress_bar("decoding images", len(data), quiet=quiet) as advance:
        parts = list(iter_decoded(data, preprocessing, max(1, len(data)), skip_bad=skip_bad,
                                  advance=advance))
    skipped = [reason for _, _, why in parts for reason in why]
    parts = [(x, keep) for x, keep, _ in parts if len(keep)]
    if not parts:
        return (torch.zeros((0, size, size, 3), dtype=torch.uint8),
                np.zeros(0, dtype=np.int64), skipped)
    return parts[0][0], parts[0][1], skipped  # one chunk holds everything


# Images decoded at once when a network predicts: about 77 MB of uint8 at 224 px, so peak
# memory stays bounded whatever the number of images (training decodes its splits whole).
PREDICT_CHUNK = 512


def iter_decoded(data, preprocessing: Preprocessing, chunk: int, *, skip_bad: bool,
                 advance: Callable[[int], None] | None = None,
                 ) -> Iterator[tuple[torch.Tensor, np.ndarray, list[str]]]:
    """``data`` decoded and resized in uint8 groups of ``chunk`` images read (the last one
    smaller), each with the indices of ``data`` it holds and why images were skipped."""
    images: list[np.ndarray] = []
    keep: list[int] = []
    skipped: list[str] = []
    for i in range(len(data)):
        try:
            images.append(preprocessing.resize_uint8(data.read(i)))
            keep.append(i)
        except DataReadError as exc:
            if not skip_bad:
                raise
            log.warning("skipped unreadable image %s: %s", exc.path, exc.reason)
            skipped.append(f"{exc.path}: {exc.reason}")
        if advance is not None:
            advance(1)
        if len(images) == chunk:
            yield torch.from_numpy(np.stack(images)), np.asarray(keep, dtype=np.int64), skipped
            images, keep, skipped = [], [], []
    if images or skipped:
        size = preprocessing.size
        x = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
        yield torch.from_numpy(x), np.asarray(keep, dtype=np.int64), skipped


# ------------------------------------------------------------------------------ weight files
def _save_safetensors(module: nn.Module, path: Path) -> None:
    """safetensors' save_model (it drops tensors that share storage), written atomically."""
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(module, str(tmp))


def _load_weights(module: nn.Module, path: Path) -> None:
    """Load a bundle's safetensors file; a mismatch is the user's file, not a crash.

    Bundles written before frozen runs dropped the ImageNet classifier still load: their
    ``classifier.*`` tensors are ignored, since nothing in a frozen run uses them.
    """
    from safetensors.torch import load_model

    if not path.is_file():
        raise MedtlError(f"{path}: missing from the run's model directory")
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except Exception as exc:  # a corrupt or foreign file: safetensors raises several types
        raise MedtlError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from exc
    unexpected = [k for k in unexpected if not k.startswith(("classifier.", "imagenet_pool."))]
    if missing or unexpected:
        raise MedtlError(f"{path}: does not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); was it written by another medtl?")

