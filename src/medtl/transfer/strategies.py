"""Transfer strategies behind one scikit-learn-style estimator, ``TransferClassifier``.

``__init__`` stores parameters; ``fit`` returns self; learned attributes end in ``_``.
Strategies of Kim et al. 2022 (design.md, "Transfer strategies"): the frozen-feature ones,
``feature-extractor`` (a torch linear head) and ``hybrid`` (a scikit-learn classifier), train on
cached features; ``fine-tune``, ``full``, ``scratch`` and ``truncated`` train the backbone through
``medtl.training.loop``; ``auto`` and ``fine-tune --gradual`` climb from the frozen features one
block at a time (``medtl.transfer.gradual``).
"""

from __future__ import annotations

import copy
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
CLASS_WEIGHTS = ("auto", "balanced", "none")
SAMPLERS = ("none", "balanced")
DEFAULT_STAGE_EPOCHS = 5


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
        strategy: str = "auto",
        head: str = "logreg",
        weights: str = "imagenet",
        image_size: int | None = None,
        in_chans: int = 3,
        epochs: int | None = None,
        batch_size: int = 64,
        unfreeze: int | None = None,
        gradual: bool = False,
        keep: int | None = None,
        lr: float = 1e-3,
        lr_decay: float = 0.5,
        augment: str = "basic",
        hflip: bool = True,
        patience: int = 5,
        class_weight: str = "auto",
        sampler: str = "none",
        calibrate: bool = False,
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
        self.gradual = gradual
        self.keep = keep
        self.lr = lr
        self.lr_decay = lr_decay
        self.augment = augment
        self.hflip = hflip
        self.patience = patience
        self.class_weight = class_weight
        self.sampler = sampler
        self.calibrate = calibrate
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
        check_choice("class weight", self.class_weight, CLASS_WEIGHTS)
        check_choice("sampler", self.sampler, SAMPLERS)
        if self.gradual and self.strategy != "fine-tune":
            raise MedtlError(f"--gradual applies to --strategy fine-tune, not '{self.strategy}' "
                             "(auto always climbs gradually)")
        if self.trainable_:
            from medtl.data.augment import AUGMENT_PRESETS

            check_choice("augment", self.augment, AUGMENT_PRESETS)
        elif self.sampler != "none":
            raise MedtlError(f"--sampler {self.sampler}: frozen strategies see each feature "
                             "vector once per fit; use --class-weight balanced")
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
        self.preprocessing_ = Preprocessing.for_spec(self.backbone_.spec, self.image_size,
                                                     channels=self.in_chans)
        self._make_extractor()

    def _make_extractor(self) -> None:
        self.extractor_ = FeatureExtractor(
            self.backbone_, self.preprocessing_, engine=self.engine, device=self.device_,
            batch_size=self.batch_size, cache=self.cache, quiet=self.quiet)

    @property
    def trainable_(self) -> bool:
        """Whether the backbone itself may train (and the model is saved whole)."""
        return self.strategy in TRAINABLE_STRATEGIES or self.strategy == "auto"

    @property
    def climbs_(self) -> bool:
        return self.strategy == "auto" or (self.strategy == "fine-tune" and self.gradual)

    def _use_class_weights(self, y: np.ndarray) -> bool:
        """Whether the loss weights classes 'balanced' (the sampler, when chosen, instead)."""
        counts = np.bincount(y, minlength=len(self.classes_))
        ratio = counts[counts > 0].min() / counts.max()
        summary = dict(zip(self.classes_, counts.tolist(), strict=True))
        if self.sampler == "balanced":
            log.info("class counts %s: balanced sampler, so no class weights", summary)
            return False
        if self.class_weight == "auto":
            if needs_balancing(y):
                log.info("class imbalance %s (minority/majority %.2f < %.1f): classes weighted "
                         "'balanced'", summary, ratio, IMBALANCE_RATIO)
                return True
            return False
        return self.class_weight == "balanced"

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
        self.temperature_: float | None = None
        if self.trainable_:
            self._fit_trainable(train, val, checkpoint_dir, resume)
        else:
            self._fit_frozen(train, val)
        if self.calibrate:
            self._fit_temperature(val)
        return self

    def _fit_temperature(self, val) -> None:
        """Temperature scaling on validation (Guo et al. 2017): fixes over-confidence, keeps
        every arg-max, so accuracy, AUC and the confusion matrix do not move."""
        from medtl.evaluation.stats import TemperatureScaler, logits_from_proba

        quiet, self.quiet = self.quiet, True
        proba = self.predict_proba(val, calibrated=False)
        self.quiet = quiet
        ok = np.isfinite(proba).all(axis=1)
        self.temperature_ = TemperatureScaler().fit(logits_from_proba(proba[ok]),
                                                    val.labels[ok]).temperature_
        log.info("calibration: temperature %.3f fitted on %d validation images",
                 self.temperature_, int(ok.sum()))

    def _fit_frozen(self, train, val) -> None:
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
        self.balanced_ = self._use_class_weights(y)
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
        self.resumed_s_ = 0.0  # frozen features: nothing to resume
        self.train_s_ = time.perf_counter() - t0

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
        if self.climbs_:
            set_trainable(model, "fine-tune", unfreeze=0)  # the climb starts frozen
        else:
            unfreeze = 1 if self.unfreeze is None else self.unfreeze
            set_trainable(model, self.strategy, unfreeze=unfreeze)
        return model

    def _train_config(self, *, epochs: int | None = None, seed: int | None = None):
        from medtl.training.loop import TrainConfig

        default = DEFAULT_STAGE_EPOCHS if self.climbs_ else 20
        return TrainConfig(
            epochs=epochs or self.epochs or default, batch_size=min(self.batch_size, 32),
            patience=self.patience, seed=self.seed if seed is None else seed,
            device=self.device_, class_weight="balanced" if self.balanced_ else None,
            sampler="balanced" if self.sampler == "balanced" else None,
            mean=self.preprocessing_.model_mean, std=self.preprocessing_.model_std,
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
        t0 = time.perf_counter()
        self.device_ = resolve_device(self.device)
        self.classes_ = list(train.classes)
        self.skipped_ = []
        weights = "random" if self.strategy == "scratch" else self.weights
        self.model_ = self._build_trainable(len(self.classes_), weights)
        self.backbone_ = self.model_
        self.preprocessing_ = Preprocessing.for_spec(self.model_.spec, self.image_size,
                                                     channels=self.in_chans)
        w = self.model_.weights_info
        log.info("backbone %s, weights %s (%s), sha256 %s; strategy %s%s", self.backbone,
                 w.kind, w.source, w.sha256, self.strategy, " --gradual" if self.gradual else "")
        x, keep = self._decode(train)
        xv, keep_v = self._decode(val)
        y = torch.from_numpy(train.labels[keep])
        yv = torch.from_numpy(val.labels[keep_v])
        self.feature_s_ = time.perf_counter() - t0
        self.balanced_ = self._use_class_weights(y.numpy())
        self.resumed_s_ = 0.0  # training time of an interrupted earlier process, if resumed
        if self.climbs_:
            self._climb(train, val, (x, y, xv, yv), checkpoint_dir, resume)
        else:
            result = self._train_stage(x, y, xv, yv, self.strategy, checkpoint_dir, resume)
            self.history_ = result.history
            self.resumed_s_ = result.resumed_s
        self.head_ = None
        self.train_s_ = time.perf_counter() - t0 + self.resumed_s_
        return self

    def _train_stage(self, x, y, xv, yv, label: str, checkpoint_dir, resume, *,
                     seed: int | None = None):
        """One run of the training loop with the model's current trainable blocks."""
        from medtl.data.augment import make_augment
        from medtl.training.loop import fit as fit_loop

        # From random weights no block holds knowledge to protect: one rate for all.
        decay = 1.0 if self.strategy == "scratch" else self.lr_decay
        groups = param_groups(self.model_, self.lr, decay)
        frozen = set(frozen_blocks(self.model_))
        log.info("training %s: %d blocks (%s) + classifier, %d parameters; learning rates %s",
                 label, len(self.model_.blocks) - len(frozen),
                 ", ".join(b for b in self.model_.blocks if b not in frozen) or "none",
                 self.n_trainable_, {g["name"]: f"{g['lr']:.2g}" for g in groups})
        result = fit_loop(self.model_, groups, x, y, xv, yv, self._train_config(seed=seed),
                          checkpoint_dir=checkpoint_dir, resume=resume,
                          augment=make_augment(self.augment, hflip=self.hflip),
                          train_mode=train_mode_hook(self.model_))
        log.info("%s: best validation AUC %.4f at epoch %d of %d%s", label, result.best_val_auc,
                 result.best_epoch, len(result.history),
                 " (stopped early)" if result.stopped_early else "")
        return result

    def _climb(self, train, val, tensors, checkpoint_dir, resume) -> None:
        """``auto`` / ``fine-tune --gradual``: frozen features first, then one block at a time.

        The state after each finished stage is saved atomically in ``climb.pt`` under
        ``checkpoint_dir`` (best weights, results, history), and each stage checkpoints its
        epochs in ``stage-K/``, so ``resume`` loses at most one epoch.
        """
        from medtl.training.loop import load_checkpoint, save_checkpoint
        from medtl.transfer.gradual import StageResult, climb, plan_stages

        x, y, xv, yv = tensors
        stages = plan_stages(self.strategy, list(self.model_.blocks), self.unfreeze)
        state_path = Path(checkpoint_dir) / "climb.pt" if checkpoint_dir is not None else None
        done: list[StageResult] = []
        self.history_ = []
        best_state = None
        if resume and state_path is not None and state_path.is_file():
            saved = load_checkpoint(state_path)
            done = [StageResult(**r) for r in saved["results"]]
            self.history_ = saved["history"]
            best_state = saved["model"]
            self.model_.load_state_dict(best_state)
            self.resumed_s_ += sum(r.seconds for r in done)
            log.info("resuming the climb after stage '%s'", done[-1].stage)
        log.info("%s: stages %s; each must raise validation AUC to be kept", self.strategy,
                 " -> ".join(f"'{s.name}'" for s in stages))

        def train_stage(stage) -> StageResult:
            t0 = time.perf_counter()
            set_trainable(self.model_, "fine-tune", unfreeze=stage.unfreeze)
            resumed_s = 0.0
            if stage.unfreeze == 0:
                history, best_epoch = self._fit_linear_probe(train, val)
                auc = self._val_auc(xv, yv)
                epochs = len(history)
            else:
                sub = Path(checkpoint_dir) / f"stage-{stage.index}" if checkpoint_dir else None
                r = self._train_stage(x, y, xv, yv, f"stage '{stage.name}'", sub, resume,
                                      seed=self.seed + stage.index)
                history, best_epoch, auc, epochs = (r.history, r.best_epoch, r.best_val_auc,
                                                    len(r.history))
                resumed_s = r.resumed_s
                self.resumed_s_ += resumed_s
            self.history_.extend({"stage": stage.name, **row} for row in history)
            return StageResult(stage=stage.name, unfreeze=stage.unfreeze, val_auc=float(auc),
                               epochs=epochs, best_epoch=best_epoch,
                               seconds=time.perf_counter() - t0 + resumed_s,
                               trainable_params=self.n_trainable_)

        def report(stage, result) -> None:
            log.info("stage %d/%d '%s' (%s + classifier): validation AUC %.4f, %d epochs, "
                     "%.1f s -> %s", stage.index + 1, len(stages), stage.name,
                     ", ".join(list(self.model_.blocks)[len(self.model_.blocks)
                                                        - stage.unfreeze:]) or "no block",
                     result.val_auc, result.epochs, result.seconds, result.decision)

        def persist(results) -> None:
            if state_path is not None:
                save_checkpoint(state_path, {
                    "format": 1, "model": best_state, "history": self.history_,
                    "results": [r.to_dict() for r in results]})

        results = list(done)

        def accept(stage, result) -> None:
            nonlocal best_state
            report(stage, result)
            best_state = copy.deepcopy(self.model_.state_dict())
            results.append(result)
            persist(results)

        def reject(stage, result, best) -> None:
            report(stage, result)
            self.model_.load_state_dict(best_state)
            set_trainable(self.model_, "fine-tune", unfreeze=best.unfreeze)
            results.append(result)
            persist(results)

        final = climb(stages, train_stage, accept=accept, reject=reject, done=done)
        chosen = [r for r in final if r.accepted][-1]
        set_trainable(self.model_, "fine-tune", unfreeze=chosen.unfreeze)
        self.model_.eval()
        self.stages_ = [r.to_dict() for r in final]
        log.info("%s chose '%s': validation AUC %.4f with %d trainable parameters",
                 self.strategy, chosen.stage, chosen.val_auc, chosen.trainable_params)

    def _fit_linear_probe(self, train, val) -> tuple[list[dict], int]:
        """Stage 'feature-extractor': a linear head on cached frozen features, folded into the
        model's classifier, so the next stage starts from a trained head (linear probing then
        fine-tuning, Kumar et al. 2022) and the features' speed-ups (ONNX, cache) apply."""
        from medtl.console import progress_bar

        extractor = FeatureExtractor(self.model_, self.preprocessing_, engine=self.engine,
                                     device=self.device_, batch_size=self.batch_size,
                                     cache=self.cache, quiet=self.quiet)
        x = extractor.transform(train, skip_bad=True)
        xv = extractor.transform(val, skip_bad=True)
        ok, ok_v = np.isfinite(x).all(axis=1), np.isfinite(xv).all(axis=1)
        trainer = TorchHeadTrainer(epochs=200, seed=self.seed, balanced=self.balanced_)
        with progress_bar("train head", trainer.epochs, quiet=self.quiet) as advance:
            head = trainer.fit(x[ok], train.labels[ok], xv[ok_v], val.labels[ok_v],
                               len(self.classes_), progress=advance)
        with torch.no_grad():  # (f - mean) / std @ W.T + b  ==  f @ (W / std).T + b'
            weight = head.fc.weight / head.std
            bias = head.fc.bias - weight @ head.mean
            self.model_.classifier.weight.copy_(weight)
            self.model_.classifier.bias.copy_(bias)
        return trainer.history_, trainer.best_epoch_

    def _val_auc(self, xv: torch.Tensor, yv: torch.Tensor) -> float:
        from medtl.evaluation.metrics import classification_metrics
        from medtl.training.loop import predict_proba

        m = classification_metrics(yv.numpy(), predict_proba(self.model_, xv,
                                                              self._train_config()))
        return m["auc"] if m["auc"] is not None else m["accuracy"]

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

    def predict_proba_features(self, x: np.ndarray, *, calibrated: bool = True) -> np.ndarray:
        """Probabilities from frozen features (the output of ``transform``)."""
        out = self._head_proba(x)
        return self._apply_temperature(out) if calibrated else out

    def _apply_temperature(self, proba: np.ndarray) -> np.ndarray:
        t = getattr(self, "temperature_", None)
        if t is None:
            return proba
        from scipy.special import softmax

        from medtl.evaluation.stats import logits_from_proba

        out = np.full_like(proba, np.nan)
        ok = np.isfinite(proba).all(axis=1)
        out[ok] = softmax(logits_from_proba(proba[ok]) / t, axis=1)
        return out

    def _head_proba(self, x: np.ndarray) -> np.ndarray:
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

    def predict_proba(self, data, *, calibrated: bool = True) -> np.ndarray:
        """(n, n_classes) probabilities; NaN rows for images skipped as unreadable.

        With ``calibrate=True`` at fit time they are temperature-scaled unless
        ``calibrated=False``.
        """
        if self.trainable_:
            out = self._predict_trainable(data)
        else:
            out = self._head_proba(self.transform(data))
        return self._apply_temperature(out) if calibrated else out

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
                "batch_size", "unfreeze", "gradual", "keep", "lr", "lr_decay", "augment",
                "hflip", "patience", "class_weight", "sampler", "calibrate", "seed", "device",
                "engine", "cache", "skip_bad", "quiet")
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
            "temperature": getattr(self, "temperature_", None),
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
        clf.temperature_ = meta.get("temperature")
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
