"""Transfer strategies behind one scikit-learn-style estimator, ``TransferClassifier``.

``__init__`` stores parameters; ``fit`` returns self; learned attributes end in ``_``.
Strategies of Kim et al. 2022 (design.md, "Transfer strategies"). This module trains the
frozen-feature ones: ``feature-extractor`` (a torch linear head) and ``hybrid`` (a scikit-learn
classifier); the trainable strategies arrive with the fine-tuning engine.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtl.data.transforms import Preprocessing
from medtl.errors import MedtlError, check_choice
from medtl.models import create_backbone, get_spec
from medtl.run import Run
from medtl.training.features import ENGINES, FeatureExtractor
from medtl.transfer.freezing import (
    TRAINABLE_STRATEGIES,
    TruncatedBackbone,
    frozen_blocks,
    param_groups,
    set_trainable,
    train_mode_hook,
)
from medtl.transfer.heads import (
    IMBALANCE_RATIO,
    SKLEARN_HEADS,
    LinearHead,
    SklearnHead,
    TorchHeadTrainer,
    needs_balancing,
)

log = logging.getLogger("medtl")

STRATEGIES = ("feature-extractor", "hybrid", "fine-tune", "full", "scratch", "truncated", "auto")
FROZEN_STRATEGIES = ("feature-extractor", "hybrid")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    check_choice("device", device, DEVICES)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MedtlError("--device cuda: no CUDA GPU is available to PyTorch here")
    return device


class TransferClassifier:
    """An ImageNet backbone transferred to a medical classification task."""

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        strategy: str = "hybrid",
        head: str = "logreg",
        weights: str = "imagenet",
        image_size: int | None = None,
        in_chans: int = 3,
        epochs: int | None = None,
        batch_size: int = 64,
        unfreeze: int = 1,
        keep: int | None = None,
        lr: float = 1e-3,
        lr_decay: float = 0.5,
        augment: str = "basic",
        hflip: bool = True,
        patience: int = 5,
        seed: int = 0,
        device: str = "auto",
        engine: str = "auto",
        cache: bool = True,
        skip_bad: bool = False,
        quiet: bool = False,
    ) -> None:
        self.backbone = backbone
        self.strategy = strategy
        self.head = head
        self.weights = weights
        self.image_size = image_size
        self.in_chans = in_chans
        self.epochs = epochs
        self.batch_size = batch_size
        self.unfreeze = unfreeze
        self.keep = keep
        self.lr = lr
        self.lr_decay = lr_decay
        self.augment = augment
        self.hflip = hflip
        self.patience = patience
        self.seed = seed
        self.device = device
        self.engine = engine
        self.cache = cache
        self.skip_bad = skip_bad
        self.quiet = quiet

    # ------------------------------------------------------------------------------ fitting
    def _validate(self) -> None:
        get_spec(self.backbone)
        check_choice("strategy", self.strategy, STRATEGIES)
        if self.strategy not in FROZEN_STRATEGIES + TRAINABLE_STRATEGIES:
            raise MedtlError(f"strategy '{self.strategy}' is not available yet in this version; "
                             f"available: {', '.join(FROZEN_STRATEGIES + TRAINABLE_STRATEGIES)}")
        if self.strategy in TRAINABLE_STRATEGIES:
            from medtl.data.augment import AUGMENT_PRESETS

            check_choice("augment", self.augment, AUGMENT_PRESETS)
            if self.in_chans != 3:
                raise MedtlError("--in-chans 1 is available for frozen strategies only so far")
        if self.strategy == "hybrid":
            check_choice("head", self.head, SKLEARN_HEADS)
        check_choice("engine", self.engine, ENGINES)
        if self.in_chans not in (1, 3):
            raise MedtlError(f"--in-chans must be 1 or 3, not {self.in_chans}")

    def _build(self) -> None:
        torch.manual_seed(self.seed)
        self.device_ = resolve_device(self.device)
        self.backbone_ = create_backbone(self.backbone, weights=self.weights,
                                         in_chans=self.in_chans)
        # The ImageNet classifier is not part of the transferred model: drop it, so the saved
        # bundle and the parameter counts hold only what predicts.
        self.backbone_.reset_classifier(0)
        self.preprocessing_ = Preprocessing.for_spec(self.backbone_.spec, self.image_size)
        self._make_extractor()

    def _make_extractor(self) -> None:
        self.extractor_ = FeatureExtractor(
            self.backbone_, self.preprocessing_, engine=self.engine, device=self.device_,
            batch_size=self.batch_size, cache=self.cache, quiet=self.quiet)

    @property
    def trainable_(self) -> bool:
        return self.strategy in TRAINABLE_STRATEGIES

    def fit(self, train, val=None, *, checkpoint_dir: Path | None = None,
            resume: bool = False) -> TransferClassifier:
        """Train on ``train``; ``val`` chooses hyper-parameters and the early-stopping epoch.

        Trainable strategies checkpoint every epoch into ``checkpoint_dir`` when given, and
        ``resume`` continues from the last checkpoint there.
        """
        self._validate()
        if val is None or len(val) == 0:
            raise MedtlError("a validation split is needed to choose the head; "
                             "load_dataset carves one from train when none exists")
        if self.trainable_:
            return self._fit_trainable(train, val, checkpoint_dir, resume)
        t0 = time.perf_counter()
        self._build()
        self.classes_ = list(train.classes)
        self.skipped_: list[str] = []
        w = self.backbone_.weights_info
        log.info("backbone %s, weights %s (%s), sha256 %s", self.backbone, w.kind, w.source,
                 w.sha256)
        x, y = self._xy(train)
        xv, yv = self._xy(val)
        self.feature_s_ = time.perf_counter() - t0
        log.info("features: %d train + %d val images, %d dims, engine %s, %d computed "
                 "(the rest from the cache), %.1f s", len(x), len(xv), x.shape[1],
                 self.extractor_.engine_used or "cache", self.extractor_.n_computed,
                 self.feature_s_)
        self.balanced_ = needs_balancing(y)
        if self.balanced_:
            counts = np.bincount(y, minlength=len(self.classes_))
            log.info("class imbalance %s (minority/majority %.2f < %.1f): classes weighted "
                     "'balanced'", dict(zip(self.classes_, counts.tolist(), strict=True)),
                     counts[counts > 0].min() / counts.max(), IMBALANCE_RATIO)
        if self.strategy == "hybrid":
            self.head_ = SklearnHead(self.head, seed=self.seed,
                                     class_weight="balanced" if self.balanced_ else None
                                     ).fit(x, y, xv, yv)
            for row in self.head_.search_:
                log.info("hybrid %s %s", self.head, row)
            log.info("hybrid %s: chose %s on validation AUC", self.head, self.head_.params_)
            self.history_ = [{"stage": "hybrid", **r} for r in self.head_.search_]
        else:
            trainer = TorchHeadTrainer(epochs=self.epochs or 200, seed=self.seed,
                                       balanced=self.balanced_)
            from medtl.console import progress_bar
            with progress_bar("train head", trainer.epochs, quiet=self.quiet) as advance:
                self.head_ = trainer.fit(x, y, xv, yv, len(self.classes_), progress=advance)
            self.history_ = trainer.history_
            log.info("feature-extractor head: best validation AUC at epoch %d of %d",
                     trainer.best_epoch_, len(trainer.history_))
        self.train_s_ = time.perf_counter() - t0
        return self

    # ------------------------------------------------------------------ trainable strategies
    def _build_trainable(self, num_classes: int, weights: str) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        bb = create_backbone(self.backbone, weights=weights, in_chans=self.in_chans)
        bb.reset_classifier(num_classes)
        if self.strategy == "truncated":
            keep = self.keep if self.keep is not None else max(1, len(bb.blocks) // 2)
            model = TruncatedBackbone(bb, keep, num_classes)
        else:
            model = bb
        set_trainable(model, self.strategy, unfreeze=self.unfreeze)
        return model

    def _train_config(self):
        from medtl.training.loop import TrainConfig

        return TrainConfig(
            epochs=self.epochs or 20, batch_size=min(self.batch_size, 32),
            patience=self.patience, seed=self.seed, device=self.device_,
            class_weight="balanced" if self.balanced_ else None,
            mean=tuple(self.preprocessing_.mean), std=tuple(self.preprocessing_.std),
            quiet=self.quiet)

    def _decode(self, data) -> tuple[torch.Tensor, np.ndarray]:
        """Decode and resize once into uint8 (N, S, S, 3): no epoch decodes a JPEG again."""
        from medtl.console import progress_bar
        from medtl.errors import DataReadError

        images, keep = [], []
        with progress_bar("decoding images", len(data), quiet=self.quiet) as advance:
            for i in range(len(data)):
                try:
                    images.append(self.preprocessing_.resize_uint8(data.read(i)))
                    keep.append(i)
                except DataReadError as exc:
                    if not self.skip_bad:
                        raise
                    log.warning("skipped unreadable image %s: %s", exc.path, exc.reason)
                    self.skipped_.append(f"{exc.path}: {exc.reason}")
                advance(1)
        size = self.preprocessing_.size
        x = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
        return torch.from_numpy(x), np.asarray(keep, dtype=np.int64)

    def _fit_trainable(self, train, val, checkpoint_dir, resume) -> TransferClassifier:
        from medtl.data.augment import make_augment
        from medtl.training.loop import fit as fit_loop

        t0 = time.perf_counter()
        self.device_ = resolve_device(self.device)
        self.classes_ = list(train.classes)
        self.skipped_ = []
        weights = "random" if self.strategy == "scratch" else self.weights
        self.model_ = self._build_trainable(len(self.classes_), weights)
        self.backbone_ = self.model_
        self.preprocessing_ = Preprocessing.for_spec(self.model_.spec, self.image_size)
        w = self.model_.weights_info
        log.info("backbone %s, weights %s (%s), sha256 %s; strategy %s", self.backbone, w.kind,
                 w.source, w.sha256, self.strategy)
        x, keep = self._decode(train)
        xv, keep_v = self._decode(val)
        y = torch.from_numpy(train.labels[keep])
        yv = torch.from_numpy(val.labels[keep_v])
        self.feature_s_ = time.perf_counter() - t0
        self.balanced_ = needs_balancing(y.numpy())
        if self.balanced_:
            log.info("class imbalance (minority/majority < %.1f): classes weighted 'balanced'",
                     IMBALANCE_RATIO)
        # From random weights no block holds knowledge to protect: one rate for all.
        decay = 1.0 if self.strategy == "scratch" else self.lr_decay
        groups = param_groups(self.model_, self.lr, decay)
        log.info("training %s: %d blocks (%s) + classifier, %d parameters; learning rates %s",
                 self.strategy, len(self.model_.blocks) - len(frozen_blocks(self.model_)),
                 ", ".join(b for b in self.model_.blocks if b not in frozen_blocks(self.model_)),
                 self.n_trainable_, {g["name"]: f"{g['lr']:.2g}" for g in groups})
        augment = make_augment(self.augment, hflip=self.hflip)
        result = fit_loop(self.model_, groups, x, y, xv, yv, self._train_config(),
                          checkpoint_dir=checkpoint_dir, resume=resume, augment=augment,
                          train_mode=train_mode_hook(self.model_))
        self.history_ = result.history
        log.info("best validation AUC %.4f at epoch %d of %d%s", result.best_val_auc,
                 result.best_epoch, len(result.history),
                 " (stopped early)" if result.stopped_early else "")
        self.head_ = None
        self.train_s_ = time.perf_counter() - t0
        return self

    def _predict_trainable(self, data) -> np.ndarray:
        from medtl.training.loop import predict_proba

        x, keep = self._decode(data)
        out = np.full((len(data), len(self.classes_)), np.nan)
        if len(keep):
            out[keep] = predict_proba(self.model_, x, self._train_config())
        return out

    def _xy(self, data) -> tuple[np.ndarray, np.ndarray]:
        x = self.extractor_.transform(data, skip_bad=self.skip_bad)
        y = data.labels
        if self.extractor_.bad_:
            for reason in self.extractor_.bad_.values():
                log.warning("skipped unreadable image %s", reason)
            self.skipped_.extend(self.extractor_.bad_.values())
            keep = np.isfinite(x).all(axis=1)
            x, y = x[keep], y[keep]
        return x, y

    # ------------------------------------------------------------------------------ predicting
    def transform(self, data) -> np.ndarray:
        """Frozen features (n, feature_dim); rows of unreadable images are NaN with skip_bad."""
        return self.extractor_.transform(data, skip_bad=self.skip_bad)

    def predict_proba_features(self, x: np.ndarray) -> np.ndarray:
        out = np.full((len(x), len(self.classes_)), np.nan)
        ok = np.isfinite(x).all(axis=1)
        if ok.any():
            if isinstance(self.head_, SklearnHead):
                out[ok] = self.head_.predict_proba(x[ok])
            else:
                with torch.no_grad():
                    logits = self.head_(torch.from_numpy(x[ok]).float())
                    out[ok] = torch.softmax(logits, 1).double().numpy()
        return out

    def predict_proba(self, data) -> np.ndarray:
        """(n, n_classes) probabilities; NaN rows for images skipped as unreadable."""
        if self.trainable_:
            return self._predict_trainable(data)
        return self.predict_proba_features(self.transform(data))

    def predict(self, data) -> np.ndarray:
        return np.nanargmax(self.predict_proba(data), axis=1)

    @property
    def n_trainable_(self) -> int:
        if self.trainable_:
            return sum(p.numel() for p in self.model_.parameters() if p.requires_grad)
        if isinstance(self.head_, SklearnHead):
            return self.head_.n_parameters
        return sum(p.numel() for p in self.head_.parameters() if p.requires_grad)

    @property
    def n_total_(self) -> int:
        if self.trainable_:
            return sum(p.numel() for p in self.model_.parameters())
        return sum(p.numel() for p in self.backbone_.parameters()) + self.n_trainable_

    # ------------------------------------------------------------------------------ persistence
    def get_params(self) -> dict[str, Any]:
        keys = ("backbone", "strategy", "head", "weights", "image_size", "in_chans", "epochs",
                "batch_size", "unfreeze", "keep", "lr", "lr_decay", "augment", "hflip",
                "patience", "seed", "device", "engine", "cache", "skip_bad", "quiet")
        return {k: getattr(self, k) for k in keys}

    def save(self, path: str | Path) -> Run:
        """Write a run directory holding the model and its configuration; returns the Run.

        ``medtl.train`` writes a complete run (metrics, predictions, report); this writes what
        a model trained from Python needs to be loaded and used again.
        """
        import medtl
        from medtl.run import write_json

        path = Path(path)
        self.save_model(path / "model")
        write_json(path / "config.json", {
            "backbone": self.backbone, "strategy": self.strategy, "head": self.head,
            "weights": self.backbone_.weights_info.to_dict(), "seed": self.seed,
            "classes": self.classes_, "preprocessing": self.preprocessing_.to_dict(),
            "positive_class": self.classes_[-1] if len(self.classes_) == 2 else None,
            "medtl_version": medtl.__version__})
        return Run(path)

    def save_model(self, model_dir: Path) -> None:
        """Write ``model/``: backbone and head, enough to predict with no other file."""
        from safetensors.torch import save_model

        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        if self.trainable_:
            save_model(self.model_, str(model_dir / "model.safetensors"))
        else:
            save_model(self.backbone_, str(model_dir / "backbone.safetensors"))
        if self.head_ is None:
            pass
        elif isinstance(self.head_, SklearnHead):
            self.head_.save(model_dir / "head.skops")
        else:
            save_model(self.head_, str(model_dir / "head.safetensors"))
        w = self.backbone_.weights_info
        meta = {
            "params": {k: v for k, v in self.get_params().items() if k != "quiet"},
            "classes": self.classes_,
            "preprocessing": self.preprocessing_.to_dict(),
            "feature_dim": int(self.backbone_.num_features),
            "num_classes": len(self.classes_),
            "head_params": getattr(self.head_, "params_", None),
            "weights_info": w.to_dict(),
        }
        (model_dir / "model.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load_model(cls, model_dir: Path, *, device: str = "auto", quiet: bool = False,
                   skip_bad: bool = False) -> TransferClassifier:
        from medtl.models.weights import WeightsInfo

        model_dir = Path(model_dir)
        meta_path = model_dir / "model.json"
        if not meta_path.is_file():
            raise MedtlError(f"{model_dir}: not a medtl model directory (no model.json)")
        meta = json.loads(meta_path.read_text())
        params = {**meta["params"], "device": device, "quiet": quiet, "skip_bad": skip_bad}
        clf = cls(**params)
        clf.device_ = resolve_device(device)
        clf.classes_ = meta["classes"]
        if clf.trainable_:
            clf.model_ = clf.backbone_ = clf._build_trainable(len(clf.classes_), "random")
            _load_weights(clf.model_, model_dir / "model.safetensors")
            clf.model_.eval()
            clf.preprocessing_ = Preprocessing.from_dict(meta["preprocessing"])
            clf.balanced_ = False
            clf.head_ = None
            return clf
        clf.backbone_ = create_backbone(clf.backbone, weights="random", in_chans=clf.in_chans)
        clf.backbone_.reset_classifier(0)
        _load_weights(clf.backbone_, model_dir / "backbone.safetensors")
        # Same identity as at training time, so the feature cache (and its exactness) carries.
        wi = meta["weights_info"]
        clf.backbone_.weights_info = WeightsInfo(
            kind=wi["kind"], source=wi["source"], sha256=wi["sha256"],
            path=Path(wi["path"]) if wi["path"] else None)
        clf.preprocessing_ = Preprocessing.from_dict(meta["preprocessing"])
        if (model_dir / "head.skops").exists():
            clf.head_ = SklearnHead.load(model_dir / "head.skops", clf.head)
        else:
            clf.head_ = LinearHead(meta["feature_dim"], len(clf.classes_))
            _load_weights(clf.head_, model_dir / "head.safetensors")
            clf.head_.eval()
        clf._make_extractor()
        return clf


def _load_weights(module: torch.nn.Module, path: Path) -> None:
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
