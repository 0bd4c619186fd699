"""model.json read back: every value checked before anything uses it.

A run directory is untrusted input (researchers share them), so what its ``model.json`` says
is checked for type and bounds here, in one place, with one clear MedtlError naming the file:
class names (they become CSV columns and are printed), the training options (the backbone,
strategy and head against their registries), the sizes that allocate memory (feature
dimension, kept and trainable blocks), the calibration temperature and the recorded weights
provenance. Registries are imported only when a file is checked: they import torch.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medtl.data.transforms import Preprocessing
from medtl.errors import MedtlError, check_choice
from medtl.training.options import TrainOptions

MODEL_FORMAT = 2
MAX_CLASSES = 10_000
MAX_NAME = 255          # characters of a class name (a folder name, at most)
MAX_BLOCKS = 1_000      # blocks a backbone has (kept, trainable, unfrozen)
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**32 - 1    # what NumPy's and scikit-learn's random_state accept

# The caller's settings for this machine, never taken from the file.
RUNTIME = ("device", "quiet", "skip_bad", "threads")
_BOOLS = ("gradual", "hflip", "calibrate", "cache")
# (minimum, maximum, None allowed) of the integer options.
_INTS = {"in_chans": (1, 3, False), "epochs": (1, 100_000, True),
         "batch_size": (1, 65_536, False), "unfreeze": (0, MAX_BLOCKS, True),
         "keep": (1, MAX_BLOCKS, True), "patience": (1, 100_000, False),
         "seed": (0, MAX_SEED, False)}


def shown(value: Any, limit: int = 60) -> str:
    """A value read from a file, for a one-line message: its repr, cut at ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def check_int(value: Any, what: str, lo: int, hi: int, *, none: bool = False) -> int | None:
    """``value`` when it is an integer in [lo, hi] (``None`` too when ``none``)."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MedtlError(f"{what} {shown(value)}: not an integer in {lo}..{hi}")
    return value


def check_float(value: Any, what: str, lo: float, hi: float, *, none: bool = False,
                ) -> float | None:
    """``value`` as a float when it is a finite number in (lo, hi] (``None`` when ``none``)."""
    if value is None and none:
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or not lo < value <= hi):
        raise MedtlError(f"{what} {shown(value)}: not a number in ({lo}, {hi}]")
    return float(value)


def check_text(value: Any, what: str, *, limit: int = MAX_NAME) -> str:
    """A non-empty string of at most ``limit`` characters without control characters."""
    if (not isinstance(value, str) or not value or len(value) > limit
            or any(unicodedata.category(c) == "Cc" for c in value)):
        raise MedtlError(f"{what} {shown(value)}: not a short line of text")
    return value


def check_class_names(value: Any, where: str) -> list[str]:
    """Class names from a run: 2 to MAX_CLASSES unique names, each usable as a CSV column and
    in a file name (no path separator, no NUL or control character, not ``.`` or ``..``)."""
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_CLASSES:
        raise MedtlError(f"{where}: classes must be a list of 2 to {MAX_CLASSES} names")
    for name in value:
        check_text(name, f"{where}: class name", limit=MAX_NAME)
        if "/" in name or "\\" in name or name in (".", ".."):
            raise MedtlError(f"{where}: class name {name[:60]!r} holds a path separator or "
                             "is '.' or '..'")
    if len(set(value)) != len(value):
        raise MedtlError(f"{where}: class names repeat")
    return list(value)


def options_from_meta(params: Any, where: str, **runtime: Any) -> TrainOptions:
    """The training options a model.json recorded, every value checked (the strategy and head
    names against their registries in ``run.load_run``), with this machine's
    ``runtime`` settings (device, quiet, skip_bad, threads) in place of the recorded ones.
    Keys this medtl does not know are ignored, so bundles of other versions load."""
    from medtl.data.augment import AUGMENT_PRESETS
    from medtl.models.registry import get_spec

    if not isinstance(params, Mapping):
        raise MedtlError(f"{where}: params is not a mapping of training options")
    values = {k: v for k, v in params.items() if k in TrainOptions.names() and k not in RUNTIME}
    try:
        for name in ("backbone", "strategy", "head", "weights", "augment", "class_weight",
                     "sampler", "engine"):
            if name in values:
                check_text(values[name], name, limit=4096 if name == "weights" else MAX_NAME)
        # The strategy and head registries import this module's users: run.load_run checks
        # those two names. A wrong one here reaches no file and no index.
        get_spec(values.get("backbone", TrainOptions.backbone))
        check_choice("augment", values.get("augment", TrainOptions.augment), AUGMENT_PRESETS)
        for name in _BOOLS:
            if name in values and not isinstance(values[name], bool):
                raise MedtlError(f"{name} {shown(values[name])}: not true or false")
        for name, (lo, hi, none) in _INTS.items():
            if name in values:
                check_int(values[name], name, lo, hi, none=none)
        if values.get("image_size") is not None:
            from medtl.data.transforms import MAX_SIZE, MIN_SIZE

            check_int(values["image_size"], "image_size", MIN_SIZE, MAX_SIZE)
        for name, hi in (("lr", 10.0), ("lr_decay", 1.0)):
            if name in values:
                check_float(values[name], name, 0.0, hi)
        if "label_smoothing" in values:  # [0, 1): checked as a number here, bounds below
            check_float(values["label_smoothing"], "label_smoothing", -1.0, 1.0)
        if values.get("ema") is not None:
            check_float(values["ema"], "ema", 0.0, 1.0)
        if values.get("mix") is not None:  # None: an older run's "the preset's"; choice below
            check_text(values["mix"], "mix")
        if values.get("time_budget") is not None:  # minutes; a year at most
            check_float(values["time_budget"], "time_budget", 0.0, 525_600.0)
        if "align" in values:  # the choice below
            check_text(values["align"], "align")
        if "align_weight" in values:  # 0 allowed: checked as a number here, bounds below
            check_float(values["align_weight"], "align_weight", -1.0, 1e6)
        if values.get("align_target") is not None:
            target = values["align_target"]
            if not isinstance(target, list) or len(target) > 100_000:
                raise MedtlError(f"align_target {shown(target)}: not a list of paths")
            for item in target:
                check_text(item, "align_target", limit=4096)
        options = TrainOptions.from_mapping({**values, **runtime})
        options.check()
    except MedtlError as exc:
        raise MedtlError(f"{where}: {exc}") from None
    return options


def check_model_meta(meta: Any, where: str | Path) -> dict[str, Any]:
    """A model.json's content, checked; its ``preprocessing`` becomes a :class:`Preprocessing`
    and its ``weights_info`` a :class:`~medtl.models.backbone.WeightsInfo`.

    The options (``params``) are checked by :func:`options_from_meta`, which needs the
    caller's runtime settings. A format newer than this medtl reads is refused, asking for an
    upgrade.
    """
    from medtl.models.weights import weights_info_from_dict

    if not isinstance(meta, dict):
        raise MedtlError(f"{where}: not a medtl model.json")
    fmt = meta.get("format", 1)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise MedtlError(f"{where}: format {shown(fmt)} is not a medtl model format")
    if fmt > MODEL_FORMAT:
        raise MedtlError(f"{where}: format {fmt} is newer than this medtl reads "
                         f"({MODEL_FORMAT}); upgrade medtl")
    out = dict(meta)
    try:
        if meta.get("kind") not in (None, "frozen", "network"):
            raise MedtlError(f"unknown model kind {shown(meta.get('kind'))}")
        out["classes"] = check_class_names(meta.get("classes"), "classes")
        if meta.get("num_classes", len(out["classes"])) != len(out["classes"]):
            raise MedtlError(f"num_classes {str(meta['num_classes'])[:20]} differs from the "
                             f"{len(out['classes'])} class names")
        if not isinstance(meta.get("preprocessing"), dict):
            raise MedtlError("preprocessing is missing or not a mapping")
        out["preprocessing"] = Preprocessing.from_dict(meta["preprocessing"])
        check_int(meta.get("feature_dim"), "feature_dim", 1, 1 << 16, none=True)
        check_int(meta.get("keep"), "keep", 1, MAX_BLOCKS, none=True)
        check_int(meta.get("trainable_blocks"), "trainable_blocks", 0, MAX_BLOCKS, none=True)
        out["temperature"] = check_float(meta.get("temperature"), "temperature", 0.0,
                                         MAX_TEMPERATURE, none=True)
        _check_head_params(meta.get("head_params"))
        out["weights_info"] = weights_info_from_dict(meta.get("weights_info"), "weights_info")
    except MedtlError as exc:
        raise MedtlError(f"{where}: {exc}") from None
    return out


def _check_head_params(params: Any) -> None:
    """The head's chosen hyperparameters (shown, never used to predict): a few scalars."""
    if params is None:
        return
    if not isinstance(params, dict) or len(params) > 64:
        raise MedtlError("head_params is not a small mapping")
    for k, v in params.items():
        check_text(k, "head_params key", limit=64)
        if isinstance(v, float) and not math.isfinite(v) or not (
                v is None or isinstance(v, bool | int | float)
                or isinstance(v, str) and len(v) <= MAX_NAME):
            raise MedtlError(f"head_params {k[:40]}: {shown(v)} is not a plain value")

