"""``medtl recommend``: the reviews' advice turned into a starting configuration and a short
grid, each with the reason it is there.

Sources: Kim et al. 2022 (BMC Medical Imaging, 121 studies: start from a deep backbone used as a
frozen feature extractor; fine-tune top-down and gradually at a low rate; update every layer only
when frozen features fail; the "feature extractor hybrid" is most used with AlexNet/VGG, whose
large fully connected layers are best replaced); Morid et al. 2021 (Computers in Biology and
Medicine, scoping review of ImageNet transfer in medical imaging: the best approach may depend on
how far a modality is from natural images; given here as a hypothesis, not a rule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Deep backbones first (the reviews' advice), lightweight ones as the fallback when the deep
# ones' ImageNet weights are not on this machine.
PREFERENCE = ("resnet50", "inception_v3", "densenet121", "resnet18", "efficientnet_lite0",
              "mobilenet_v2")
HEAVY_FC = ("alexnet", "vgg16", "vgg19")
# Imaging close to natural colour photographs: words, and DICOM modality codes (XC external
# camera, SM slide microscopy, ES endoscopy, OP ophthalmic photography, GM general microscopy).
NATURAL_WORDS = ("dermoscopy", "dermatology", "histology", "pathology", "fundus", "endoscopy",
                 "photo", "microscopy")
NATURAL_CODES = ("XC", "SM", "ES", "OP", "GM")
SMALL = 1000
TINY = 300


@dataclass
class DataStats:
    """What the rules look at, from :func:`dataset_stats` or written by hand in tests."""

    n_images: int
    per_class: dict[str, int]
    n_patients: int | None = None
    modality: str | None = None
    median_side: int | None = None
    volumes: bool = False


@dataclass
class Advice:
    options: dict[str, Any]
    reason: str


@dataclass
class Recommendation:
    start: Advice
    grid: list[Advice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: DataStats | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recommend(stats: DataStats, *,
              available: Callable[[str], bool] | None = None) -> Recommendation:
    """The starting configuration, a short grid and notes for data with ``stats``.

    ``available(name)`` says whether a backbone's ImageNet weights resolve here (default: ask
    the weights resolver); tests pass their own.
    """
    available = available or _imagenet_available
    backbone = next((b for b in PREFERENCE if available(b)), "mobilenet_v2")
    deep = backbone in PREFERENCE[:4]
    fallback = ("" if deep else
                f" (no deep backbone's ImageNet weights are on this machine, so the lightweight "
                f"{backbone}; put resnet50 weights in MEDTL_WEIGHTS_DIR to follow the advice)")
    common: dict[str, Any] = {"backbone": backbone}
    notes: list[str] = []

    notes += _input_settings(stats, common)

    if stats.n_images < TINY:
        start = Advice({**common, "strategy": "hybrid", "head": "logreg"},
                       f"{stats.n_images} images: too few to train even a head well; a "
                       "regularised logistic regression on a deep backbone's frozen features "
                       f"(Kim et al. 2022's feature-extractor hybrid) is the safest start"
                       f"{fallback}")
    else:
        start = Advice({**common, "strategy": "feature-extractor"},
                       "Kim et al. 2022: start with a deep backbone as a frozen feature "
                       "extractor; it is cheap, and with a few hundred to a few thousand images "
                       f"it is usually as good as fine-tuning{fallback}")

    grid = [
        Advice({**common, "strategy": "hybrid", "head": "svm"},
               "the feature-extractor hybrid: an SVM on the same frozen features"),
        Advice({**common, "strategy": "fine-tune", "gradual": True},
               "gradual top-down fine-tuning at a low learning rate, kept only while "
               "validation AUC improves (the reviews' protocol)"),
    ]
    if stats.n_images >= SMALL:
        grid.append(Advice({**common, "strategy": "full"},
                           f"{stats.n_images} images: enough to try updating every layer, "
                           "which the reviews advise only when frozen features fail"))
    else:
        notes.append(f"{stats.n_images} images: full fine-tuning left out of the grid (it "
                     "over-fits small data; the reviews advise it only when frozen features "
                     "fail)")
    grid.append(Advice({**common, "strategy": "scratch"},
                       "random initialisation: the no-transfer baseline that shows what "
                       "ImageNet weights bring"))
    heavy = [b for b in HEAVY_FC if available(b)]
    if heavy:
        grid.append(Advice({"backbone": heavy[0], "strategy": "hybrid", "head": "svm",
                            **{k: v for k, v in common.items() if k != "backbone"}},
                           f"{heavy[0]} has heavy fully connected layers: Kim et al. found it "
                           "used mostly as a frozen extractor feeding an SVM (hybrid)"))

    notes += _data_notes(stats)
    return Recommendation(start=start, grid=grid, notes=notes, stats=stats)


def _input_settings(stats: DataStats, common: dict[str, Any]) -> list[str]:
    """Image size and volume handling every advice shares (set in ``common``), and why."""
    notes = []
    if stats.median_side is not None and stats.median_side < 96:
        common["image_size"] = 128
        notes.append(f"images are small (median side {stats.median_side} px): upsampled to 128 "
                     "px; ImageNet filters expect objects of tens of pixels")
    if stats.volumes:
        common.update(slices="all", mode="2.5d")
        notes.append("volumes: every slice, three neighbouring slices as the three channels "
                     "(2.5D), scored per volume")
    return notes


def _data_notes(stats: DataStats) -> list[str]:
    """What the modality, the class balance and unknown patients mean for the plan."""
    notes = []
    modality = (stats.modality or "").strip()
    if modality:
        natural = (any(w in modality.lower() for w in NATURAL_WORDS)
                   or any(code in NATURAL_CODES for code in modality.upper().split()))
        notes.append(
            f"hypothesis (Morid et al. 2021), not a rule: {modality} is "
            + ("colour imaging close to natural photographs, where frozen ImageNet features "
               "tend to transfer well" if natural else
               "far from natural photographs (grey, other intensity physics), where "
               "fine-tuning may gain more over frozen features")
            + "; the grid tests it on your data")
    counts = [c for c in stats.per_class.values() if c]
    if counts and min(counts) / max(counts) < 0.5:
        notes.append(f"classes imbalanced (minority/majority {min(counts) / max(counts):.2f}): "
                     "medtl weights them 'balanced' automatically; report sensitivity and "
                     "specificity, not accuracy alone")
    if stats.n_patients is None:
        notes.append("patients unknown: if a patient can have several images, pass "
                     "--patient-regex so that no patient is on both sides of a split")
    return notes


def dataset_stats(ds) -> DataStats:
    """:class:`DataStats` of a loaded Dataset (image size from up to 20 images)."""
    import numpy as np

    from medtl.data.checks import _modality

    per_class = {c: 0 for c in ds.classes}
    if ds.multilabel:  # images where each label is present
        per_class = dict(zip(ds.classes, np.nansum(ds.labels, axis=0).astype(int).tolist(),
                             strict=True))
    else:
        for label in ds.labels:
            per_class[ds.classes[int(label)]] += 1
    patients = {p for p in ds.patients if p}
    step = max(1, len(ds) // 20)
    sides = [min(ds.read(i).shape[:2]) for i in range(0, len(ds), step)][:20]
    first = ds.volumes[0] or ds.paths[0]
    # Only DICOM says what the images are; a file type is not a modality.
    dicom = first.lower().endswith(".dcm") or Path(first).is_dir()
    return DataStats(n_images=len(ds), per_class=per_class,
                     n_patients=len(patients) if patients else None,
                     modality=_modality(first) if dicom else None,
                     median_side=int(np.median(sides)), volumes=any(ds.volumes))


def _imagenet_available(name: str) -> bool:
    from medtl.models.registry import get_spec
    from medtl.models.weights import imagenet_available

    return imagenet_available(get_spec(name))[0]


def format_options(options: dict[str, Any]) -> str:
    """The options as ``medtl train`` flags."""
    parts: Sequence[str] = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        parts = [*parts, flag if v is True else f"{flag} {v}"]
    return " ".join(parts)
