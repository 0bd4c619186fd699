"""Multi-stage transfer: a finished medtl run's backbone as the starting weights of another run
(``--weights RUN_DIR``: ImageNet -> domain -> task).

A run directory comes from anyone, so it is read as untrusted input: config.json and
model/model.json bounded (regular files of at most MAX_JSON_BYTES) and only the values used here
checked (the backbone's name, the run's own weights provenance, its data fingerprint, its kind);
the weights from the run's safetensors file (tensors only, never code), read once into memory
so that the sha256 recorded is that of the very bytes loaded. Every tensor must be one of the
backbone's, with its shape; the classifier is dropped (a new task has its own classes).
``medtl.train`` and the CLI also open the run with ``medtl.run.load_run`` first (the whole
run checked); this module sits in the models layer, below ``medtl.run``, so it checks what it
reads itself.

Which file: a frozen run saves its backbone (``backbone.safetensors``: the weights it started
from, ImageNet's for an ImageNet run); a trained network (fine-tune, full, auto's climb) saves
the whole network (``model.safetensors``), whose backbone part is taken. A truncated network
has lost its top blocks and is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torch import Tensor

from medtl.errors import MedtlError, WeightsError
from medtl.files import MAX_JSON_BYTES, read_bytes, read_json
from medtl.models.backbone import WeightsInfo, layout
from medtl.models.registry import BackboneSpec
from medtl.models.weights import ResolvedWeights, conform_state_dict, weights_info_from_dict

MAX_WEIGHTS_BYTES = 4 << 30  # the largest registry backbone (VGG-16, 528 MB) with room
_FILES = {"frozen": "backbone.safetensors", "network": "model.safetensors"}
_HEAD_PREFIXES = ("classifier.", "imagenet_pool.")


def is_run_dir(weights: Any) -> bool:
    """Whether ``weights`` names a directory (``--weights RUN_DIR``) rather than a keyword or a
    weights file."""
    if not isinstance(weights, str | Path) or weights in ("imagenet", "random"):
        return False
    return Path(weights).expanduser().is_dir()


def resolve_run_weights(spec: BackboneSpec, run_dir: str | Path) -> ResolvedWeights:
    """The backbone of the finished run ``run_dir`` for ``spec``, with its provenance chain.

    Raises WeightsError (one line naming the run and the problem) when the directory is not a
    finished single run, trained another backbone, or its weight file does not fit.
    """
    root = Path(run_dir).expanduser().resolve()
    config = _read(root / "config.json", root)
    meta = _read(root / "model" / "model.json", root)
    if config.get("kind") == "cv" or "folds" in config:
        raise WeightsError(f"--weights {root}: a cross-validation run has one model per fold; "
                           "pass one fold's run (folds/fold-K)")
    trained = config.get("backbone")
    params = meta.get("params") if isinstance(meta.get("params"), dict) else {}
    if trained != spec.name or params.get("backbone", trained) != trained:
        shown = str(trained)[:80] if isinstance(trained, str) else "no recorded backbone"
        raise WeightsError(f"--weights {root}: that run trained {shown!r}, not {spec.name!r}; "
                           f"pass --backbone {shown} or a run of {spec.name}")
    kind = meta.get("kind") or ("network" if (root / "model" / _FILES["network"]).exists()
                                else "frozen")  # medtl 0.1 wrote no kind
    if kind not in _FILES:
        raise WeightsError(f"--weights {root}: model.json kind {str(kind)[:40]!r} is not "
                           "frozen or network")
    if meta.get("keep") is not None:
        raise WeightsError(f"--weights {root}: a truncated run keeps only the lower blocks of "
                           f"{spec.name}; its backbone is incomplete and cannot start another run")
    source_info = weights_info_from_dict(meta.get("weights_info"),
                                         f"{root}/model/model.json weights_info")
    path = root / "model" / _FILES[kind]
    data, raw = _read_tensors(path)
    sd = _backbone_tensors(spec, raw, str(path))
    fingerprint = _fingerprint(config)
    provenance = WeightsInfo("run", f"run:{root}", path, hashlib.sha256(data).hexdigest(),
                             fingerprint, source_info.stages())
    return ResolvedWeights(kind="run", source=provenance.source, path=path,
                           sha256=provenance.sha256, state_dict=sd, head=None,
                           missing_head=True, provenance=provenance)


def _read(path: Path, root: Path) -> dict[str, Any]:
    try:
        value = read_json(path, max_bytes=MAX_JSON_BYTES)
    except FileNotFoundError:
        raise WeightsError(f"--weights {root}: no {path.relative_to(root)}: not a finished "
                           "medtl run") from None
    except MedtlError as exc:
        raise WeightsError(f"--weights {root}: {exc}") from None
    except ValueError as exc:  # not JSON
        raise WeightsError(f"--weights {path}: not JSON ({str(exc)[:80]})") from None
    if not isinstance(value, dict):
        raise WeightsError(f"--weights {path}: not a medtl run file")
    return value


def _read_tensors(path: Path) -> tuple[bytes, dict[str, Tensor]]:
    """The file's bytes (hashed) and the tensors parsed from those same bytes."""
    from safetensors.torch import load

    try:
        data = read_bytes(path, max_bytes=MAX_WEIGHTS_BYTES)
    except FileNotFoundError:
        raise WeightsError(f"--weights: {path} is missing: not a finished medtl run") from None
    except MedtlError as exc:
        raise WeightsError(f"--weights: {exc}") from None
    try:
        return data, load(data)
    except Exception as exc:  # a corrupt or foreign file: safetensors raises several types
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise WeightsError(f"--weights: {path} is not a safetensors weights file "
                           f"({reason})") from None


def _backbone_tensors(spec: BackboneSpec, raw: dict[str, Tensor], origin: str
                      ) -> dict[str, Tensor]:
    """The backbone's tensors in the builder's key space, the classifier dropped; anything that
    is not a tensor of this backbone refused (a run's file is medtl's own layout, exactly)."""
    lay = layout(spec.name)
    known = set(lay.backbone_to_builder)
    unknown = [k for k in raw if k not in known and not k.startswith(_HEAD_PREFIXES)]
    if unknown:
        raise WeightsError(f"--weights: {origin} holds tensors that are not {spec.name}'s "
                           f"({', '.join(unknown[:3])}); refused")
    body = {k: v for k, v in raw.items() if not k.startswith(_HEAD_PREFIXES)}
    sd, _head, _ignored, _missing = conform_state_dict(spec, body, origin)
    return sd


def _fingerprint(config: dict[str, Any]) -> str | None:
    data = config.get("data")
    value = data.get("fingerprint") if isinstance(data, dict) else None
    if value is None:
        return None
    from medtl.models.weights import is_sha256

    if not is_sha256(value):
        raise WeightsError(f"--weights: config.json data fingerprint {str(value)[:80]!r} is "
                           "not 64 lowercase hex digits")
    return value
