"""The one training loop: the backbone strategies (fine-tune, full, scratch, truncated, the climb
of ``auto``) and the linear head on frozen features both train here.

The loop does the epochs; what varies is a callback, as in fastai: early stopping on the
validation selection score (AUC, accuracy where AUC is undefined) with the best state restored,
an atomic checkpoint every epoch that ``resume=True`` continues from, the progress bar, the
history. What a batch is (uint8 images to augment and normalise, or feature vectors) is an
``Inputs`` object.

AdamW over caller-built parameter groups (discriminative learning rates are the caller's), with
a per-step linear warm-up then cosine schedule, or a constant rate (``schedule="constant"``).

Multi-label targets (float (n, K): 1 present, 0 absent, NaN unknown) train with binary
cross-entropy on the logits, masked: an unknown entry adds nothing to the loss nor to any
gradient (:class:`MaskedBCEWithLogits`); validation scores sigmoid probabilities. Options that
mix or reweight whole classes (balanced sampler, mixup/CutMix, label smoothing) are refused.

An optional term of the loss sees unlabelled samples too (``Unlabelled``: domain alignment,
medtl.training.align): each training batch is paired with a batch of them, and the term is
computed on the two batches' features as the model predicts them.

Reproducibility: shuffling, balanced sampling, augmentation, mixup/CutMix and the unlabelled
batches draw from generators derived from (seed, epoch) only; dropout draws from torch's global
generator, which the loop forks (the caller's state is restored when it returns, nothing is
reseeded behind its back) and whose state travels in the checkpoint, so on CPU a run killed and
resumed is bitwise the same as one never interrupted.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtl.console import progress_bar
from medtl.errors import MedtlError, check_choice
from medtl.training import distributed
from medtl.training.mixing import MIX_CHOICES, mix_batch, mix_generator
from medtl.training.selection import selection_score, val_summary
from medtl.training.streaming import index_batches, load_batches

log = logging.getLogger("medtl")

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
# A resumed run must continue the same training: every setting, learning rate and the data
# must match the checkpoint's, but these, which say where and how verbosely it runs.
RESUME_EXEMPT = ("device", "quiet", "threads")

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

# Generator streams of the unlabelled batches (0: order, 1: augmentation, 2: mixing).
UNLABELLED_ORDER_STREAM = 3
UNLABELLED_AUGMENT_STREAM = 4


@dataclass
class TrainConfig:
    """``warmup_epochs`` may be fractional: the schedule advances per optimizer step."""

    epochs: int = 20
    batch_size: int = 32
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    patience: int = 5
    # An epoch must beat the best score by more than this to count as an improvement.
    min_delta: float = 0.0
    schedule: str = "warmup-cosine"
    seed: int = 0
    device: str = "cpu"
    class_weight: str | None = None
    sampler: str | None = None
    # One value each for a grey (in_chans=1) model: batches are then averaged to one channel.
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    quiet: bool = True
    threads: int | None = None
    # Recipes (issue 17), off by default: the training loss's label smoothing (validation loss
    # stays plain cross-entropy, comparable across runs), and an exponential moving average of
    # the weights (decay per optimizer step), which is what validation scores, early stopping
    # keeps and the run saves.
    label_smoothing: float = 0.0
    ema: float | None = None
    # Mixup/CutMix of each training batch (none | mixup | cutmix | both; medtl.training.mixing);
    # the loss is the lambda-weighted mix of the two targets' losses through the criterion.
    mix: str = "none"
    # The training passes' arithmetic on CPU: fp32, or bf16 autocast (AVX-512 BF16 / AMX) with
    # depthwise convolutions kept in fp32, where oneDNN's bf16 is slower (benchmarks/
    # train_speed.py). Validation is fp32 either way. On GPU training is bf16 autocast always.
    precision: str = "fp32"


@dataclass
class FitResult:
    """``best_val_auc`` is validation accuracy instead where validation holds a single class."""

    history: list[dict]
    best_epoch: int
    best_val_auc: float
    stopped_early: bool
    # Seconds that an earlier, interrupted process spent on the epochs restored from the
    # checkpoint: without them a resumed run would report only its last part as its cost.
    resumed_s: float = 0.0


# ------------------------------------------------------------------------------ inputs
class Inputs:
    """How stored samples become a batch: float features as they are (the linear head)."""

    channels_last = False

    def check(self, x: torch.Tensor, y: torch.Tensor, split: str) -> None:
        _check_labels(x, y, split)

    def train_batch(self, xb: torch.Tensor, device: torch.device,
                    gen: torch.Generator) -> torch.Tensor:
        return xb.to(device).float()

    def eval_batch(self, xb: torch.Tensor, device: torch.device) -> torch.Tensor:
        return xb.to(device).float()


@dataclass
class ImageInputs(Inputs):
    """uint8 (N, H, W, 3) images: to [0, 1] on the device, augmented, normalised."""

    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    augment: Augment | None = None
    channels_last = True

    def check(self, x: torch.Tensor, y: torch.Tensor, split: str) -> None:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise MedtlError(f"{split} images must be uint8 (N, H, W, 3); got {x.dtype} "
                             f"{tuple(x.shape)}")
        _check_labels(x, y, split)

    def train_batch(self, xb, device, gen):
        xb = _to_float(xb, device)
        if self.augment is not None:
            xb = self.augment(xb, gen)
        return self._normalise(xb, device)

    def eval_batch(self, xb, device):
        return self._normalise(_to_float(xb, device), device)

    def _normalise(self, xb: torch.Tensor, device: torch.device) -> torch.Tensor:
        """RGB [0, 1] to the model's input; a one-channel ``mean`` means a grey model."""
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        if mean.shape[1] == 1:
            xb = xb.mean(dim=1, keepdim=True)
        return ((xb - mean) / std).contiguous(memory_format=torch.channels_last)


@dataclass
class Unlabelled:
    """Unlabelled samples and a term of the training loss computed on them.

    Each training batch is paired with as many samples of ``x`` (stored as the training samples
    are: a uint8 image tensor, streamed images, or versions by epoch), drawn without
    replacement through seeded permutations of ``x`` (generators of (seed, epoch) only, so a
    resumed run draws the same) and prepared as the training batch is (``Inputs.train_batch``,
    on an augmentation stream of their own). The training batch (unmixed) and its unlabelled
    batch then pass through the model as it predicts (eval mode, one extra forward and backward
    per step): that pass changes no BatchNorm statistic and draws no dropout, so the term moves
    the weights only, through its gradient. ``weight * term(source_features,
    target_features)`` is added to the batch's loss, the features being the input of the
    model's ``layer`` submodule (the pooled features its classifier sees); history rows record
    the term's mean (unweighted) as ``train_<name>``.
    """

    x: Any
    term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    weight: float = 1.0
    name: str = "unlabelled"
    layer: str = "classifier"

    def record(self) -> dict[str, Any]:
        """What a checkpoint holds of it: a resume with another term or data is refused."""
        return {"name": self.name, "weight": float(self.weight), "layer": self.layer,
                "data": data_digest(self.x)}


# ------------------------------------------------------------------------------ state, callbacks
@dataclass
class LoopState:
    """What callbacks see and may change (``stop`` ends training after this epoch)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    config: TrainConfig
    epoch: int = 0
    start_epoch: int = 1
    row: dict[str, Any] = field(default_factory=dict)
    score: float = -math.inf
    history: list[dict] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {
        "score": -math.inf, "epoch": 0, "state": None, "bad_epochs": 0})
    stop: bool = False
    resumed_s: float = 0.0
    # torch.optim.swa_utils.AveragedModel of ``model`` when config.ema is set
    ema: nn.Module | None = None
    unlabelled: Unlabelled | None = None

    @property
    def scored(self) -> nn.Module:
        """The weights validation scores and early stopping keeps: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model


class Callback:
    """A behaviour of the loop; every hook is optional."""

    def on_fit_start(self, state: LoopState) -> None: ...
    def on_epoch_end(self, state: LoopState) -> None: ...
    def on_fit_end(self, state: LoopState) -> None: ...


class History(Callback):
    def on_epoch_end(self, state: LoopState) -> None:
        state.history.append(state.row)


class EarlyStopping(Callback):
    """Keep the best state by validation score; stop after ``patience`` epochs without one;
    the model ends in its best state.

    An epoch that ties the best score exactly but has a lower validation loss is better too:
    on a small validation split AUC saturates at 1.0 within a few epochs, and the first epoch
    to reach it is rarely the best model.
    """

    def on_epoch_end(self, state: LoopState) -> None:
        best, cfg = state.best, state.config
        loss = state.row.get("val_loss")
        tie_better = (state.score == best["score"] and loss is not None
                      and loss < best.get("val_loss", math.inf))
        if state.score > best["score"] + cfg.min_delta or tie_better:
            best.update(score=state.score, epoch=state.epoch, val_loss=loss,
                        state=copy.deepcopy(state.scored.state_dict()), bad_epochs=0)
        else:
            best["bad_epochs"] += 1
            state.stop = best["bad_epochs"] >= cfg.patience and state.epoch < cfg.epochs

    def on_fit_end(self, state: LoopState) -> None:
        if state.best["state"] is not None:
            state.model.load_state_dict(state.best["state"])


@dataclass
class Checkpoint(Callback):
    """An atomic checkpoint after every epoch; ``resume`` continues from it."""

    directory: Path
    resume: bool = False
    data: str | None = None  # sha256 of the training and validation tensors (data_digest)
    unlabelled: dict | None = None  # Unlabelled.record(), None without one

    @property
    def path(self) -> Path:
        return Path(self.directory) / CHECKPOINT_NAME

    def on_fit_start(self, state: LoopState) -> None:
        if not (self.resume and self.path.exists()):
            return
        ckpt = load_checkpoint(self.path)
        _check_resumable(ckpt, state, self.data, self.path)
        if ckpt.get("unlabelled") != self.unlabelled:
            raise MedtlError(f"{self.path}: cannot resume with a different unlabelled term or "
                             f"data ({_shown(ckpt.get('unlabelled'))} -> "
                             f"{_shown(self.unlabelled)})")
        try:
            state.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:  # another architecture: missing keys, other shapes
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise MedtlError(f"{self.path}: cannot resume, the checkpoint holds another network "
                             f"({first[:200]})") from None
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.scheduler.load_state_dict(ckpt["scheduler"])
        if state.ema is not None:  # the settings check above guarantees the file holds one
            state.ema.load_state_dict(ckpt["ema"])
        state.best = {**ckpt["early_stopping"], "state": ckpt["best_state"]}
        state.history = ckpt["history"]
        state.stop = ckpt["stopped_early"]
        state.start_epoch = ckpt["epoch"] + 1
        state.resumed_s = sum(row.get("seconds", 0.0) for row in state.history)
        _set_rng_state(_rank_rng(ckpt, self.path))
        log.info("resuming %s after epoch %d (%.1f s of training already done)", self.path,
                 ckpt["epoch"], state.resumed_s)

    def on_epoch_end(self, state: LoopState) -> None:
        # Every process's generator state (dropout), so that a DDP run resumes bitwise too;
        # rank 0 alone writes.
        group = distributed.current()
        rngs = distributed.gather(_get_rng_state(), group)
        if distributed.is_main():
            self._save(state, rngs, group)
        # No process goes on before the epoch's checkpoint is on disk: one that stopped here
        # and resumed at once must read it.
        distributed.barrier()

    def _save(self, state: LoopState, rngs: list, group) -> None:
        save_checkpoint(self.path, {
            "format": CHECKPOINT_FORMAT, "epoch": state.epoch, "config": asdict(state.config),
            "data": self.data, "lrs": _initial_lrs(state.optimizer),
            "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "ema": state.ema.state_dict() if state.ema is not None else None,
            "early_stopping": {k: v for k, v in state.best.items() if k != "state"},
            "best_state": state.best["state"], "history": state.history,
            "stopped_early": state.stop, "rng": rngs[0],
            **({"rng_ranks": rngs} if group is not None else {}),
            **({"unlabelled": self.unlabelled} if self.unlabelled is not None else {}),
        })


class LogEpochs(Callback):
    def on_epoch_end(self, state: LoopState) -> None:
        r = state.row
        auc = r.get("val_auc")
        log.info("epoch %d/%d: train loss %.4f, val loss %s, val AUC %s, %.1f s", state.epoch,
                 state.config.epochs, r["train_loss"],
                 "n/a" if r.get("val_loss") is None else f"{r['val_loss']:.4f}",
                 "n/a" if auc is None else f"{auc:.4f}", r["seconds"])


@dataclass
class EpochHook(Callback):
    """Calls ``fn(epoch)`` once the epoch (and its checkpoint) is done."""

    fn: Callable[[int], Any]

    def on_epoch_end(self, state: LoopState) -> None:
        self.fn(state.epoch)


# ------------------------------------------------------------------------------ the loop
def epoch_generator(seed: int, epoch: int, stream: int = 0, device: str = "cpu") -> torch.Generator:
    """A generator that depends on (seed, epoch, stream) only, never on what ran before."""
    # SeedSequence mixes the parts, so nearby (seed, epoch) pairs give unrelated streams.
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def epoch_indices(
    y: torch.Tensor, *, seed: int, epoch: int, balanced: bool = False
) -> torch.Tensor:
    """The order of training samples in one epoch: a permutation, or balanced draws.

    Balanced draws are ``len(y)`` samples with replacement, each class equally likely, like
    ``WeightedRandomSampler`` but with the epoch's own generator.
    """
    g = epoch_generator(seed, epoch)
    if not balanced:
        return torch.randperm(len(y), generator=g)
    counts = torch.bincount(y).clamp(min=1).double()
    weights = 1.0 / counts[y]
    return torch.multinomial(weights, len(y), replacement=True, generator=g)


def balanced_class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's 'balanced' weights, n / (n_classes * count), 1 for an absent class."""
    from sklearn.utils.class_weight import compute_class_weight

    y = np.asarray(y)
    present = np.unique(y)
    out = np.ones(n_classes)
    out[present] = compute_class_weight("balanced", classes=present, y=y)
    return out


def positive_weights(y: np.ndarray) -> np.ndarray:
    """Multi-label: each label's ``pos_weight``, n_negative / n_positive over its known
    (non-NaN) targets, as BCEWithLogitsLoss takes it; 1 for a label without a known positive
    or negative (nothing to balance)."""
    y = np.asarray(y, dtype=np.float64)
    pos = (y == 1).sum(axis=0)
    neg = (y == 0).sum(axis=0)
    out = np.ones(y.shape[1])
    ok = (pos > 0) & (neg > 0)
    out[ok] = neg[ok] / pos[ok]
    return out


def masked_bce_parts(logits: torch.Tensor, target: torch.Tensor,
                     pos_weight: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the binary cross-entropies of the known entries, how many are known).

    ``mask`` (bool, as ``target``) says which entries are known; by default those that are not
    NaN. An unknown entry's target is never read: it is replaced by 0 before the loss and its
    loss by 0 after (``torch.where``, so its gradient is exactly 0, not NaN times 0)."""
    known = ~torch.isnan(target) if mask is None else mask.to(torch.bool)
    t = torch.where(known, target, torch.zeros_like(target)).to(logits.dtype)
    each = nn.functional.binary_cross_entropy_with_logits(logits, t, pos_weight=pos_weight,
                                                          reduction="none")
    return torch.where(known, each, torch.zeros_like(each)).sum(), known.sum()


class MaskedBCEWithLogits(nn.Module):
    """The multi-label criterion: binary cross-entropy on the logits with per-label
    ``pos_weight``, averaged over the known entries of the batch; a batch with none known
    gives 0 (and zero gradients)."""

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total, count = masked_bce_parts(logits, target, self.pos_weight)
        return total / count.clamp(min=1)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global generator seeded for this block only (new layers' initial weights); the
    caller's generator state comes back afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """PyTorch's intra-op threads for this block only (None: every core), then restored."""
    import os

    old = torch.get_num_threads()
    torch.set_num_threads(n or os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fit(
    model: nn.Module,
    param_groups: list[dict],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    config: TrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    augment: Augment | None = None,
    train_mode: Callable[[nn.Module], Any] | None = None,
    on_epoch_end: Callable[[int], Any] | None = None,
    inputs: Inputs | None = None,
    callbacks: Sequence[Callback] = (),
    unlabelled: Unlabelled | None = None,
) -> FitResult:
    """Train ``model``; it ends in its best state, in eval mode.

    ``inputs``: what the samples are (default: uint8 NHWC images, ``config.mean``/``std``,
    ``augment``). ``param_groups``: ``{"name", "params", "lr"}`` each. ``train_mode(model)``
    replaces ``model.train()`` at each epoch start (frozen BatchNorm layers stay in eval).
    ``on_epoch_end(epoch)`` runs once the epoch's checkpoint is on disk (epochs from 1).
    ``unlabelled``: a term of the loss on unlabelled samples as well (:class:`Unlabelled`).
    """
    inputs = inputs or ImageInputs(config.mean, config.std, augment)
    _check_config(config, param_groups)
    inputs.check(x_train, y_train, "train")
    inputs.check(x_val, y_val, "val")
    if (y_train.ndim == 2) != (y_val.ndim == 2) or (
            y_train.ndim == 2 and y_train.shape[1] != y_val.shape[1]):
        raise MedtlError(f"train targets {tuple(y_train.shape)} and val targets "
                         f"{tuple(y_val.shape)} are not of one task")
    if y_train.ndim == 2:
        check_multilabel_config(config)
    if unlabelled is not None:
        _check_unlabelled(model, unlabelled, inputs)
    device = torch.device(config.device)
    model.to(device=device, memory_format=torch.channels_last if inputs.channels_last
             else torch.contiguous_format)
    state, criterion = _start(model, param_groups, y_train, y_val, config, device)
    state.unlabelled = unlabelled
    # History before early stopping, and both before the checkpoint that saves what they hold.
    cbs: list[Callback] = [History(), EarlyStopping()]
    cbs += ([Checkpoint(Path(checkpoint_dir), resume, data_digest(x_train, y_train, x_val, y_val),
                        unlabelled.record() if unlabelled is not None else None)]
            if checkpoint_dir is not None else [])
    cbs += [LogEpochs()] if inputs.channels_last else []  # backbones log each epoch
    cbs += [EpochHook(on_epoch_end)] if on_epoch_end is not None else []
    cbs += list(callbacks)
    train_mode = train_mode or (lambda m: m.train())
    group = distributed.current()
    threads = config.threads or (distributed.default_threads() if group is not None else None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch_threads(threads):
        torch.manual_seed(distributed.rank_seed(config.seed, group))
        for cb in cbs:
            cb.on_fit_start(state)
        # Under DDP the training forward goes through the wrapper, which averages gradients;
        # validation, early stopping and checkpoints see the module itself.
        forward = distributed.wrap(model, group, device)
        with _depthwise_fp32(model, config.precision == "bf16" and device.type == "cpu"):
            _epochs(state, cbs, inputs, (x_train, y_train, x_val, y_val),
                    _global_mean(criterion, group), device, train_mode, forward)
        for cb in cbs:
            cb.on_fit_end(state)
    model.eval()
    return FitResult(history=state.history, best_epoch=state.best["epoch"],
                     best_val_auc=float(state.best["score"]), stopped_early=state.stop,
                     resumed_s=state.resumed_s)


def _epochs(state: LoopState, cbs: Sequence[Callback], inputs: Inputs, data, criterion,
            device: torch.device, train_mode: Callable[[nn.Module], Any],
            forward: nn.Module) -> None:
    x_train, y_train, x_val, y_val = data
    model, config = state.model, state.config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state.epoch = state.start_epoch
    while state.epoch <= config.epochs and not state.stop:
        t_epoch = time.perf_counter()
        train_mode(model)
        loss, lrs, extra = _train_epoch(state, inputs, x_train, y_train, criterion, device,
                                        forward)
        # BatchNorm statistics of rank 0 everywhere: every process then scores validation
        # alike and takes the same early-stopping decision.
        distributed.sync_buffers([model] + ([state.ema] if state.ema is not None else []),
                                 distributed.current())
        proba, val_loss = _evaluate(state.scored, inputs, x_val, y_val, config.batch_size,
                                    device, multilabel=y_val.ndim == 2)
        state.score = selection_score(y_val.numpy(), proba)
        state.row = {"epoch": state.epoch, "train_loss": loss, **extra, "val_loss": val_loss,
                     **val_summary(y_val.numpy(), proba), **lrs,
                     "trainable_params": trainable, "seconds": time.perf_counter() - t_epoch}
        for cb in cbs:
            cb.on_epoch_end(state)
        state.epoch += 1


def _start(model: nn.Module, param_groups: list[dict], y_train: torch.Tensor,
           y_val: torch.Tensor, config: TrainConfig, device: torch.device,
           ) -> tuple[LoopState, nn.Module]:
    """Optimizer, schedule and loss of a fit: AdamW, per-step schedule, class weights."""
    optimizer = torch.optim.AdamW([{**g, "params": list(g["params"])} for g in param_groups],
                                  weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(y_train) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config, steps_per_epoch))
    state = LoopState(model, optimizer, scheduler, config)
    if config.ema is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        # Buffers too: BatchNorm's running statistics follow the averaged weights.
        state.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema),
                                  use_buffers=True)
    if y_train.ndim == 2:
        pos_weight = None
        if config.class_weight == "balanced":
            pos_weight = torch.as_tensor(positive_weights(y_train.numpy()),
                                         dtype=torch.float32, device=device)
        return state, MaskedBCEWithLogits(pos_weight)
    n_classes = int(max(int(y_train.max()), int(y_val.max()))) + 1
    weight = None
    if config.class_weight == "balanced":
        weight = torch.as_tensor(balanced_class_weights(y_train.numpy(), n_classes),
                                 dtype=torch.float32, device=device)
    return state, nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


def _train_epoch(state: LoopState, inputs: Inputs, x: torch.Tensor, y: torch.Tensor,
                 criterion: Callable, device: torch.device, forward: nn.Module,
                 ) -> tuple[float, dict[str, float], dict[str, float]]:
    cfg, model, optimizer = state.config, state.model, state.optimizer
    group = distributed.current()
    steps = math.ceil(len(y) / cfg.batch_size)
    if hasattr(x, "for_epoch"):  # versions of the data by epoch (transfer.lower_cache)
        x = x.for_epoch(state.epoch)
    # The global order, the same for any number of processes; each takes its share of a batch.
    order = epoch_indices(y, seed=cfg.seed, epoch=state.epoch, balanced=cfg.sampler == "balanced")
    aug_gen = epoch_generator(cfg.seed, state.epoch, stream=distributed.rank_stream(1, group),
                              device=device.type)
    mix_rng = mix_generator(cfg.seed, state.epoch) if cfg.mix != "none" else None
    total_loss, seen, lrs = 0.0, 0, {}
    quiet = cfg.quiet or not distributed.is_main()
    batches = [order[start:start + cfg.batch_size]
               for start in range(0, len(order), cfg.batch_size)]
    if group is not None:  # a last batch too small to give every process a sample is left out
        batches = [b for b in batches if len(b) >= group.world_size]
    shares = [distributed.shard(b, group) for b in batches]
    pairing = (_Pairing(state.unlabelled, model, inputs, [len(b) for b in batches], cfg.seed,
                        state.epoch, device) if state.unlabelled is not None else None)
    with progress_bar(f"epoch {state.epoch}/{cfg.epochs}", steps, quiet=quiet) as advance, \
            pairing or nullcontext():
        # A decoded tensor is indexed; streamed images are read by worker processes ahead.
        for batch, (idx, images) in zip(batches, load_batches(x, shares), strict=True):
            if len(idx) == 0:  # every image of the share unreadable (--skip-bad, streamed)
                raise MedtlError(f"no readable image in a training batch of {len(batch)}: "
                                 "see the skipped images above")
            xb = inputs.train_batch(images, device, aug_gen)
            yb = y[idx].to(device)
            mixed = mix_batch(xb, yb, cfg.mix, mix_rng) if mix_rng is not None else None
            with _train_autocast(device, cfg.precision):
                logits = forward(mixed.x if mixed is not None else xb)
            loss = (mixed.loss(criterion, logits.float()) if mixed is not None
                    else criterion(logits.float(), yb))
            objective = loss if pairing is None else loss + pairing.loss(xb, cfg.precision)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            lrs = {f"lr_{g['name']}": float(g["lr"]) for g in optimizer.param_groups}
            optimizer.step()
            state.scheduler.step()
            if state.ema is not None:
                state.ema.update_parameters(model)
            # The global batch's mean loss: each process's part is its sum over the global
            # count, times N (DDP averages), so the parts add up to N times the mean.
            batch_loss = float(distributed.all_sum(loss.detach(), group)) / (
                group.world_size if group is not None else 1)
            total_loss += batch_loss * len(batch)
            seen += len(batch)
            advance(1)
    return total_loss / max(seen, 1), lrs, pairing.summary() if pairing is not None else {}


def unlabelled_indices(n: int, count: int, *, seed: int, epoch: int) -> torch.Tensor:
    """``count`` indices into ``n`` unlabelled samples for one epoch: seeded permutations of
    them, one after another (each sample once before any twice)."""
    g = epoch_generator(seed, epoch, stream=UNLABELLED_ORDER_STREAM)
    parts = [torch.randperm(n, generator=g) for _ in range(-(-count // n))]
    return torch.cat(parts)[:count] if parts else torch.zeros(0, dtype=torch.int64)


class _Pairing:
    """One epoch of an :class:`Unlabelled` term: the unlabelled batch of each training batch,
    in order, and the features of both as the model predicts them."""

    def __init__(self, u: Unlabelled, model: nn.Module, inputs: Inputs, sizes: list[int],
                 seed: int, epoch: int, device: torch.device) -> None:
        self.u, self.model, self.inputs, self.device = u, model, inputs, device
        x = u.x.for_epoch(epoch) if hasattr(u.x, "for_epoch") else u.x
        order = unlabelled_indices(len(x), sum(sizes), seed=seed, epoch=epoch)
        self.batches = load_batches(x, list(torch.split(order, sizes)))
        self.gen = epoch_generator(seed, epoch, stream=UNLABELLED_AUGMENT_STREAM,
                                   device=device.type)
        self.layer = getattr(model, u.layer)
        self.total, self.seen = 0.0, 0

    def __enter__(self) -> _Pairing:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.batches.close()  # streamed images: their reader stops

    def loss(self, xb: torch.Tensor, precision: str) -> torch.Tensor:
        """``weight * term`` of the training batch ``xb`` (as prepared, before any mixing) and
        its unlabelled batch.

        Both pass through the model in eval mode, in one call: the features are those the
        model computes when it predicts (BatchNorm's running statistics), which is what the
        alignment is for, and the pass changes no statistic and draws no dropout. The training
        pass's own features would not do: in train mode BatchNorm normalises by the batch, so
        they differ from predicted ones by more than the domains differ until the running
        statistics settle (measured: a CORAL distance of 1e-2 against 1e-6 on 32-px toy data).
        """
        _, images = next(self.batches)
        xt = self.inputs.train_batch(images, self.device, self.gen)
        caught: list[torch.Tensor] = []
        handle = self.layer.register_forward_pre_hook(lambda m, args: caught.append(args[0]))
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with _train_autocast(self.device, precision):
                self.model(torch.cat([xb, xt]))
        finally:
            handle.remove()
            for m, mode in modes:
                m.training = mode
        if len(caught) != 1:
            raise MedtlError(f"the model's '{self.u.layer}' ran {len(caught)} times in one "
                             "forward: no features to align")
        features = caught[0].float()
        value = self.u.term(features[:len(xb)], features[len(xb):])
        self.total += float(value.detach()) * len(xb)
        self.seen += len(xb)
        return self.u.weight * value

    def summary(self) -> dict[str, float]:
        return {f"train_{self.u.name}": self.total / max(self.seen, 1)}


def _check_unlabelled(model: nn.Module, u: Unlabelled, inputs: Inputs) -> None:
    if not isinstance(getattr(model, u.layer, None), nn.Module):
        raise MedtlError(f"an unlabelled loss term reads the input of the model's '{u.layer}', "
                         "which this model has not")
    if len(u.x) == 0:
        raise MedtlError("no unlabelled sample to train the alignment with")
    if not (math.isfinite(u.weight) and u.weight >= 0):
        raise MedtlError(f"the weight of the unlabelled loss term must be 0 or more, not "
                         f"{u.weight}")
    if isinstance(u.x, torch.Tensor):
        inputs.check(u.x, torch.zeros(len(u.x), dtype=torch.int64), "unlabelled")
    if distributed.current() is not None:
        raise MedtlError("an unlabelled loss term (domain alignment) under DDP is not "
                         "supported: train on one process")


def _shown(record: dict | None) -> str:
    if record is None:
        return "none"
    return (f"{record.get('name')} weight {record.get('weight')} data "
            f"{str(record.get('data'))[:12]}")


@torch.no_grad()
def predict_proba(model: nn.Module, x_uint8: torch.Tensor, config: TrainConfig, *,
                  multilabel: bool = False) -> np.ndarray:
    """Class probabilities (n, n_classes), float64, in eval mode and in batches; multi-label:
    each label's sigmoid (rows do not sum to 1)."""
    device = torch.device(config.device)
    # The layout training used: a reloaded model must run the same kernels to give the same bits.
    model.to(device=device, memory_format=torch.channels_last)
    with torch_threads(config.threads):
        return _evaluate(model, ImageInputs(config.mean, config.std), x_uint8, None,
                         config.batch_size, device, multilabel=multilabel)[0]


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` so that ``path`` is either the old file or the complete new one."""
    from medtl.files import atomic_write

    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(Path(path), buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; a damaged one is a MedtlError."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MedtlError(
            f"{path}: checkpoint is damaged or incomplete and cannot be resumed "
            f"({type(exc).__name__}); delete it to start again"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MedtlError(f"{path}: not a medtl training checkpoint (format "
                         f"{ckpt.get('format') if isinstance(ckpt, dict) else None!r})")
    return ckpt


def _schedule(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    if config.schedule == "constant":
        return lambda step: 1.0
    warmup_steps = config.warmup_epochs * steps_per_epoch
    total_steps = config.epochs * steps_per_epoch

    def factor(step: int) -> float:
        # step counts optimizer steps taken; +1 so the very first step does not use lr 0.
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _check_config(config: TrainConfig, param_groups: list[dict]) -> None:
    if config.class_weight is not None:
        check_choice("class weight", config.class_weight, ["balanced"])
    if config.sampler is not None:
        check_choice("sampler", config.sampler, ["balanced"])
    check_choice("schedule", config.schedule, ["warmup-cosine", "constant"])
    if not 0.0 <= config.label_smoothing < 1.0:
        raise MedtlError(f"--label-smoothing {config.label_smoothing}: choose 0 to below 1")
    if config.ema is not None and not 0.0 < config.ema < 1.0:
        raise MedtlError(f"--ema {config.ema}: a decay above 0 and below 1 (e.g. 0.999)")
    check_choice("--mix", config.mix, MIX_CHOICES)
    check_choice("--precision", config.precision, PRECISIONS)
    names = [g.get("name") for g in param_groups]
    if None in names or len(set(names)) != len(names):
        raise MedtlError(f"each parameter group needs a unique 'name'; got {names}")


def _check_labels(x: torch.Tensor, y: torch.Tensor, split: str) -> None:
    if y.ndim == 2 and y.dtype.is_floating_point:
        _check_targets(x, y, split)
        return
    if y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise MedtlError(f"{split} labels must be int64 ({x.shape[0]},); got {y.dtype} "
                         f"{tuple(y.shape)}")
    if len(y) == 0:
        raise MedtlError(f"{split} split is empty")


def _check_targets(x: torch.Tensor, y: torch.Tensor, split: str) -> None:
    """Multi-label targets: float (n, K), each 1, 0 or NaN (unknown), some known."""
    if y.shape[0] != x.shape[0] or y.shape[1] < 1:
        raise MedtlError(f"{split} multi-label targets must be float ({x.shape[0]}, K); got "
                         f"{tuple(y.shape)}")
    if len(y) == 0:
        raise MedtlError(f"{split} split is empty")
    known = ~torch.isnan(y)
    if not bool(((y == 0) | (y == 1) | ~known).all()):
        raise MedtlError(f"{split} multi-label targets must be 1, 0 or NaN (unknown)")
    if not bool(known.any()):
        raise MedtlError(f"{split} split has no known target: every label is unknown")


def check_multilabel_config(config: TrainConfig) -> None:
    """The settings that have no meaning for multi-label targets, refused in one line."""
    if config.sampler == "balanced":
        raise MedtlError("--sampler balanced: multi-label images hold several labels at once, "
                         "so no draw balances them; use --class-weight balanced (per-label "
                         "positive weights)")
    if config.mix != "none":
        raise MedtlError(f"--mix {config.mix}: mixup/CutMix mix one class per image; not "
                         "supported with multi-label targets (use --mix none, or an --augment "
                         "preset without mixing)")
    if config.label_smoothing > 0:
        raise MedtlError(f"--label-smoothing {config.label_smoothing}: smooths a softmax over "
                         "classes; not supported with multi-label targets")


def data_digest(*tensors: torch.Tensor) -> str:
    """sha256 over the shapes, dtypes and bytes of ``tensors`` (the decoded training data)."""
    import hashlib

    digest = hashlib.sha256()
    for t in tensors:
        if hasattr(t, "digest_bytes"):  # streamed images (by their records), cached copies
            digest.update(type(t).__name__.encode() + b"|" + t.digest_bytes())
            continue
        a = t.detach().cpu().contiguous().numpy()
        if a.dtype.kind == "f" and np.isnan(a).any():
            # Multi-label targets: every NaN hashed as the one canonical NaN, whatever its
            # payload bits, so that the same unknown entries give the same digest.
            a = np.where(np.isnan(a), np.array(np.nan, dtype=a.dtype), a)
        digest.update(f"{a.shape}|{a.dtype.str}|".encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def _initial_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each parameter group's learning rate before the schedule (what was asked)."""
    return {str(g.get("name")): float(g.get("initial_lr", g["lr"]))
            for g in optimizer.param_groups}


def _check_resumable(ckpt: dict, state: LoopState, data: str | None, path: Path) -> None:
    """Refuse, in one line naming each difference, to continue a checkpoint made with other
    settings, learning rates or data: the saved optimizer and best state would silently win."""
    # A setting newer than the checkpoint was at its default there.
    defaults = asdict(TrainConfig())
    saved = {**{k: defaults[k] for k in ("label_smoothing", "ema", "mix", "precision")},
             **ckpt.get("config", {})}
    now = asdict(state.config)
    diffs = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now
             if k not in RESUME_EXEMPT and _plain(saved.get(k)) != _plain(now[k])]
    if "lrs" in ckpt and ckpt["lrs"] != _initial_lrs(state.optimizer):
        diffs.append(f"learning rates: {ckpt['lrs']} -> {_initial_lrs(state.optimizer)}")
    if data is not None and ckpt.get("data") not in (None, data):
        diffs.append(f"training data: sha256 {str(ckpt['data'])[:12]} -> {data[:12]}")
    if diffs:
        raise MedtlError(f"{path}: cannot resume with different settings ({'; '.join(diffs)})")


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


PRECISIONS = ("fp32", "bf16")


def _train_autocast(device: torch.device, precision: str):
    """The training forward's autocast: bf16 on GPU; on CPU what ``precision`` says."""
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return _autocast(device)


@contextmanager
def _depthwise_fp32(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside the block, each depthwise convolution of ``model`` computes in fp32 under
    autocast (their bf16 kernels, backward included, are slower than fp32's on this CPU while
    the 1x1 convolutions gain 2-3x); the module's own forward is used, so timm's Conv2dSame
    keeps its padding. Nothing of it outlives the block."""
    if not enabled:
        yield
        return

    def fp32_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return type(conv).forward(conv, x.float())

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)
             and m.groups > 1 and m.groups == m.in_channels]
    for m in convs:
        m.forward = fp32_forward.__get__(m)
    try:
        yield
    finally:
        for m in convs:
            del m.forward


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _to_float(x_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Convert on the device: uint8 is a quarter of the bytes to move.
    return x_uint8.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def _evaluate(model: nn.Module, inputs: Inputs, x: torch.Tensor, y: torch.Tensor | None,
              batch_size: int, device: torch.device, *, multilabel: bool = False,
              ) -> tuple[np.ndarray, float | None]:
    """Probabilities (softmax; multi-label: sigmoids) and the mean validation loss: plain
    cross-entropy per image, or multi-label the unweighted binary cross-entropy per known
    entry."""
    model.eval()
    probas, loss_sum, counted = [], 0.0, 0
    for idx, images in load_batches(x, index_batches(len(x), batch_size)):
        xb = inputs.eval_batch(images, device)
        with _autocast(device):
            logits = model(xb)
        logits = logits.float()
        if y is not None:
            yb = y[idx].to(device)
            if multilabel:
                total, count = masked_bce_parts(logits, yb)
            else:
                total = nn.functional.cross_entropy(logits, yb, reduction="sum")
                count = len(idx)
            loss_sum += float(total)
            counted += int(count)
        p = torch.sigmoid(logits.double()) if multilabel else torch.softmax(logits.double(),
                                                                               dim=1)
        probas.append(p.cpu().numpy())
    proba = np.concatenate(probas)
    return proba, (loss_sum / max(counted, 1) if y is not None else None)


def _global_mean(criterion: nn.Module, group) -> Callable:
    """Under DDP, the loss whose gradients DDP's average makes the global batch's: each process
    sums its samples' losses and divides by the global count (the global sum of the class
    weights of the batch's targets, as CrossEntropyLoss's mean does; multi-label: the global
    number of known entries), times N."""
    if group is None:
        return criterion
    if isinstance(criterion, MaskedBCEWithLogits):
        def masked(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            # Each process's known entries over the global batch's known count, times N:
            # DDP's average then gives the global batch's mean over its known entries.
            total, count = masked_bce_parts(logits, target, criterion.pos_weight)
            every = distributed.all_sum(count.to(logits.dtype), group)
            return total * group.world_size / every.clamp(min=1)
        return masked
    summed = nn.CrossEntropyLoss(weight=criterion.weight, reduction="sum",
                                 label_smoothing=criterion.label_smoothing)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = criterion.weight
        count = (w[target].sum() if w is not None
                 else torch.tensor(float(len(target)), device=logits.device))
        return summed(logits, target) * group.world_size / distributed.all_sum(count, group)
    return loss


def _rank_rng(ckpt: dict, path: Path) -> dict:
    """The generator state this process saved: its own under DDP when the checkpoint was
    made by as many processes, rank 0's otherwise (then dropout draws differ from an
    uninterrupted run: said once)."""
    group = distributed.current()
    ranks = ckpt.get("rng_ranks")
    if group is None:
        return ckpt["rng"]
    if ranks is not None and len(ranks) == group.world_size:
        return ranks[group.rank]
    log.warning("%s: made by %s process(es), resumed by %d: dropout and augmentation draws "
                "differ from an uninterrupted run", path, len(ranks) if ranks else 1,
                group.world_size)
    return ckpt["rng"]


def _get_rng_state() -> dict:
    # Plain tensors only, so the checkpoint loads with weights_only=True. Only torch's
    # generators: the loop draws from nothing else (numpy and Python's are the caller's).
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
