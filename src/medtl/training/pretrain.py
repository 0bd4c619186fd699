"""In-domain self-supervised pretraining (``medtl pretrain``): a backbone's ImageNet (or random)
weights trained further on the task's own images, labels unused, with SimCLR, BYOL or DINO; the
result is a safetensors file of the backbone that ``--weights FILE`` starts a run from.

The losses, heads, momentum updates and augmentations are lightly's (``pip install
'medtl[pretrain]'``); the backbone is medtl's (any registry entry), its pooled features feed
the heads. Only the train (and val) split's images are read, never test: the test split must
stay unseen to score the model trained from these weights.

What is saved: SimCLR's encoder, BYOL's online encoder (the BYOL paper keeps it), DINO's teacher
(the DINO paper reports the teacher's features as the better ones).

Provenance: the file's safetensors metadata records the method, the starting weights
(``WeightsInfo.to_dict``: ImageNet with its sha256, or random), a fingerprint of the images
used, the settings and the wall time; ``medtl.models.weights.resolve_weights`` reads it back,
so a run trained with ``--weights FILE`` records where its weights came from.

Checkpoints: after every epoch, ``FILE.partial/checkpoint.pt`` (atomic). ``resume=True``
continues it; the result is bitwise that of an uninterrupted run on CPU, because every random
draw (shuffling, augmentation, stochastic depth) comes from generators derived from (seed,
epoch, step) only, never from what ran before, so no generator state has to travel.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from medtl.console import progress_bar, run_logging
from medtl.errors import MedtlError, check_choice
from medtl.models.weights import PRETRAIN_FORMAT, PRETRAIN_MARKER, SSL_METHODS
from medtl.training.loop import epoch_generator, save_checkpoint, seeded, torch_threads

log = logging.getLogger("medtl")

STARTS = ("imagenet", "random")
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "medtl-pretrain-1"
# A resumed pretraining must continue the same one: every setting must match but these.
RESUME_EXEMPT = ("device", "quiet", "threads")
# Each method's default learning rate (AdamW) by starting point: continued pretraining takes
# small steps so as not to wash out ImageNet's features in the first epochs.
DEFAULT_LR = {"imagenet": 1e-4, "random": 1e-3}
DINO_LOCAL_VIEWS = 6  # lightly's and the DINO paper's default


@dataclass(frozen=True)
class PretrainConfig:
    """What a pretraining computes; a checkpoint resumes only with the same values."""

    method: str
    start: str
    backbone: str
    epochs: int
    image_size: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    splits: tuple[str, ...]


@dataclass
class PretrainResult:
    """The weights file, its metadata (what the file records) and each epoch's mean loss."""

    path: Path
    metadata: dict[str, str]
    history: list[dict[str, float]]


def _lightly() -> SimpleNamespace:
    """lightly's pieces, imported on first use (an optional dependency)."""
    try:
        from lightly import loss, transforms
        from lightly.models import modules, utils
        from lightly.utils import scheduler
    except ImportError as exc:
        raise MedtlError(f"medtl pretrain needs the lightly package ({exc}): "
                         "pip install 'medtl[pretrain]'") from None
    return SimpleNamespace(
        NTXentLoss=loss.NTXentLoss, NegativeCosineSimilarity=loss.NegativeCosineSimilarity,
        DINOLoss=loss.DINOLoss, SimCLRProjectionHead=modules.SimCLRProjectionHead,
        BYOLProjectionHead=modules.BYOLProjectionHead,
        BYOLPredictionHead=modules.BYOLPredictionHead,
        DINOProjectionHead=modules.DINOProjectionHead,
        update_momentum=utils.update_momentum,
        deactivate_requires_grad=utils.deactivate_requires_grad,
        cosine_schedule=scheduler.cosine_schedule, SimCLRTransform=transforms.SimCLRTransform,
        BYOLTransform=transforms.BYOLTransform, BYOLView1Transform=transforms.BYOLView1Transform,
        BYOLView2Transform=transforms.BYOLView2Transform, DINOTransform=transforms.DINOTransform)


# ------------------------------------------------------------------------------ methods
class _Method(nn.Module):
    """One self-supervised method: its modules, its loss on a batch of views, and which
    backbone it hands back."""

    n_views = 2

    def loss(self, views: list[torch.Tensor], step: int, total: int, epoch: int
             ) -> torch.Tensor:
        raise NotImplementedError

    def before_optimizer_step(self, epoch: int) -> None:
        """Between backward and the optimizer step (DINO freezes its last layer a while)."""

    def result(self) -> nn.Module:
        raise NotImplementedError


class _SimCLR(_Method):
    saved = "encoder"

    def __init__(self, backbone: nn.Module, L: SimpleNamespace) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = L.SimCLRProjectionHead(backbone.num_features, 512, 128)
        self.criterion = L.NTXentLoss(temperature=0.5)

    def loss(self, views, step, total, epoch):
        z0, z1 = (self.head(self.backbone.forward_features(v)) for v in views)
        return self.criterion(z0, z1)

    def result(self) -> nn.Module:
        return self.backbone


class _BYOL(_Method):
    saved = "online encoder"

    def __init__(self, backbone: nn.Module, L: SimpleNamespace) -> None:
        super().__init__()
        self.L = L
        self.backbone = backbone
        self.projection = L.BYOLProjectionHead(backbone.num_features, 1024, 256)
        self.prediction = L.BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_momentum = copy.deepcopy(self.projection)
        L.deactivate_requires_grad(self.backbone_momentum)
        L.deactivate_requires_grad(self.projection_momentum)
        self.criterion = L.NegativeCosineSimilarity()

    def loss(self, views, step, total, epoch):
        # The target network's momentum rises from 0.99 to 1 over training (BYOL's schedule).
        m = self.L.cosine_schedule(step, total, 0.99, 1.0)
        self.L.update_momentum(self.backbone, self.backbone_momentum, m)
        self.L.update_momentum(self.projection, self.projection_momentum, m)
        p0, p1 = (self.prediction(self.projection(self.backbone.forward_features(v)))
                  for v in views)
        with torch.no_grad():
            z0, z1 = (self.projection_momentum(self.backbone_momentum.forward_features(v))
                      for v in views)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def result(self) -> nn.Module:
        return self.backbone


class _DINO(_Method):
    saved = "teacher"
    n_views = 2 + DINO_LOCAL_VIEWS

    def __init__(self, backbone: nn.Module, L: SimpleNamespace) -> None:
        super().__init__()
        self.L = L
        self.student_backbone = backbone
        with warnings.catch_warnings():  # lightly's head uses torch's older weight_norm
            warnings.simplefilter("ignore", FutureWarning)
            self.student_head = L.DINOProjectionHead(backbone.num_features, 512, 64, 2048,
                                                     freeze_last_layer=1)
            # weight_norm's tensors cannot be deep-copied: a second head takes the first's.
            self.teacher_head = L.DINOProjectionHead(backbone.num_features, 512, 64, 2048)
        # The teacher starts as the student (the DINO paper), then follows it by momentum.
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        self.teacher_backbone = copy.deepcopy(backbone)
        L.deactivate_requires_grad(self.teacher_backbone)
        L.deactivate_requires_grad(self.teacher_head)
        self.criterion = L.DINOLoss(output_dim=2048)

    def loss(self, views, step, total, epoch):
        m = self.L.cosine_schedule(step, total, 0.996, 1.0)
        self.L.update_momentum(self.student_backbone, self.teacher_backbone, m)
        self.L.update_momentum(self.student_head, self.teacher_head, m)
        with torch.no_grad():  # the teacher sees the two global views only
            teacher = [self.teacher_head(self.teacher_backbone.forward_features(v))
                       for v in views[:2]]
        student = [self.student_head(self.student_backbone.forward_features(v)) for v in views]
        return self.criterion(teacher, student, epoch=epoch)

    def before_optimizer_step(self, epoch: int) -> None:
        self.student_head.cancel_last_layer_gradients(current_epoch=epoch)

    def result(self) -> nn.Module:
        return self.teacher_backbone


METHODS: dict[str, type[_Method]] = {"simclr": _SimCLR, "byol": _BYOL, "dino": _DINO}


def _transform(method: str, size: int, mean: Sequence[float], std: Sequence[float],
               L: SimpleNamespace) -> Callable:
    """lightly's augmentations for ``method`` at ``size`` pixels, adapted to medical images.

    Colour: brightness and contrast jitter (+-40 %) only. Medical images are mostly grey
    (X-ray, CT, ultrasound, MRI): saturation and hue jitter do nothing to them but cost time,
    random grey conversion likewise, and solarisation inverts the bright structures (bone,
    consolidation) whose intensity is the finding; on colour images (dermoscopy, histology)
    colour is diagnostic too. Blur: lightly's sigma range is for 224 px images; it is scaled
    with the image size, so a 64 px image is not blurred to nothing.
    """
    common = {
        "cj_prob": 0.8, "cj_strength": 1.0, "cj_bright": 0.4, "cj_contrast": 0.4,
        "cj_sat": 0.0, "cj_hue": 0.0, "random_gray_scale": 0.0,
        "sigmas": (0.1, max(0.1, 2.0 * size / 224)),
        "normalize": {"mean": list(mean), "std": list(std)},
    }
    if method == "simclr":
        return L.SimCLRTransform(input_size=size, **common)
    if method == "byol":
        return L.BYOLTransform(
            view_1_transform=L.BYOLView1Transform(input_size=size, solarization_prob=0.0,
                                                  **common),
            view_2_transform=L.BYOLView2Transform(input_size=size, solarization_prob=0.0,
                                                  **common))
    # Local crops are 96/224 of the global ones, as in DINO, but at least 32 px (or the global
    # size): the backbones downsample 32 times, and a smaller crop leaves no feature map.
    local = max(round(size * 96 / 224), min(size, 32))
    return L.DINOTransform(global_crop_size=size, local_crop_size=local,
                           n_local_views=DINO_LOCAL_VIEWS, solarization_prob=0.0, **common)


# ------------------------------------------------------------------------------ the job
def pretrain(
    data: str | Path,
    out: str | Path,
    *,
    method: str = "simclr",
    start: str = "imagenet",
    epochs: int = 10,
    backbone: str = "mobilenet_v2",
    image_size: int | None = None,
    batch_size: int = 32,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    seed: int = 0,
    splits: str | Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    threads: int | None = None,
    quiet: bool = False,
    on_epoch_end: Callable[[int], Any] | None = None,
) -> PretrainResult:
    """Self-supervised pretraining of ``backbone`` on DATA's images (labels unused); writes the
    backbone's weights to ``out`` (safetensors) for ``medtl train --weights OUT``.

    ``start``: the weights it starts from, ``imagenet`` or ``random``. ``splits``: which of
    DATA's splits give images (default: train and val, where present); test never does.
    ``image_size`` defaults to the backbone's input size; ``lr`` (AdamW, linear warm-up then
    cosine decay per step) to 1e-4 from ImageNet, 1e-3 from random. ``resume`` continues the
    checkpoint ``OUT.partial/`` an interrupted call left; ``overwrite`` replaces an existing
    ``out``. ``on_epoch_end(epoch)`` runs once the epoch's checkpoint is on disk.
    """
    from medtl.data.transforms import MAX_SIZE, MIN_SIZE
    from medtl.models.registry import get_spec
    from medtl.training.options import resolve_device

    check_choice("method", method, SSL_METHODS)
    check_choice("--from", start, STARTS)
    spec = get_spec(backbone)
    size = int(image_size or spec.input_size)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise MedtlError(f"--image-size {size}: choose {MIN_SIZE} to {MAX_SIZE}")
    if epochs < 1:
        raise MedtlError(f"--epochs {epochs}: at least 1")
    if batch_size < 2:
        raise MedtlError(f"--batch-size {batch_size}: contrastive and self-distillation "
                         "losses need at least 2 images per batch")
    rate = DEFAULT_LR[start] if lr is None else float(lr)
    if not (math.isfinite(rate) and rate > 0):
        raise MedtlError(f"--lr {lr}: a positive learning rate")
    wanted = _check_splits(splits)
    out = Path(out).expanduser()
    partial = out.with_name(out.name + ".partial")
    ckpt_path = partial / CHECKPOINT_NAME
    if out.is_dir():
        raise MedtlError(f"{out}: is a folder; --out names the weights file to write")
    if out.exists() and not overwrite:
        raise MedtlError(f"{out}: exists; pass --overwrite to replace it")
    if ckpt_path.exists() and not resume:
        raise MedtlError(f"{partial}: an interrupted pretraining's checkpoint is there; pass "
                         "--resume to continue it, or remove the folder to start again")
    L = _lightly()
    run_device = resolve_device(device)

    images = _images(data, wanted, splits is not None)
    fingerprint = _fingerprint(images)
    cfg = PretrainConfig(method=method, start=start, backbone=spec.name, epochs=int(epochs),
                         image_size=size, batch_size=int(min(batch_size, len(images))),
                         lr=rate, weight_decay=float(weight_decay), seed=int(seed),
                         splits=tuple(sorted(set(images.split_names()))))
    from medtl.files import hold_lock

    t0 = time.perf_counter()
    with hold_lock(partial / "lock"):
        with run_logging(partial, quiet, append=resume and ckpt_path.exists()), \
                torch_threads(threads):
            result = _run(cfg, images, fingerprint, out, ckpt_path, L, run_device,
                          resume=resume, quiet=quiet, t0=t0, on_epoch_end=on_epoch_end)
        shutil.rmtree(partial, ignore_errors=True)
    return result


def _check_splits(splits: str | Sequence[str] | None) -> tuple[str, ...]:
    if splits is None:
        return ("train", "val")
    names = [s.strip() for s in (splits.split(",") if isinstance(splits, str) else splits)]
    names = [s for s in names if s]
    if not names:
        raise MedtlError("--splits: name at least one split (e.g. train,val)")
    if "test" in names:
        raise MedtlError("--splits: the test split is never used for pretraining: its images "
                         "must stay unseen to score the model trained from these weights")
    return tuple(dict.fromkeys(names))


def _images(data: str | Path, wanted: tuple[str, ...], explicit: bool):
    """DATA's images of the splits ``wanted``; a split asked for by name must exist."""
    from medtl.data import load_dataset

    # No validation is carved: pretraining reads train and val alike, labels unused.
    ds = load_dataset(data, val_fraction=0.0)
    present = ds.split_names()
    missing = [s for s in wanted if s not in present]
    if explicit and missing:
        raise MedtlError(f"{data}: no split {', '.join(missing)} (splits here: "
                         f"{', '.join(present) or 'none'})")
    chosen = [i for i, r in enumerate(ds.records) if r.split in wanted]
    if len(chosen) < 2:
        raise MedtlError(f"{data}: {len(chosen)} image(s) in split(s) {', '.join(wanted)}; "
                         "pretraining needs at least 2")
    return ds.subset(chosen)


def _fingerprint(images) -> str:
    """sha256 over the sorted content keys (file bytes, or an array image's bytes) of the
    images used: which images, not their labels, paths or order."""
    digest = hashlib.sha256()
    for key in sorted(images.content_key(i) for i in range(len(images))):
        digest.update(f"{key}\n".encode())
    return digest.hexdigest()


@contextmanager
def _step_rng(seed: int, epoch: int, step: int, device: str) -> Iterator[None]:
    """torch's, numpy's and Python's global generators seeded from (seed, epoch, step) for one
    step, the caller's states restored afterwards. lightly's and torchvision's augmentations
    draw from all three, stochastic depth from torch's."""
    s = np.random.SeedSequence([seed, epoch, step, 0x55]).generate_state(3, dtype=np.uint32)
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.device(device)] if device == "cuda" else []):
        torch.manual_seed(int(s[0]))
        np.random.seed(int(s[1]))
        random.seed(int(s[2]))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _lr_factor(step: int, total: int, steps_per_epoch: int) -> float:
    """Linear warm-up over the first epoch (at most a tenth of training), then cosine to 0."""
    warmup = max(1, min(steps_per_epoch, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _batch_views(images, idx: torch.Tensor, transform: Callable, n_views: int,
                 device: str) -> list[torch.Tensor]:
    from PIL import Image

    per_image = [transform(Image.fromarray(images.read(int(i)))) for i in idx]
    return [torch.stack([views[v] for views in per_image]).to(device) for v in range(n_views)]


def _run(cfg: PretrainConfig, images, fingerprint: str, out: Path, ckpt_path: Path,
         L: SimpleNamespace, device: str, *, resume: bool, quiet: bool, t0: float,
         on_epoch_end: Callable[[int], Any] | None) -> PretrainResult:
    from medtl.models.factory import create_backbone

    with seeded(cfg.seed):  # a random start, and the heads, the same every time
        bb = create_backbone(cfg.backbone, weights=cfg.start)
        bb.reset_classifier(0)  # the ImageNet classifier is no part of the features
        model = METHODS[cfg.method](bb, L)
    start_info = bb.weights_info
    log.info("pretraining %s with %s on %d images (%s), from %s weights (%s, sha256 %s), "
             "%d px, batch %d, lr %g, %d epochs, device %s", cfg.backbone, cfg.method,
             len(images), "+".join(cfg.splits), start_info.kind, start_info.source,
             start_info.sha256, cfg.image_size, cfg.batch_size, cfg.lr, cfg.epochs, device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    settings = {**asdict(cfg), "splits": list(cfg.splits)}
    transform = _transform(cfg.method, cfg.image_size, bb.spec.mean, bb.spec.std, L)
    # Whole batches only: BatchNorm in the heads and the contrastive loss need more than one
    # image, and a batch of another size would weigh its images differently.
    steps = len(images) // cfg.batch_size
    total = steps * cfg.epochs
    history: list[dict[str, float]] = []
    first = 1
    if resume and ckpt_path.exists():
        ckpt = _load_checkpoint(ckpt_path)
        _check_resumable(ckpt, settings, fingerprint, start_info.to_dict(), ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history = list(ckpt["history"])
        first = int(ckpt["epoch"]) + 1
        log.info("resuming %s after epoch %d", ckpt_path, first - 1)
    elif resume:
        log.info("no checkpoint at %s: starting from the beginning", ckpt_path)
    resumed_s = sum(row["seconds"] for row in history)
    with progress_bar(f"pretrain {cfg.method}", total, quiet=quiet) as advance:
        advance((first - 1) * steps)
        for epoch in range(first, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            model.train()
            order = torch.randperm(len(images), generator=epoch_generator(cfg.seed, epoch))
            loss_sum = 0.0
            for k in range(steps):
                step = (epoch - 1) * steps + k
                idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
                with _step_rng(cfg.seed, epoch, k, device):
                    views = _batch_views(images, idx, transform, model.n_views, device)
                    loss = model.loss(views, step, total, epoch - 1)
                    if not torch.isfinite(loss):
                        raise MedtlError(f"pretraining diverged at epoch {epoch}, step {k + 1} "
                                         f"(loss {float(loss)}); try a lower --lr")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    model.before_optimizer_step(epoch - 1)
                    for group in optimizer.param_groups:
                        group["lr"] = cfg.lr * _lr_factor(step, total, steps)
                    optimizer.step()
                loss_sum += float(loss.detach())
                advance(1)
            row = {"epoch": epoch, "loss": loss_sum / steps,
                   "seconds": time.perf_counter() - t_epoch}
            history.append(row)
            log.info("epoch %d/%d: loss %.4f, %.1f s", epoch, cfg.epochs, row["loss"],
                     row["seconds"])
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "epoch": epoch, "settings": settings,
                "data": fingerprint, "start": start_info.to_dict(),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "history": history})
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    metadata = _metadata(cfg, model, start_info, fingerprint, len(images), history,
                         wall_s=resumed_s + time.perf_counter() - t0)
    _write(out, model.result(), metadata)
    log.info("pretrained weights (%s's %s) written to %s", cfg.method, model.saved, out)
    return PretrainResult(out, metadata, history)


def _metadata(cfg: PretrainConfig, model: _Method, start_info, fingerprint: str, n: int,
              history: list[dict[str, float]], *, wall_s: float) -> dict[str, str]:
    """The file's safetensors metadata (strings only): what models.weights reads back
    (marker, method, data_fingerprint, start), then what a person wants to know."""
    from medtl import __version__

    return {
        PRETRAIN_MARKER: PRETRAIN_FORMAT, "method": cfg.method,
        "data_fingerprint": fingerprint, "start": json.dumps(start_info.to_dict()),
        "backbone": cfg.backbone, "saved": model.saved, "images": str(n),
        "splits": ",".join(cfg.splits), "epochs": str(cfg.epochs),
        "image_size": str(cfg.image_size), "batch_size": str(cfg.batch_size),
        "lr": repr(cfg.lr), "weight_decay": repr(cfg.weight_decay), "seed": str(cfg.seed),
        "loss": json.dumps([round(row["loss"], 6) for row in history]),
        "wall_s": f"{wall_s:.1f}", "medtl_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write(out: Path, backbone: nn.Module, metadata: dict[str, str]) -> None:
    """The backbone's tensors (a medtl Backbone's keys, which ``--weights`` reads), atomically."""
    from safetensors.torch import save_file

    from medtl.files import atomic_path

    tensors = {k: v.detach().to("cpu").contiguous().clone()
               for k, v in backbone.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MedtlError(f"{path}: checkpoint is damaged or incomplete and cannot be resumed "
                         f"({type(exc).__name__}); remove it to start again") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MedtlError(f"{path}: not a medtl pretraining checkpoint")
    return ckpt


def _check_resumable(ckpt: dict, settings: dict, fingerprint: str, start: dict,
                     path: Path) -> None:
    """Refuse, in one line naming each difference, to continue a checkpoint made with other
    settings, images or starting weights."""
    saved = ckpt.get("settings", {})
    diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items()
             if k not in RESUME_EXEMPT and saved.get(k) != v]
    if ckpt.get("data") != fingerprint:
        diffs.append(f"images: sha256 {str(ckpt.get('data'))[:12]} -> {fingerprint[:12]}")
    if (ckpt.get("start") or {}).get("sha256") != start.get("sha256"):
        diffs.append("starting weights: another file")
    if diffs:
        raise MedtlError(f"{path}: cannot resume with different settings ({'; '.join(diffs)})")
