"""The transfer strategies, one registry (name -> class with its own options), as backbones have.

Kim et al. 2022's approaches (design.md, "Transfer strategies"): ``feature-extractor`` (a torch
linear head on frozen features) and ``hybrid`` (a scikit-learn classifier on them) train on
cached features and give a ``FrozenModel``; ``fine-tune``, ``full``, ``scratch`` and
``truncated`` train the network through the shared loop and give a ``NetworkModel``; ``auto`` and
``fine-tune --gradual`` climb from the frozen features one block at a time (``gradual``).

A strategy from outside the package is a subclass of ``Strategy`` with ``@register_strategy``;
nothing outside this module branches on a strategy's name (docs/extending.md).

Multi-label data (``train.multilabel``; labels an (n, K) float matrix, NaN unknown) goes through
every strategy: sigmoid outputs and masked binary cross-entropy with per-label positive weights
(training.loop), one-vs-rest hybrid heads (heads.MaskedOneVsRest), ``auto``'s decisions on the
mean validation AUC over labels; the model's ``multilabel`` is set from the data.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from medtl.data.transforms import Preprocessing
from medtl.errors import MedtlError, check_choice
from medtl.models import create_backbone
from medtl.training import distributed
from medtl.training.loop import seeded
from medtl.training.options import GENERAL_OPTIONS, TrainOptions
from medtl.transfer.fitted import (
    FittedModel,
    FrozenModel,
    NetworkModel,
    decode_images,
    make_extractor,
)
from medtl.transfer.freezing import (
    TruncatedBackbone,
    frozen_blocks,
    param_groups,
    set_trainable,
    train_mode_hook,
)
from medtl.transfer.gradual import AUC_SATURATED, MIN_DELTA
from medtl.transfer.heads import (
    HEADS,
    IMBALANCE_RATIO,
    LinearHead,
    LinearHeadTrainer,
    SklearnHead,
    needs_balancing,
)

log = logging.getLogger("medtl")

DEFAULT_STAGE_EPOCHS = 5
# Options that may change when a run is resumed: where and how verbosely it computes, not what
# (medtl.workflow's --resume guard and the climb's state share this list).
RESUME_EXEMPT = ("quiet", "threads", "cache", "device", "engine", "time_budget")


@dataclass
class FitOutcome:
    """What a strategy's fit gives: the model and what the run records about its training."""

    model: FittedModel
    history: list[dict[str, Any]]
    balanced: bool
    feature_s: float
    resumed_s: float = 0.0
    stages: list[dict[str, Any]] | None = None
    skipped: list[str] = field(default_factory=list)
    head_params: dict[str, Any] | None = None
    # The head the model ended with, when it is not the strategy's own (auto may end with a
    # hybrid head of its frozen stage); None: ``Strategy.head_name``.
    head_name: str | None = None
    # --align: method, weight, the target's image count and fingerprint (config.json's
    # ``align``), and ``_keys``, the target images' content keys (not recorded).
    align: dict[str, Any] | None = None


class Strategy:
    """A way to transfer a backbone; subclasses set ``name`` and implement ``fit``.

    ``own_options``: the fields of ``TrainOptions`` this strategy reads beyond those every
    strategy reads (``GENERAL_OPTIONS``); a run records them, and one set away from its default
    that the strategy would ignore is warned about. ``head_name``: what config.json calls the
    head.
    """

    name: ClassVar[str]
    own_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: TrainOptions) -> None:
        self.options = options

    @classmethod
    def takes(cls, option: str) -> bool:
        return option in GENERAL_OPTIONS or option in cls.own_options

    def check(self) -> None:
        """Option mistakes of this strategy, raised before any data is read."""
        o = self.options
        if o.gradual and not self.takes("gradual"):
            raise MedtlError(f"--gradual applies to --strategy fine-tune, not '{self.name}' "
                             "(auto always climbs gradually)")
        defaults = TrainOptions()
        if o.head != defaults.head:  # a name no head has is a mistake even where it is unused
            check_choice("head", o.head, HEADS)
        for name in TrainOptions.names():
            if not self.takes(name) and getattr(o, name) != getattr(defaults, name):
                log.warning("--%s %s has no effect with --strategy %s", name.replace("_", "-"),
                            getattr(o, name), self.name)

    def own_values(self) -> dict[str, Any]:
        """The strategy's own options and their values, as a run records them."""
        return {k: getattr(self.options, k) for k in self.own_options}

    @property
    def head_name(self) -> str:
        return "linear"

    def fit(self, train, val, *, checkpoint_dir: Path | None = None, resume: bool = False,
            ) -> FitOutcome:
        raise NotImplementedError

    # ---------------------------------------------------------------- shared helpers
    def check_multilabel(self) -> None:
        """The options multi-label targets cannot take, refused (one line) before any image is
        decoded or trained on."""
        o = self.options
        if o.sampler == "balanced":
            raise MedtlError("--sampler balanced: multi-label images hold several labels at "
                             "once, so no draw balances them; use --class-weight balanced "
                             "(per-label positive weights)")
        if self.takes("mix") and o.resolved_mix != "none":
            preset = (f" (the --augment {o.augment} preset's)" if o.mix in (None, "none")
                      else "")
            raise MedtlError(f"--mix {o.resolved_mix}{preset}: mixup/CutMix mix one class per "
                             "image; not supported with multi-label targets (use --mix none)")
        if o.label_smoothing > 0:
            raise MedtlError(f"--label-smoothing {o.label_smoothing}: smooths a softmax over "
                             "classes; not supported with multi-label targets")

    def use_class_weights(self, y: np.ndarray, classes: list[str]) -> bool:
        """Whether the loss weights classes 'balanced' (the sampler, when chosen, instead).

        Multi-label ``y`` (n, K): per-label positive weights (n_negative / n_positive over the
        known training targets); "auto" turns them on when some label's positive/negative
        ratio is below IMBALANCE_RATIO, either way round."""
        o = self.options
        if np.ndim(y) == 2:
            return self._use_label_weights(y, classes)
        counts = np.bincount(y, minlength=len(classes))
        summary = dict(zip(classes, counts.tolist(), strict=True))
        if o.sampler == "balanced":
            log.info("class counts %s: balanced sampler, so no class weights", summary)
            return False
        if o.class_weight == "auto":
            if needs_balancing(y):
                ratio = counts[counts > 0].min() / counts.max()
                log.info("class imbalance %s (minority/majority %.2f < %.1f): classes weighted "
                         "'balanced'", summary, ratio, IMBALANCE_RATIO)
                return True
            return False
        return o.class_weight == "balanced"

    def _use_label_weights(self, y: np.ndarray, classes: list[str]) -> bool:
        o = self.options
        y = np.asarray(y, dtype=np.float64)
        summary = {c: f"{int((y[:, k] == 1).sum())}+/{int((y[:, k] == 0).sum())}-"
                   for k, c in enumerate(classes)}
        if o.class_weight == "auto":
            if needs_balancing(y):
                log.info("label imbalance %s (positive/negative below %.1f for some label): "
                         "per-label positive weights n_negative/n_positive", summary,
                         IMBALANCE_RATIO)
                return True
            return False
        return o.class_weight == "balanced"


STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available as ``--strategy cls.name`` everywhere."""
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str) -> type[Strategy]:
    check_choice("strategy", name, STRATEGIES)
    return STRATEGIES[name]


def read_target(items, classes: list[str], view):
    """--align-target: image files, folders (searched recursively) and CSV manifests (their
    ``path`` column, relative to the manifest's folder), read as `medtl adapt` reads TARGET;
    labels, if any, are not read."""
    from medtl.data import dataset_from_files

    files: list[str] = []
    for item in items:
        if str(item).lower().endswith(".csv") and Path(item).is_file():
            files += _manifest_paths(Path(item))
        else:
            files.append(str(item))
    return dataset_from_files(files, classes=classes, view=view)


def _manifest_paths(manifest: Path) -> list[str]:
    import csv

    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []):
            raise MedtlError(f"{manifest}: --align-target manifest needs a 'path' column")
        paths = [row["path"] for row in reader if row.get("path")]
    if not paths:
        raise MedtlError(f"{manifest}: --align-target manifest lists no image")
    return [p if Path(p).is_absolute() else str(manifest.parent / p) for p in paths]


# The augmentation stream of the target's kept copies under --frozen-cache (lower_cache's is 7).
ALIGN_COPY_STREAM = 8


def _log_weights(backbone: nn.Module, what: str) -> None:
    w = backbone.weights_info
    log.info("backbone %s, weights %s (%s), sha256 %s%s", backbone.spec.name, w.kind, w.source,
             w.sha256, what)


# ------------------------------------------------------------------------------ frozen
class FrozenStrategy(Strategy):
    """Frozen backbone features (computed once, cached) and a head fitted on them."""

    def check(self) -> None:
        # Before the generic check, which would first warn that --align has no effect here.
        if self.options.align != "none":
            raise MedtlError(f"--align {self.options.align}: --strategy {self.name} keeps the "
                             "backbone frozen, so its features cannot move toward the target; "
                             "align with a strategy that trains it (fine-tune, full, scratch, "
                             "truncated, auto), or train without --align")
        super().check()
        if self.options.sampler != "none":
            raise MedtlError(f"--sampler {self.options.sampler}: frozen strategies see each "
                             "feature vector once per fit; use --class-weight balanced")
        # None: an older run's record of the strong preset's mixing, not applied here.
        if self.options.mix not in (None, "none"):
            raise MedtlError(f"--mix {self.options.mix}: --strategy {self.name} extracts the "
                             "frozen features once, so there are no training images to mix; "
                             "use a trainable strategy (fine-tune, full, scratch, truncated, "
                             "auto) or --mix none")

    def fit_head(self, x, y, xv, yv, classes: list[str], balanced: bool,
                 ) -> tuple[LinearHead | SklearnHead, list[dict[str, Any]]]:
        raise NotImplementedError

    def fit(self, train, val, *, checkpoint_dir=None, resume=False) -> FitOutcome:
        o = self.options
        if train.multilabel:
            self.check_multilabel()
        t0 = time.perf_counter()
        with seeded(o.seed):  # weights="random" backbones: the same ones every time
            backbone = create_backbone(o.backbone, weights=o.weights, in_chans=o.in_chans)
        # The ImageNet classifier is not part of the transferred model: drop it, so the saved
        # bundle and the parameter counts hold only what predicts.
        backbone.reset_classifier(0)
        pre = Preprocessing.for_spec(backbone.spec, o.image_size, channels=o.in_chans)
        _log_weights(backbone, "")
        from medtl.training.options import resolve_device

        extractor = make_extractor(backbone, pre, o, resolve_device(o.device))
        skipped: list[str] = []
        x, y = _features(extractor, train, o.skip_bad, skipped)
        xv, yv = _features(extractor, val, o.skip_bad, skipped)
        feature_s = time.perf_counter() - t0
        log.info("features: %d train + %d val images, %d dims, engine %s, %d computed "
                 "(the rest from the cache), %.1f s", len(x), len(xv), x.shape[1],
                 extractor.engine_used or "cache", extractor.n_computed, feature_s)
        classes = list(train.classes)
        balanced = self.use_class_weights(y, classes)
        head, history = self.fit_head(x, y, xv, yv, classes, balanced)
        model = FrozenModel(backbone, head, classes, pre, o, multilabel=train.multilabel)
        model.extractor = extractor  # keeps its engine and the features it already has
        return FitOutcome(model=model, history=history, balanced=balanced, feature_s=feature_s,
                          skipped=skipped, head_params=getattr(head, "params_", None))


def _features(extractor, data, skip_bad: bool, skipped: list[str]
              ) -> tuple[np.ndarray, np.ndarray]:
    x = extractor.transform(data, skip_bad=skip_bad)
    y = data.labels
    if extractor.bad_:
        for reason in extractor.bad_.values():
            log.warning("skipped unreadable image %s", reason)
        skipped.extend(extractor.bad_.values())
        keep = np.isfinite(x).all(axis=1)
        x, y = x[keep], y[keep]
    return x, y


@register_strategy
class FeatureExtractorStrategy(FrozenStrategy):
    """A new linear head (standardised features, dropout, softmax) on frozen features."""

    name = "feature-extractor"
    own_options = ("epochs",)

    def fit_head(self, x, y, xv, yv, classes, balanced):
        o = self.options
        trainer = LinearHeadTrainer(epochs=o.epochs or 200, seed=o.seed, balanced=balanced,
                                    quiet=o.quiet, threads=o.threads)
        head = trainer.fit(x, y, xv, yv, len(classes))
        log.info("feature-extractor head: best validation AUC at epoch %d of %d",
                 trainer.best_epoch_, len(trainer.history_))
        return head, trainer.history_


@register_strategy
class HybridStrategy(FrozenStrategy):
    """Kim et al.'s feature-extractor hybrid: a scikit-learn classifier (``--head``) chosen on
    validation AUC over a small grid and fitted on the training split only."""

    name = "hybrid"
    own_options = ("head",)

    @property
    def head_name(self) -> str:
        return self.options.head

    def check(self) -> None:
        super().check()
        check_choice("head", self.options.head, HEADS)

    def fit_head(self, x, y, xv, yv, classes, balanced):
        o = self.options
        head = SklearnHead(o.head, seed=o.seed, class_weight="balanced" if balanced else None
                           ).fit(x, y, xv, yv, **_labels(y, classes))
        for row in head.search_:
            log.info("hybrid %s %s", o.head, row)
        log.info("hybrid %s: chose %s on validation AUC", o.head, head.params_)
        return head, [{"stage": "hybrid", **r} for r in head.search_]


# ------------------------------------------------------------------------------ network
class NetworkStrategy(Strategy):
    """The network trains through the shared loop; subclasses say which blocks and from which
    weights. Every epoch is checkpointed into ``checkpoint_dir`` when given."""

    own_options = ("epochs", "lr", "lr_decay", "augment", "hflip", "patience", "sampler",
                   "label_smoothing", "ema", "mix", "sync_bn", "memory_budget", "precision",
                   "align", "align_target", "align_weight")
    initial_weights: ClassVar[str | None] = None  # None: the --weights option
    lr_decay_applies: ClassVar[bool] = True
    # --align: the target images, decoded as the training images are (set by fit)
    align_x: Any = None

    def check(self) -> None:
        super().check()
        from medtl.data.augment import AUGMENT_PRESETS

        check_choice("augment", self.options.augment, AUGMENT_PRESETS)
        if self.options.align == "none" and self.options.align_weight != 1.0:
            log.warning("--align-weight %s has no effect without --align",
                        self.options.align_weight)
        if self.options.sync_bn:
            from medtl.training.options import resolve_device

            distributed.check_sync_bn(resolve_device(self.options.device))

    def own_values(self) -> dict[str, Any]:
        """As recorded, with --mix resolved: the mixing the run trained with, also where the
        --augment preset chose it (the options record what was asked)."""
        values = {**super().own_values(), "mix": self.options.resolved_mix}
        # config.json's ``align`` records the target (count, fingerprint); without alignment
        # the record is as it was before --align existed.
        values.pop("align_target")
        if self.options.align == "none":
            values.pop("align")
            values.pop("align_weight")
        return values

    def build(self, num_classes: int) -> nn.Module:
        """The network to train, its new layers drawn from the run's seed."""
        with seeded(self.options.seed):
            return self.make_network(num_classes)

    def make_network(self, num_classes: int) -> nn.Module:
        o = self.options
        bb = create_backbone(o.backbone, weights=self.initial_weights or o.weights,
                             in_chans=o.in_chans)
        bb.reset_classifier(num_classes)
        return bb

    def mark_trainable(self, network: nn.Module) -> None:
        set_trainable(network)

    def fit(self, train, val, *, checkpoint_dir=None, resume=False) -> FitOutcome:
        o = self.options
        if train.multilabel:
            self.check_multilabel()
        t0 = time.perf_counter()
        classes = list(train.classes)
        network = self.build(len(classes))
        self.mark_trainable(network)
        pre = Preprocessing.for_spec(network.spec, o.image_size, channels=o.in_chans)
        model = NetworkModel(network, classes, pre, o, multilabel=train.multilabel)
        if o.sync_bn:  # in place: the same parameters, the same state_dict keys
            distributed.sync_batchnorm(network, model.device)
        _log_weights(network, f"; strategy {self.name}{' --gradual' if o.gradual else ''}")
        skipped: list[str] = []  # streamed images report theirs here as training finds them
        # Decoded once to disk when streamed: in the checkpoints (gone with them), by rank 0
        # alone under DDP (the others decode their share every epoch).
        store = None
        if distributed.is_main():
            store = Path(checkpoint_dir) / "decoded" if checkpoint_dir is not None else "temp"
        data = self.images(train, val, pre, skipped, store)
        align = self.align_images(train, pre, skipped)
        feature_s = time.perf_counter() - t0
        balanced = self.use_class_weights(data[1].numpy(), classes)
        outcome = FitOutcome(model=model, history=[], balanced=balanced, feature_s=feature_s,
                             skipped=skipped, align=align)
        self.train(model, data, outcome, train, val, checkpoint_dir, resume)
        model.network.eval()
        return outcome

    def images(self, train, val, pre: Preprocessing, skipped: list[str], store=None):
        """(x, y, x_val, y_val): each split decoded once into memory when both fit the memory
        budget, else streamed from disk by worker processes (training.streaming); validation
        stays in memory whenever it fits alone."""
        from medtl.training.options import parse_budget
        from medtl.training.streaming import StreamedImages, decoded_bytes, describe

        o = self.options
        budget = parse_budget(o.memory_budget)
        need_train = decoded_bytes(len(train), pre.size)
        need_val = decoded_bytes(len(val), pre.size)
        out = []
        for split, need, stream, skip in (
                (train, need_train, need_train + need_val > budget, o.skip_bad),
                (val, need_val, need_val > budget, False)):
            if stream:
                x = StreamedImages(split, pre, skip_bad=skip, skipped=skipped, store=store)
                log.info("%d images at %d px take %s decoded, over the memory budget of %s "
                         "(--memory-budget %s): streamed from disk by %d worker process(es)",
                         len(split), pre.size, describe(need), describe(budget),
                         o.memory_budget, x.workers)
                out += [x, torch.from_numpy(split.labels)]
            else:
                x, keep, why = decode_images(split, pre, skip_bad=o.skip_bad, quiet=o.quiet)
                skipped += why
                out += [x, torch.from_numpy(split.labels[keep])]
        return tuple(out)

    def align_images(self, train, pre: Preprocessing, skipped: list[str]
                     ) -> dict[str, Any] | None:
        """--align: the target images (labels unused, never scored here) decoded into
        ``align_x``; what the run records of them."""
        o = self.options
        if o.align == "none":
            return None
        target = read_target(o.align_target, train.classes, train.view)
        x, keep, why = decode_images(target, pre, skip_bad=o.skip_bad, quiet=o.quiet)
        skipped += why
        if len(keep) < 2:
            raise MedtlError(f"--align {o.align}: {len(keep)} readable target image(s) in "
                             f"{', '.join(o.align_target)}; a covariance needs at least 2")
        self.align_x = x
        kept = target.subset(keep) if len(keep) < len(target) else target
        log.info("--align %s: %d unlabelled target images, weight %g (aligned to; never "
                 "scored by training)", o.align, len(keep), o.align_weight)
        return {"method": o.align, "weight": o.align_weight, "target_images": int(len(keep)),
                "target_fingerprint": kept.fingerprint(),
                "_keys": {kept.content_key(i) for i in range(len(kept))}}

    def unlabelled(self, x=None):
        """The loop's alignment term on ``x`` (default: the decoded target), None without."""
        if self.options.align == "none" or self.align_x is None:
            return None
        from medtl.training.align import unlabelled_term

        return unlabelled_term(self.options.align, self.align_x if x is None else x,
                               self.options.align_weight)

    def train(self, model: NetworkModel, data, outcome: FitOutcome, train, val,
              checkpoint_dir, resume) -> None:
        result = self.train_stage(model, data, self.name, outcome.balanced, checkpoint_dir,
                                  resume)
        outcome.history = result.history
        outcome.resumed_s = result.resumed_s

    def train_stage(self, model: NetworkModel, data, label: str, balanced: bool,
                    checkpoint_dir, resume, *, seed: int | None = None,
                    epochs: int | None = None, on_epoch_end=None):
        """One run of the training loop with the network's current trainable blocks."""
        from medtl.data.augment import make_augment
        from medtl.training.loop import fit as fit_loop

        o, net = self.options, model.network
        # From random weights no block holds knowledge to protect: one rate for all.
        groups = param_groups(net, o.lr, o.lr_decay if self.lr_decay_applies else 1.0)
        frozen = set(frozen_blocks(net))
        log.info("training %s: %d blocks (%s) + classifier, %d parameters; learning rates %s",
                 label, len(net.blocks) - len(frozen),
                 ", ".join(b for b in net.blocks if b not in frozen) or "none",
                 model.n_trainable, {g["name"]: f"{g['lr']:.2g}" for g in groups})
        config = model.loop_config(
            epochs=epochs or o.epochs or 20, seed=o.seed if seed is None else seed,
            class_weight="balanced" if balanced else None,
            sampler="balanced" if o.sampler == "balanced" else None)
        result = fit_loop(net, groups, *data, config, checkpoint_dir=checkpoint_dir,
                          resume=resume, augment=make_augment(o.augment, hflip=o.hflip),
                          train_mode=train_mode_hook(net), on_epoch_end=on_epoch_end,
                          unlabelled=self.unlabelled())
        log.info("%s: best validation AUC %.4f at epoch %d of %d%s", label, result.best_val_auc,
                 result.best_epoch, len(result.history),
                 " (stopped early)" if result.stopped_early else "")
        return result


@register_strategy
class FineTuneStrategy(NetworkStrategy):
    """The head plus the top ``--unfreeze`` blocks (default 1) at discriminative rates;
    ``--gradual`` climbs one block at a time while validation AUC improves."""

    name = "fine-tune"
    own_options = (*NetworkStrategy.own_options, "unfreeze", "gradual", "frozen_cache")
    full_stage_name: ClassVar[str | None] = None
    # The frozen stage compares the hybrid heads with the linear one (auto only: fine-tune
    # --gradual asked for a fine-tuned network).
    compare_heads: ClassVar[bool] = False

    @property
    def climbs(self) -> bool:
        return self.options.gradual

    def mark_trainable(self, network: nn.Module) -> None:
        if self.climbs:
            set_trainable(network, unfreeze=0)  # the climb starts frozen
        else:
            unfreeze = 1 if self.options.unfreeze is None else self.options.unfreeze
            set_trainable(network, unfreeze=unfreeze)

    def check(self) -> None:
        super().check()
        o = self.options
        if o.frozen_cache and self.climbs:
            raise MedtlError("--frozen-cache trains a fixed set of top blocks: not with "
                             f"--gradual or --strategy {self.name}")
        if o.frozen_cache:
            from medtl.models import get_spec
            from medtl.transfer.lower_cache import check_cache

            check_cache(o.frozen_cache, o.augment, o.resolved_mix,
                        1 if o.unfreeze is None else o.unfreeze,
                        len(get_spec(o.backbone).blocks))

    def train(self, model, data, outcome, train, val, checkpoint_dir, resume) -> None:
        if self.climbs:
            _Climb(self, model, data, outcome, checkpoint_dir, resume).run(train, val)
        elif self.options.frozen_cache:
            self._train_on_cache(model, data, outcome, checkpoint_dir, resume)
        else:
            super().train(model, data, outcome, train, val, checkpoint_dir, resume)

    def _train_on_cache(self, model, data, outcome, checkpoint_dir, resume) -> None:
        """--frozen-cache K: the top blocks trained on the kept outputs of the frozen ones
        (transfer.lower_cache)."""
        from medtl.data.augment import make_augment
        from medtl.training.loop import ImageInputs, torch_threads
        from medtl.training.loop import fit as fit_loop
        from medtl.transfer.lower_cache import (
            CachedInputs,
            EpochCopies,
            TopBlocks,
            lower_outputs,
        )

        o, net = self.options, model.network
        x, y, xv, yv = data
        start = len(frozen_blocks(net))
        config = model.loop_config(
            epochs=o.epochs or 20, class_weight="balanced" if outcome.balanced else None,
            sampler="balanced" if o.sampler == "balanced" else None)
        inputs = ImageInputs(config.mean, config.std, make_augment(o.augment, hflip=o.hflip))
        t0 = time.perf_counter()
        with torch_threads(o.threads):
            kw = dict(seed=o.seed, batch_size=config.batch_size,
                      device=torch.device(config.device), quiet=o.quiet)
            cached = lower_outputs(net, start, x, inputs, copies=o.frozen_cache, **kw)
            cached_v = lower_outputs(net, start, xv, inputs, copies=1, **kw)[0]
            # --align: the target's versions kept likewise, on an augmentation stream of
            # their own
            cached_t = (lower_outputs(net, start, self.align_x, inputs, copies=o.frozen_cache,
                                      stream=ALIGN_COPY_STREAM, **kw)
                        if self.align_x is not None else None)
        seconds = time.perf_counter() - t0
        outcome.feature_s += seconds
        log.info("frozen blocks %s run once: %d version(s) of %d training images and %d "
                 "validation images kept (%.0f MB) in %.1f s", ", ".join(frozen_blocks(net)),
                 o.frozen_cache, len(y), len(yv),
                 (cached.numel() + cached_v.numel()) * 4 / 2**20, seconds)
        groups = param_groups(net, o.lr, o.lr_decay)
        result = fit_loop(TopBlocks(net, start), groups, EpochCopies(cached), y, cached_v, yv,
                          config, checkpoint_dir=checkpoint_dir, resume=resume,
                          inputs=CachedInputs(),
                          unlabelled=(self.unlabelled(EpochCopies(cached_t))
                                      if cached_t is not None else None))
        log.info("%s: best validation AUC %.4f at epoch %d of %d%s", self.name,
                 result.best_val_auc, result.best_epoch, len(result.history),
                 " (stopped early)" if result.stopped_early else "")
        outcome.history = result.history
        outcome.resumed_s = result.resumed_s


@register_strategy
class AutoStrategy(FineTuneStrategy):
    """The reviews' protocol: frozen features first, then unfreeze top-down while validation
    improves; every layer ("full") only if that helps too."""

    name = "auto"
    own_options = (*NetworkStrategy.own_options, "unfreeze", "time_budget")
    full_stage_name = "full"
    compare_heads = True

    @property
    def climbs(self) -> bool:
        return True


@register_strategy
class FullStrategy(NetworkStrategy):
    """Every layer, from the pretrained weights (Kim et al.'s "fine-tuning from scratch")."""

    name = "full"


@register_strategy
class ScratchStrategy(NetworkStrategy):
    """Every layer from random weights: the no-transfer baseline."""

    name = "scratch"
    own_options = tuple(o for o in NetworkStrategy.own_options if o != "lr_decay")
    initial_weights = "random"
    lr_decay_applies = False


@register_strategy
class TruncatedStrategy(NetworkStrategy):
    """TruncatedTL (Peng et al. 2022): the lower ``--keep`` blocks (default half), fine-tuned,
    and a new head; the rest discarded."""

    name = "truncated"
    own_options = (*NetworkStrategy.own_options, "keep")

    def make_network(self, num_classes: int) -> nn.Module:
        bb = super().make_network(num_classes)
        keep = self.options.keep if self.options.keep is not None else max(1, len(bb.blocks) // 2)
        return TruncatedBackbone(bb, keep, num_classes)


# ------------------------------------------------------------------------------ the climb
class _Climb:
    """``auto`` / ``fine-tune --gradual``: frozen features first, then one block at a time.

    The state after each finished stage is saved atomically in ``climb.pt`` under
    ``checkpoint_dir`` (best weights, results, history), and each stage checkpoints its epochs
    in ``stage-K/``, so ``resume`` loses at most one epoch.
    """

    def __init__(self, strategy: FineTuneStrategy, model: NetworkModel, data,
                 outcome: FitOutcome, checkpoint_dir, resume: bool) -> None:
        self.s, self.model, self.data, self.outcome = strategy, model, data, outcome
        self.checkpoint_dir, self.resume = checkpoint_dir, resume
        self.state_path = (Path(checkpoint_dir) / "climb.pt" if checkpoint_dir is not None
                           else None)
        self.best_state: dict | None = None
        self.heads: dict[str, SklearnHead] = {}  # the frozen stage's hybrid heads, fitted
        self.results: list = []
        self.data_sha256: str | None = None

    def run(self, train, val) -> None:
        from medtl.console import progress_bar
        from medtl.training.loop import load_checkpoint
        from medtl.transfer.autoplan import ClimbPlan
        from medtl.transfer.gradual import StageResult, climb, plan_stages

        o, net = self.s.options, self.model.network
        stages = plan_stages(list(net.blocks), o.unfreeze, full_name=self.s.full_stage_name)
        done: list[StageResult] = []
        if self.resume and self.state_path is not None and self.state_path.is_file():
            saved = load_checkpoint(self.state_path)
            self._check_resumable(saved, stages)
            done = [StageResult(**r) for r in saved["results"]]
            self.outcome.history = saved["history"]
            self.best_state = saved["model"]
            net.load_state_dict(self.best_state)
            self.outcome.resumed_s += sum(r.seconds for r in done)
            log.info("resuming the climb after stage '%s'", done[-1].stage)
        self.plan = ClimbPlan(stages, len(net.blocks), o.epochs or DEFAULT_STAGE_EPOCHS,
                              budget_s=None if o.time_budget is None else o.time_budget * 60,
                              spent_s=sum(r.seconds for r in done))
        log.info("%s", self.plan.announce(self.s.name))
        log.info("%s: a stage is kept when it beats the best so far on validation: by AUC, or, "
                 "where AUC cannot tell (both >= %s, or within %s), by accuracy, then log-loss",
                 self.s.name, AUC_SATURATED, MIN_DELTA)
        self.results = list(done)
        self.stages = stages
        with progress_bar(f"{self.s.name}: whole climb", 1, quiet=o.quiet,
                          percent=True) as self.bar:
            final = climb(stages, lambda stage: self._train(stage, train, val),
                          accept=self._accept, reject=self._reject, done=done,
                          before=self._before)
            self.bar.update(completed=1, total=1)  # done, whatever the estimate said
        chosen = [r for r in final if r.accepted][-1]
        if chosen.unfreeze == 0 and self.outcome.align is not None:
            # Only the stages that train blocks align; the frozen one cannot.
            self.outcome.align["aligned_stage_kept"] = False
            log.warning("--align %s: %s kept its frozen stage, which trains no backbone "
                        "layer: the model it ends with is not aligned to the target", o.align,
                        self.s.name)
        set_trainable(net, unfreeze=chosen.unfreeze)
        net.eval()
        self.outcome.stages = [r.to_dict() for r in final]
        # Under DDP only rank 0's model is kept: the others fit no head (nor touch the cache).
        if chosen.unfreeze == 0 and chosen.head not in ("linear", "logreg") \
                and distributed.is_main():
            self._end_with_hybrid(chosen, train, val)
        log.info("%s chose '%s'%s: validation AUC %.4f, accuracy %s, log-loss %s with %d "
                 "trainable parameters", self.s.name, chosen.stage,
                 f" (head {chosen.head})" if chosen.unfreeze == 0 else "", chosen.val_auc,
                 _fmt(chosen.val_accuracy), _fmt(chosen.val_log_loss), chosen.trainable_params)

    def _train(self, stage, train, val):
        from medtl.transfer.autoplan import BudgetReached, now
        from medtl.transfer.gradual import StageResult

        t0 = time.perf_counter()
        net = self.model.network
        set_trainable(net, unfreeze=stage.unfreeze)
        resumed_s, figures, head, candidates, stopped = 0.0, None, "linear", [], ""
        if stage.unfreeze == 0:
            history, best_epoch, head, candidates, figures = self._frozen_stage_once(train,
                                                                                    val)
            epochs = len(history)
            self.plan.observe_frozen(time.perf_counter() - t0, self.outcome.feature_s)
        else:
            sub = (Path(self.checkpoint_dir) / f"stage-{stage.index}" if self.checkpoint_dir
                   else None)
            epochs = self.s.options.epochs or DEFAULT_STAGE_EPOCHS
            mark = [now()]

            def on_epoch_end(epoch: int) -> None:
                self.plan.observe_epoch(stage.unfreeze, now() - mark[0])
                mark[0] = now()
                self._show(stage, epoch)
                # Under DDP rank 0's clock decides for every process (their clocks differ).
                if epoch < epochs and distributed.broadcast(self.plan.over(),
                                                            distributed.current()):
                    raise BudgetReached(epoch)

            try:
                r = self.s.train_stage(self.model, self.data, f"stage '{stage.name}'",
                                       self.outcome.balanced, sub, self.resume,
                                       seed=self.s.options.seed + stage.index, epochs=epochs,
                                       on_epoch_end=on_epoch_end)
                history, best_epoch, epochs = r.history, r.best_epoch, len(r.history)
                resumed_s = r.resumed_s
                self.outcome.resumed_s += resumed_s
            except BudgetReached as stop:
                history, best_epoch, epochs = [], 0, int(stop.args[0])
                stopped = (f"stopped: time budget reached during this stage, after {epochs} "
                           f"of its epochs")
        if figures is None:
            figures = self._val_figures()
        self.outcome.history.extend({"stage": stage.name, **row} for row in history)
        result = StageResult(stage=stage.name, unfreeze=stage.unfreeze,
                             val_auc=figures["val_auc"], epochs=epochs, best_epoch=best_epoch,
                             seconds=time.perf_counter() - t0 + resumed_s,
                             trainable_params=(self.heads[head].n_parameters
                                               if head in self.heads and head != "logreg"
                                               else self.model.n_trainable),
                             decision=stopped,
                             val_accuracy=figures["val_accuracy"],
                             val_log_loss=figures["val_log_loss"], n_val=figures["n_val"],
                             head=head, candidates=candidates)
        if stopped:
            log.info("time budget reached during stage %d '%s'; kept stage %d '%s'",
                     stage.index + 1, stage.name, *self._best_number())
        return result

    def _before(self, stage, best) -> str | None:
        """Stop before ``stage`` when the time budget has ended or the stage cannot finish in
        what is left of it (the estimate); the frozen stage always runs."""
        self._show(stage, 0)
        if best is None or distributed.broadcast(self.plan.fits(stage), distributed.current()):
            return None
        need = self.plan.stage_s(stage) or 0.0
        number, kept = self._best_number(best.stage)
        why = (f"time budget reached after stage {stage.index} "
               f"'{self.stages[stage.index - 1].name}' ({self.plan.progress([])}; stage "
               f"{stage.index + 1} '{stage.name}' would need about {need / 60:.1f} min); "
               f"kept stage {number} '{kept}'")
        log.info("%s", why)
        return why

    def _best_number(self, name: str | None = None) -> tuple[int, str]:
        if name is None:
            name = [r for r in self.results if r.accepted][-1].stage
        return [s.index for s in self.stages if s.name == name][0] + 1, name

    def _show(self, stage, epochs_done: int) -> None:
        """The overall bar: elapsed against elapsed + the estimate of what is left."""
        following = self.stages[stage.index + 1:]
        now_s = self.plan.elapsed()
        here = self.plan.stage_s(stage, epochs_done) if epochs_done or stage.unfreeze else None
        left = self.plan.left_s(following)
        total = now_s + (here or 0.0) + (left or 0.0)
        self.bar.update(completed=now_s, total=max(total, now_s, 1e-9),
                        description=f"{self.s.name}: stage {stage.index + 1}/{len(self.stages)}"
                                    f" '{stage.name}'")

    def _report(self, stage, result) -> None:
        blocks = list(self.model.network.blocks)
        log.info("stage %d/%d '%s' (%s + classifier): validation AUC %.4f, %d epochs, "
                 "%.1f s -> %s", stage.index + 1, len(self.stages), stage.name,
                 ", ".join(blocks[len(blocks) - stage.unfreeze:]) or "no block",
                 result.val_auc, result.epochs, result.seconds, result.decision)
        if result.accepted and stage.index + 1 < len(self.stages):
            log.info("%s: %s", self.s.name, self.plan.progress(self.stages[stage.index + 1:]))

    def _settings(self, stages) -> dict[str, Any]:
        """What the climb was asked (options, stage plan) and on what data, for --resume."""
        from medtl.training.loop import data_digest

        options = {k: v for k, v in self.s.options.to_dict().items() if k not in RESUME_EXEMPT}
        if self.data_sha256 is None:  # once: the data does not change during the climb
            self.data_sha256 = data_digest(*self.data)
        return {"options": options, "stages": [st.name for st in stages],
                "data": self.data_sha256}

    def _check_resumable(self, saved: dict, stages) -> None:
        """Refuse to continue a climb saved with other options, stages or data (one line)."""
        if "settings" not in saved:  # saved by a medtl that recorded none
            return
        old, new = saved["settings"], self._settings(stages)
        diffs = [f"{k}: {old['options'].get(k)!r} -> {v!r}" for k, v in new["options"].items()
                 if old["options"].get(k) != v]
        if old["stages"] != new["stages"]:
            diffs.append(f"stages: {old['stages']} -> {new['stages']}")
        if old["data"] != new["data"]:
            diffs.append(f"training data: sha256 {old['data'][:12]} -> {new['data'][:12]}")
        if diffs:
            raise MedtlError(f"{self.state_path}: cannot resume the climb with different "
                             f"settings ({'; '.join(diffs)})")

    def _persist(self) -> None:
        from medtl.training.loop import save_checkpoint

        if self.state_path is not None and distributed.is_main():
            save_checkpoint(self.state_path, {
                "format": 1, "model": self.best_state, "history": self.outcome.history,
                "results": [r.to_dict() for r in self.results],
                "settings": self._settings(self.stages)})

    def _accept(self, stage, result) -> None:
        self._report(stage, result)
        self.best_state = copy.deepcopy(self.model.network.state_dict())
        self.results.append(result)
        self._persist()

    def _reject(self, stage, result, best) -> None:
        self._report(stage, result)
        self.model.network.load_state_dict(self.best_state)
        set_trainable(self.model.network, unfreeze=best.unfreeze)
        self.results.append(result)
        self._persist()

    def _frozen_features(self, train, val):
        """The frozen backbone's features of train and val (computed once, then cached)."""
        o, net = self.s.options, self.model.network
        extractor = make_extractor(net, self.model.preprocessing, o, self.model.device)
        x = extractor.transform(train, skip_bad=True)
        xv = extractor.transform(val, skip_bad=True)
        ok, ok_v = np.isfinite(x).all(axis=1), np.isfinite(xv).all(axis=1)
        return x[ok], train.labels[ok], xv[ok_v], val.labels[ok_v]

    def _frozen_stage_once(self, train, val):
        """The frozen stage, computed by rank 0 alone under DDP (features, cache and heads are
        one process's work) and its outcome given to the others: the folded classifier, the
        history rows and what the stage returns."""
        group = distributed.current()
        if group is None:
            return self._frozen_stage(train, val)
        n_rows = len(self.outcome.history)
        cls = self.model.network.classifier
        shared = None
        if group.is_main:
            with distributed.alone():
                result = self._frozen_stage(train, val)
            shared = (result, self.outcome.history[n_rows:], cls.weight.detach().cpu(),
                      cls.bias.detach().cpu())
        result, rows, weight, bias = distributed.broadcast(shared, group)
        if not group.is_main:
            self.outcome.history.extend(rows)
            self._fold(weight, bias)
        return result

    def _frozen_stage(self, train, val):
        """Stage 'feature-extractor': a linear head on cached frozen features, folded into the
        network's classifier, so the next stage starts from a trained head (linear probing then
        fine-tuning, Kumar et al. 2022) and the features' speed-ups (ONNX, cache) apply.

        ``auto`` also fits each hybrid head (``HEADS``) on the same features; every candidate
        is scored on validation and the best by ``gradual.decide`` is the stage's result. A
        logistic regression that wins is folded into the classifier instead; an SVM, forest or
        kNN cannot be, so the climb trains from the linear head and must beat the winner."""
        from medtl.transfer.gradual import decide, val_figures

        o = self.s.options
        x, y, xv, yv = self._frozen_features(train, val)
        trainer = LinearHeadTrainer(epochs=200, seed=o.seed, balanced=self.outcome.balanced,
                                    quiet=o.quiet, threads=o.threads)
        linear = trainer.fit(x, y, xv, yv, len(self.model.classes))
        self._fold(*linear.folded())
        candidates = [{"head": "linear", "params": None, **self._val_figures()}]
        if self.s.compare_heads:
            cw = "balanced" if self.outcome.balanced else None
            for name in HEADS:
                try:
                    head = SklearnHead(name, seed=o.seed, class_weight=cw).fit(
                        x, y, xv, yv, **_labels(y, self.model.classes))
                except (ValueError, TypeError) as exc:  # e.g. too few images of a class for
                    # the SVM's Platt scaling, or for any kNN grid point: a candidate less
                    log.warning("frozen stage: head %s left out: %s", name, exc)
                    continue
                self.heads[name] = head
                candidates.append({"head": name, "params": head.params_,
                                   **val_figures(yv, head.predict_proba(xv))})
        best = candidates[0]
        for c in candidates:
            if c is not best:
                better, why = decide(_as_result(c), _as_result(best))
                c["decision"] = f"{'beats' if better else 'does not beat'} {best['head']}: {why}"
                best = c if better else best
            log.info("frozen stage, head %s%s: validation AUC %.4f, accuracy %.4f, log-loss "
                     "%.4f%s", c["head"], f" {c['params']}" if c["params"] else "",
                     c["val_auc"], c["val_accuracy"], c["val_log_loss"],
                     f" ({c['decision']})" if "decision" in c else "")
        if best["head"] == "logreg":
            layer = self.heads["logreg"].as_linear()
            self._fold(layer.weight, layer.bias)
        self.outcome.history.extend({"stage": "feature-extractor", "candidate": c["head"],
                                     **{k: v for k, v in c.items() if k != "head"}}
                                    for c in candidates)
        if len(candidates) > 1:
            log.info("frozen stage: head %s is the best on validation", best["head"])
        figures = {k: best[k] for k in ("val_auc", "val_accuracy", "val_log_loss", "n_val")}
        return trainer.history_, trainer.best_epoch_, best["head"], candidates, figures

    def _fold(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        with torch.no_grad():
            self.model.network.classifier.weight.copy_(weight)
            self.model.network.classifier.bias.copy_(bias)

    def _val_figures(self) -> dict[str, Any]:
        from medtl.training.loop import predict_proba
        from medtl.transfer.gradual import val_figures

        _, _, xv, yv = self.data
        return val_figures(yv.numpy(), predict_proba(self.model.network, xv,
                                                     self.model.loop_config(),
                                                     multilabel=self.model.multilabel))

    def _end_with_hybrid(self, chosen, train, val) -> None:
        """The run is the frozen stage's hybrid head: a FrozenModel on the (untouched)
        backbone. After --resume the head is fitted again on the cached features (its grid is
        deterministic for the seed, so it is the same head)."""
        o = self.s.options
        head = self.heads.get(chosen.head)
        if head is None:
            x, y, xv, yv = self._frozen_features(train, val)
            cw = "balanced" if self.outcome.balanced else None
            head = SklearnHead(chosen.head, seed=o.seed, class_weight=cw).fit(
                x, y, xv, yv, **_labels(y, self.model.classes))
        backbone = copy.deepcopy(self.model.network)
        backbone.reset_classifier(0)
        backbone.eval()
        options = o.replace(head=chosen.head)
        model = FrozenModel(backbone, head, self.model.classes, self.model.preprocessing,
                            options, multilabel=self.model.multilabel)
        self.outcome.model = model
        self.outcome.head_name = chosen.head
        self.outcome.head_params = head.params_


def _labels(y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """SklearnHead.fit's ``labels`` keyword for multi-label targets (names in its messages);
    nothing for class indices, whose call stays as it was."""
    return {"labels": list(classes)} if np.ndim(y) == 2 else {}


def _as_result(candidate: dict[str, Any]):
    """A frozen-stage candidate as the StageResult that ``gradual.decide`` compares."""
    from medtl.transfer.gradual import StageResult

    return StageResult(candidate["head"], 0, candidate["val_auc"], 0, 0, 0.0, 0,
                       val_accuracy=candidate["val_accuracy"],
                       val_log_loss=candidate["val_log_loss"], n_val=candidate["n_val"])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

