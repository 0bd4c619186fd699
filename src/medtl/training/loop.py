"""The training loop shared by every trainable strategy (fine-tune, full, scratch, truncated).

AdamW over caller-built parameter groups (discriminative learning rates are the caller's), a
per-step linear warm-up then cosine schedule, early stopping on validation AUC, the best state
restored at the end, and an atomic checkpoint every epoch that ``resume=True`` continues from.

Reproducibility: shuffling, balanced sampling and augmentation draw from generators derived from
(seed, epoch) only, and the global RNG states (dropout, a caller's augmentation) travel in the
checkpoint, so on CPU a run killed and resumed is bitwise the same as one never interrupted.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtl.console import progress_bar
from medtl.errors import MedtlError, check_choice
from medtl.evaluation.metrics import classification_metrics

log = logging.getLogger("medtl")

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
# A resumed run must draw the same batches, so these settings must match the checkpoint's.
_RESUME_KEYS = ("batch_size", "seed", "epochs", "warmup_epochs", "class_weight", "sampler")

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class TrainConfig:
    """``warmup_epochs`` may be fractional: the schedule advances per optimizer step."""

    epochs: int = 20
    batch_size: int = 32
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    patience: int = 5
    seed: int = 0
    device: str = "cpu"
    class_weight: str | None = None
    sampler: str | None = None
    # One value each for a grey (in_chans=1) model: batches are then averaged to one channel.
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    quiet: bool = True


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
) -> FitResult:
    """Train ``model`` on uint8 NHWC tensors; it ends in its best state, in eval mode.

    ``param_groups``: ``{"name", "params", "lr"}`` each (other AdamW keys pass through).
    ``train_mode(model)`` replaces ``model.train()`` at each epoch start, so a caller can keep
    frozen BatchNorm layers in eval mode. ``on_epoch_end(epoch)`` runs after the epoch's
    checkpoint is on disk (epochs count from 1).
    """
    if config.class_weight is not None:
        check_choice("class weight", config.class_weight, ["balanced"])
    if config.sampler is not None:
        check_choice("sampler", config.sampler, ["balanced"])
    names = [g.get("name") for g in param_groups]
    if None in names or len(set(names)) != len(names):
        raise MedtlError(f"each parameter group needs a unique 'name'; got {names}")
    _check_data(x_train, y_train, "train")
    _check_data(x_val, y_val, "val")

    device = torch.device(config.device)
    _set_threads(device)
    model.to(device=device, memory_format=torch.channels_last)
    groups = [{**g, "params": list(g["params"])} for g in param_groups]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(y_train) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(config.warmup_epochs * steps_per_epoch,
                                  config.epochs * steps_per_epoch)
    )
    n_classes = int(max(int(y_train.max()), int(y_val.max()))) + 1
    class_weights = None
    if config.class_weight == "balanced":
        counts = torch.bincount(y_train, minlength=n_classes).clamp(min=1).float()
        class_weights = (len(y_train) / (n_classes * counts)).to(device)
    criterion = nn.CrossEntropyLoss(weight=class_weights)
    train_mode = train_mode or (lambda m: m.train())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    history: list[dict] = []
    best = {"score": -math.inf, "epoch": 0, "state": None, "bad_epochs": 0}
    start_epoch, stopped_early, resumed_s = 1, False, 0.0
    if resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        _check_resumable(ckpt, config, ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        best = ckpt["early_stopping"]
        best["state"] = ckpt["best_state"]
        history = ckpt["history"]
        stopped_early = ckpt["stopped_early"]
        start_epoch = ckpt["epoch"] + 1
        resumed_s = sum(row.get("seconds", 0.0) for row in history)  # older checkpoints: 0
        _set_rng_state(ckpt["rng"])
        log.info("resuming %s after epoch %d (%.1f s of training already done)", ckpt_path,
                 ckpt["epoch"], resumed_s)
    else:
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)

    mean = torch.tensor(config.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(config.std, device=device).view(1, -1, 1, 1)
    epoch = start_epoch
    while epoch <= config.epochs and not stopped_early:
        t_epoch = time.perf_counter()
        train_mode(model)
        order = epoch_indices(y_train, seed=config.seed, epoch=epoch,
                              balanced=config.sampler == "balanced")
        aug_gen = epoch_generator(config.seed, epoch, stream=1, device=device.type)
        total_loss, seen = 0.0, 0
        lrs = {}
        with progress_bar(f"epoch {epoch}/{config.epochs}", steps_per_epoch,
                          quiet=config.quiet) as advance:
            for start in range(0, len(order), config.batch_size):
                idx = order[start:start + config.batch_size]
                xb = _to_float(x_train[idx], device)
                if augment is not None:
                    xb = augment(xb, aug_gen)
                xb = _normalise(xb, mean, std)
                yb = y_train[idx].to(device)
                with _autocast(device):
                    logits = model(xb)
                loss = criterion(logits.float(), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lrs = {f"lr_{g['name']}": float(g["lr"]) for g in optimizer.param_groups}
                optimizer.step()
                scheduler.step()
                total_loss += float(loss.detach()) * len(idx)
                seen += len(idx)
                advance(1)

        proba, val_loss = _evaluate(model, x_val, y_val, config, device)
        metrics = classification_metrics(y_val.numpy(), proba)
        auc = metrics["auc"]
        score = auc if auc is not None else metrics["accuracy"]
        history.append({
            "epoch": epoch, "train_loss": total_loss / max(seen, 1), "val_loss": val_loss,
            "val_auc": auc, "val_accuracy": metrics["accuracy"], **lrs,
            "trainable_params": trainable, "seconds": time.perf_counter() - t_epoch,
        })
        log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val AUC %s, %.1f s", epoch,
                 config.epochs, history[-1]["train_loss"], val_loss,
                 "n/a" if auc is None else f"{auc:.4f}", history[-1]["seconds"])
        if score > best["score"]:
            best.update(score=score, epoch=epoch, state=copy.deepcopy(model.state_dict()),
                        bad_epochs=0)
        else:
            best["bad_epochs"] += 1
            stopped_early = best["bad_epochs"] >= config.patience and epoch < config.epochs
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "epoch": epoch, "config": asdict(config),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "early_stopping": {k: v for k, v in best.items() if k != "state"},
                "best_state": best["state"], "history": history,
                "stopped_early": stopped_early, "rng": _get_rng_state(),
            })
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        epoch += 1

    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return FitResult(history=history, best_epoch=best["epoch"],
                     best_val_auc=float(best["score"]), stopped_early=stopped_early,
                     resumed_s=resumed_s)


@torch.no_grad()
def predict_proba(model: nn.Module, x_uint8: torch.Tensor, config: TrainConfig) -> np.ndarray:
    """Class probabilities (n, n_classes), float64, in eval mode and in batches."""
    device = torch.device(config.device)
    # The layout training used: a reloaded model must run the same kernels to give the same bits.
    model.to(device=device, memory_format=torch.channels_last)
    return _evaluate(model, x_uint8, None, config, device)[0]


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` so that ``path`` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself must survive a power cut, not only the file's bytes.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def _warmup_cosine(warmup_steps: float, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        # step counts optimizer steps taken; +1 so the very first step does not use lr 0.
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _check_data(x: torch.Tensor, y: torch.Tensor, split: str) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise MedtlError(f"{split} images must be uint8 (N, H, W, 3); got {x.dtype} "
                         f"{tuple(x.shape)}")
    if y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise MedtlError(f"{split} labels must be int64 ({x.shape[0]},); got {y.dtype} "
                         f"{tuple(y.shape)}")
    if len(y) == 0:
        raise MedtlError(f"{split} split is empty")


def _check_resumable(ckpt: dict, config: TrainConfig, path: Path) -> None:
    saved = ckpt.get("config", {})
    changed = [k for k in _RESUME_KEYS if saved.get(k) != getattr(config, k)]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise MedtlError(f"{path}: cannot resume with different settings ({diffs})")


def _set_threads(device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _to_float(x_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Convert on the device: uint8 is a quarter of the bytes to move.
    return x_uint8.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)


def _normalise(xb: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RGB [0, 1] to the model's input; a one-channel ``mean`` means a grey model."""
    if mean.shape[1] == 1:
        xb = xb.mean(dim=1, keepdim=True)
    return ((xb - mean) / std).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, config: TrainConfig,
              device: torch.device) -> tuple[np.ndarray, float | None]:
    model.eval()
    mean = torch.tensor(config.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(config.std, device=device).view(1, -1, 1, 1)
    probas, loss_sum = [], 0.0
    for start in range(0, len(x), config.batch_size):
        xb = _normalise(_to_float(x[start:start + config.batch_size], device), mean, std)
        with _autocast(device):
            logits = model(xb)
        logits = logits.float()
        if y is not None:
            yb = y[start:start + config.batch_size].to(device)
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        probas.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    proba = np.concatenate(probas)
    return proba, (loss_sum / len(x) if y is not None else None)


def _get_rng_state() -> dict:
    # Plain tensors and ints only, so the checkpoint loads with weights_only=True.
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
