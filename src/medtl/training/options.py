"""The training options, written once: the estimator's parameters, workflow's, bench's and the
CLI's are all this one dataclass (a new option is a field here and a flag in cli.py).

``TransferClassifier`` takes these fields as its scikit-learn parameters; ``medtl.train`` and
``medtl bench`` take a ``TrainOptions`` (or its fields as keywords); the CLI builds one from its
flags by field name.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, fields
from typing import Any

from medtl.errors import MedtlError, check_choice

DEVICES = ("auto", "cpu", "cuda")
CLASS_WEIGHTS = ("auto", "balanced", "none")
SAMPLERS = ("none", "balanced")
ENGINES = ("auto", "onnx", "torch")  # how frozen features are computed (training.features)
ALIGN_CHOICES = ("none", "coral")  # --align: feature alignment methods (training.align)


# What every strategy reads; the others belong to some strategies (Strategy.own_options).
GENERAL_OPTIONS = ("backbone", "strategy", "weights", "image_size", "in_chans", "batch_size",
                   "class_weight", "calibrate", "seed", "device", "engine", "cache", "skip_bad",
                   "threads", "quiet", "tta")


@dataclass
class TrainOptions:
    """What a transfer run is asked to do (not what it learned)."""

    backbone: str = "mobilenet_v2"
    strategy: str = "auto"
    head: str = "logreg"
    weights: str = "imagenet"
    image_size: int | None = None
    in_chans: int = 3
    epochs: int | None = None
    batch_size: int = 64
    unfreeze: int | None = None
    gradual: bool = False
    # auto: minutes the climb may take (None: no limit); stages that cannot finish are skipped.
    time_budget: float | None = None
    keep: int | None = None
    lr: float = 1e-3
    lr_decay: float = 0.5
    augment: str = "basic"
    hflip: bool = True
    # Test-time augmentation of the run's val/test figures and of its later predictions
    # (none | flip | standard, medtl.data.tta); flips only where the augmentation flipped.
    tta: str = "none"
    patience: int = 5
    # Recipes (issue 17), off by default: neither raised validation AUC on BreastMNIST over 3
    # seeds (docs/benchmarks.md, "Recipes"). Label smoothing of the training loss,
    # and an exponential moving average of the weights (decay per optimizer step), which is
    # what validation scores and the run saves. Trainable strategies only.
    label_smoothing: float = 0.0
    ema: float | None = None
    # Mixup/CutMix of training batches (none | mixup | cutmix | both); opt-in, no preset turns
    # it on: on BreastMNIST it cost --augment strong 0.08 validation AUC over 3 seeds
    # (docs/benchmarks.md). Trainable strategies only: frozen ones refuse a value other than
    # none. None is how runs of medtl before that measurement recorded "the preset's".
    mix: str | None = "none"
    # DDP (several processes): BatchNorm statistics over the whole global batch instead of
    # each process's share. PyTorch's SyncBatchNorm runs on GPUs only. Trainable strategies.
    sync_bn: bool = False
    # fine-tune: the frozen lower blocks' outputs computed once and kept, for this many versions
    # of each image (the plain one and augmented copies); 0 = off (transfer.lower_cache).
    frozen_cache: int = 0
    # Trainable strategies on CPU: fp32, or bf16 autocast for the training passes (opt-in:
    # 1.1-1.3x faster here, docs/benchmarks.md "CPU training speed").
    precision: str = "fp32"
    # Trainable strategies: the most memory their decoded images may take ("50%" of RAM, "8GB",
    # "0"); over it the training split streams from disk (training.streaming).
    memory_budget: str = "50%"  # DEFAULT_BUDGET
    # Feature alignment at training time (none | coral: Deep CORAL, training.align) toward the
    # unlabelled images of ``align_target`` (files or folders, read as `medtl adapt` reads
    # TARGET), added to the loss with ``align_weight``. Trainable strategies only: frozen
    # features cannot move toward the target.
    align: str = "none"
    align_target: list[str] | None = None
    align_weight: float = 1.0
    class_weight: str = "auto"
    sampler: str = "none"
    calibrate: bool = False
    seed: int = 0
    device: str = "auto"
    engine: str = "auto"
    cache: bool = True
    skip_bad: bool = False
    # CPU threads for this call's PyTorch and ONNX Runtime work (None: every core); set per
    # call and restored after, never for the whole process.
    threads: int | None = None
    quiet: bool = False

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> TrainOptions:
        """Options from a dict that may hold other keys (a CLI's locals, a saved model.json);
        keys this version does not know are ignored, so older bundles load."""
        known = set(cls.names())
        return cls(**{k: v for k, v in values.items() if k in known})

    def replace(self, **changes: Any) -> TrainOptions:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """The option mistakes that need no data: raised before any slow work."""
        check_choice("class weight", self.class_weight, CLASS_WEIGHTS)
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("device", self.device, DEVICES)
        check_choice("engine", self.engine, ENGINES)
        from medtl.data.tta import check_tta

        check_tta(self.tta, augment=self.augment, hflip=self.hflip)
        if self.in_chans not in (1, 3):
            raise MedtlError(f"--in-chans must be 1 or 3, not {self.in_chans}")
        from medtl.data.transforms import MAX_SIZE, MIN_SIZE

        if self.image_size is not None and not MIN_SIZE <= self.image_size <= MAX_SIZE:
            raise MedtlError(f"--image-size {self.image_size}: choose {MIN_SIZE} to {MAX_SIZE}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise MedtlError(f"--time-budget {self.time_budget}: a number of minutes above 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise MedtlError(f"--label-smoothing {self.label_smoothing}: choose 0 to below 1")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise MedtlError(f"--ema {self.ema}: a decay above 0 and below 1 (e.g. 0.999)")
        if self.mix is not None:
            from medtl.training.mixing import MIX_CHOICES

            check_choice("--mix", self.mix, MIX_CHOICES)
        parse_budget(self.memory_budget)
        check_choice("--precision", self.precision, ("fp32", "bf16"))
        self._check_align()
        if self.threads is not None and self.threads < 1:
            raise MedtlError(f"--threads {self.threads}: at least 1")
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MedtlError(f"--{name.replace('_', '-')} {value}: at least 1")

    def _check_align(self) -> None:
        check_choice("--align", self.align, ALIGN_CHOICES)
        w = self.align_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w < float("inf"):
            raise MedtlError(f"--align-weight {w}: a number of 0 or more (default 1)")
        target = self.align_target
        if target is not None and (isinstance(target, (str, bytes)) or not all(
                isinstance(t, str) and t for t in target)):
            raise MedtlError(f"--align-target {target!r}: a list of image files or folders")
        if self.align != "none" and not target:
            raise MedtlError(f"--align {self.align} needs --align-target: the unlabelled "
                             "images of the domain to align to (files or folders)")
        if self.align == "none" and target:
            raise MedtlError("--align-target without --align: choose the method, e.g. --align "
                             "coral")

    @property
    def resolved_mix(self) -> str:
        """``--mix`` as a trainable strategy applies it. None, recorded by runs made while the
        strong preset implied ``both``, is read as the preset's value then, so that such an
        interrupted run is not resumed without its mixing (the loop refuses the change)."""
        if self.mix is not None:
            return self.mix
        return "both" if self.augment == "strong" else "none"

    @property
    def n_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


DEFAULT_BUDGET = "50%"


def parse_budget(text: str | None) -> int:
    """``--memory-budget``: bytes from ``50%`` (of the machine's RAM), ``8GB``, ``512MB``, ``0``
    (always stream)."""
    text = DEFAULT_BUDGET if text is None else str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(%|[kKmMgGtT]i?[bB]?|[bB])?", text)
    if not m:
        raise MedtlError(f"--memory-budget {text!r}: a share of RAM such as 50%, or a size such "
                         "as 8GB or 512MB (0: always stream)")
    value, unit = float(m.group(1)), (m.group(2) or "b").lower()
    if unit == "%":
        if value > 100:
            raise MedtlError(f"--memory-budget {text}: at most 100%")
        return int(total_memory() * value / 100)
    scale = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit[0]]
    return int(value * scale)


def total_memory() -> int:
    """The machine's RAM in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when PyTorch sees a GPU, else ``cpu``."""
    import torch

    check_choice("device", device, DEVICES)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MedtlError("--device cuda: no CUDA GPU is available to PyTorch here")
    return device
