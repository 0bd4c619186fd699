"""An exported bundle on disk: its manifest, and a predictor that needs no PyTorch.

A bundle is a folder: ``model.onnx`` (a normalised image batch to class probabilities),
``preprocessing.json`` (how images become that batch, the classes and operating points), a
model card, and ``manifest.json`` naming every other file with its sha256. A bundle comes from
elsewhere (a colleague, a download), so loading treats it as untrusted: every file is checked
against the manifest, nothing else may lie in the folder, and every value is bounded.

This module imports onnxruntime, NumPy, Pillow and medtl's torch-free readers only; a test
checks that predicting with a bundle never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtl.data.transforms import Preprocessing
from medtl.errors import MedtlError
from medtl.files import MAX_JSON_BYTES, write_json

BUNDLE_FORMAT = 1
MODEL_FILE = "model.onnx"
# A TorchScript bundle's model instead of MODEL_FILE (`medtl export --format torchscript`);
# loading one needs PyTorch. Its archive holds TORCHSCRIPT_META: input, outputs, input shape.
TORCHSCRIPT_FILE = "model.pt"
TORCHSCRIPT_META = "medtl.json"
MODEL_FILES = (MODEL_FILE, TORCHSCRIPT_FILE)
PREPROCESSING_FILE = "preprocessing.json"
MANIFEST_FILE = "manifest.json"
CARD_JSON = "model-card.json"
CARD_MD = "model-card.md"
# An ensemble's bundle (`medtl export ENSEMBLE_RUN`): this combiner record and members/<name>/,
# each a bundle of its own; its manifest.json lists every file below it by relative path.
ENSEMBLE_FILE = "ensemble.json"
MEMBERS_DIR = "members"
# The graph's second output when the run has an out-of-distribution detector (medtl.transfer.ood)
OOD_OUTPUT = "ood_score"
# protobuf cannot hold a single-file ONNX model over 2 GiB; other files (model card) are small.
MAX_MODEL_BYTES = 2 << 30
MAX_OTHER_BYTES = 64 << 20
MAX_FILES = 64
MAX_OPERATING_POINTS = 64
BATCH_SIZE = 32
INPUT_SCALE = "pixels / 255 then (x - mean) / std"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_name(name: Any, where: Path) -> str:
    """A file name the manifest may list: one plain name inside the bundle, nothing else."""
    if (not isinstance(name, str) or not name or len(name) > 255 or name in (".", "..")
            or any(c in name for c in "/\\\0") or name == MANIFEST_FILE):
        raise MedtlError(f"{where}: file name {str(name)[:80]!r} is not a plain file name of "
                         "the bundle (no '/', '..' or manifest.json); refused")
    return name


def _read_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path``, never through a symlink (O_NOFOLLOW) and checked
    on the descriptor read, so the file hashed is the file used."""
    flags = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_NOCTTY", 0))
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise MedtlError(f"{path}: listed in the manifest but missing; refused") from None
    except OSError as exc:  # ELOOP: a symlink
        raise MedtlError(f"{path}: cannot be read ({exc.strerror or exc}; a symlink is "
                         "refused)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MedtlError(f"{path}: not a regular file; refused")
        if st.st_size > max_bytes:
            raise MedtlError(f"{path}: {st.st_size} bytes, more than {max_bytes}; refused")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise MedtlError(f"{path}: more than {max_bytes} bytes; refused")
    return data


def write_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``manifest.json``: the sha256 of every file in ``directory`` but itself.

    The exporter calls this last. The bundle must be flat and hold regular files only, as
    :func:`load_bundle` requires."""
    root = Path(directory)
    files: dict[str, str] = {}
    for entry in sorted(root.iterdir()):
        if entry.name == MANIFEST_FILE:
            continue
        if entry.is_symlink() or not entry.is_file():
            raise MedtlError(f"{entry}: a bundle holds regular files only")
        limit = MAX_MODEL_BYTES if entry.name in MODEL_FILES else MAX_OTHER_BYTES
        files[_check_name(entry.name, root)] = hashlib.sha256(_read_file(entry, limit)).hexdigest()
    manifest = {"format": BUNDLE_FORMAT, "files": files}
    write_json(root / MANIFEST_FILE, manifest)
    return manifest


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an exported bundle (a folder with a manifest and a model, ONNX or
    TorchScript, or an ensemble's ``ensemble.json``) rather than a run directory."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_FILE).is_file() \
        and any((p / name).is_file() for name in (*MODEL_FILES, ENSEMBLE_FILE))


def _manifest_listing(where: Path, raw: bytes, max_files: int = MAX_FILES) -> dict[str, Any]:
    """manifest.json's ``files`` (name -> sha256 as listed) from its bytes ``raw``."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MedtlError(f"{where}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise MedtlError(f"{where}: not a medtl bundle manifest of format {BUNDLE_FORMAT}")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not 0 < len(listed) <= max_files:
        raise MedtlError(f"{where}: 'files' must map 1 to {max_files} file names to sha256")
    return listed


def _verified_files(root: Path) -> dict[str, bytes]:
    """Every file the manifest lists, read once and checked against its sha256; a file the
    manifest does not list, or anything but a regular file, is refused."""
    where = root / MANIFEST_FILE
    listed = _manifest_listing(where, _read_file(where, MAX_JSON_BYTES))
    if PREPROCESSING_FILE not in listed:
        raise MedtlError(f"{where}: does not list {PREPROCESSING_FILE}; refused")
    if sum(name in listed for name in MODEL_FILES) != 1:
        raise MedtlError(f"{where}: must list exactly one of {' and '.join(MODEL_FILES)}; "
                         "refused")
    present = {entry.name for entry in root.iterdir()} - {MANIFEST_FILE}
    if extra := sorted(present - set(listed)):
        raise MedtlError(f"{root / extra[0]}: not listed in the manifest; refused")
    out = {}
    for name, digest in listed.items():
        _check_name(name, where)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise MedtlError(f"{where}: {name}: not a sha256 digest")
        path = root / name
        data = _read_file(path, MAX_MODEL_BYTES if name in MODEL_FILES else MAX_OTHER_BYTES)
        if hashlib.sha256(data).hexdigest() != digest:
            raise MedtlError(f"{path}: sha256 differs from the manifest (changed since export); "
                             "refused")
        out[name] = data
    return out


def _check_number(value: Any, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not low <= value <= high:
        raise MedtlError(f"{what} {str(value)[:40]!r}: not a number in [{low}, {high}]")
    return float(value)


def _check_preprocessing(d: Any) -> dict[str, Any]:
    """preprocessing.json's values, each checked as a run's model.json is (one MedtlError)."""
    from medtl.transfer.meta import check_text

    if not isinstance(d, dict) or d.get("format") != BUNDLE_FORMAT:
        raise MedtlError(f"not a medtl preprocessing of format {BUNDLE_FORMAT}")
    pre = Preprocessing.from_dict(d)
    labels = _check_labels(d)
    temperature = d.get("temperature")
    if temperature is not None:
        _check_number(temperature, "temperature", 1e-3, 1e3)
    io = d.get("input", {}), d.get("output", {})
    if not all(isinstance(x, dict) for x in io) \
            or io[0].get("layout", "NCHW") != "NCHW" or io[0].get("dtype", "float32") != "float32" \
            or io[0].get("scale", INPUT_SCALE) != INPUT_SCALE:
        raise MedtlError(f"input must be NCHW float32 scaled as {INPUT_SCALE!r}")
    names = [check_text(x.get(k, v), f"{k} name") for x, k, v in
             ((io[0], "name", "image"), (io[1], "name", "probabilities"))]
    task = _check_task(d, labels)
    if task["multilabel"] and temperature is not None:
        raise MedtlError("a multi-label model has no temperature (its probabilities are "
                         "per-label sigmoids)")
    return {"preprocessing": pre, **labels, **task, "temperature": temperature,
            "input_name": names[0], "output_name": names[1], "ood": _check_ood(d.get("ood"))}


# Beside a multi-label bundle's per-label thresholds: what they were chosen on, by which rule
# (text), and the labels that fell back to 0.5 (a list of labels)
THRESHOLD_NOTES = ("chosen_on", "rule", "fallback")


def _check_task(d: dict[str, Any], labels: dict[str, Any]) -> dict[str, Any]:
    """preprocessing.json's task: absent (single-label), or ``multilabel`` with ``thresholds``
    null or one number in [0, 1] per label (and what they were chosen on, by which rule)."""
    from medtl.transfer.meta import check_text

    task = d.get("task", "single")
    if task == "single" and "thresholds" not in d:
        return {"multilabel": False, "thresholds": None}
    if task != "multilabel":
        raise MedtlError(f"task {str(task)[:40]!r}: not 'multilabel' (a single-label bundle "
                         "names no task and no per-label thresholds)")
    if labels["positive_class"] is not None or labels["operating_points"]:
        raise MedtlError("a multi-label model has per-label thresholds, no positive_class and "
                         "no operating_points")
    thresholds, classes = d.get("thresholds"), labels["classes"]
    if thresholds is None:
        return {"multilabel": True, "thresholds": None}
    if not isinstance(thresholds, dict) or set(thresholds) - set(classes) - set(THRESHOLD_NOTES):
        raise MedtlError("thresholds must map each label to a number in [0, 1] (besides "
                         f"{', '.join(THRESHOLD_NOTES)})")
    out: dict[str, Any] = {k: check_text(thresholds[k], f"thresholds {k}")
                           for k in ("chosen_on", "rule") if k in thresholds and k not in classes}
    if "fallback" in thresholds and "fallback" not in classes:
        fallback = thresholds["fallback"]
        if not isinstance(fallback, list) or not all(x in classes for x in fallback):
            raise MedtlError("thresholds fallback must list labels of the model")
        out["fallback"] = list(fallback)
    for label in classes:
        if label not in thresholds:
            raise MedtlError(f"thresholds: none for the label {label[:60]!r}")
        out[label] = _check_number(thresholds[label], f"threshold of {label[:60]!r}", 0, 1)
    return {"multilabel": True, "thresholds": out}


def _check_labels(d: dict[str, Any]) -> dict[str, Any]:
    """The view, classes, positive class and operating points of preprocessing.json (or of an
    ensemble bundle's ensemble.json), each checked."""
    from medtl.data.sources import make_view
    from medtl.transfer.meta import check_class_names, check_text

    view = d.get("view", {})
    if not isinstance(view, dict) or set(view) - {"window", "slices", "mode"} \
            or not all(isinstance(v, str) for v in view.values()):
        raise MedtlError("view must map window, slices and mode to strings")
    make_view(**view)
    classes = check_class_names(d.get("classes"), "classes")
    positive = d.get("positive_class")
    if positive is not None and positive not in classes:
        raise MedtlError(f"positive_class {str(positive)[:60]!r} is not one of the classes")
    points = d.get("operating_points") or {}
    if not isinstance(points, dict) or len(points) > MAX_OPERATING_POINTS:
        raise MedtlError(f"operating_points must map at most {MAX_OPERATING_POINTS} names to "
                         "thresholds")
    points = {check_text(k, "operating point"): _check_number(v, f"operating point {k}", 0, 1)
              for k, v in points.items()}
    return {"view": view, "classes": classes, "positive_class": positive,
            "operating_points": points}


def _check_ood(d: Any) -> dict[str, Any] | None:
    """preprocessing.json's out-of-distribution record: absent, or a threshold on the graph's
    ``ood_score`` output."""
    from medtl.transfer.ood import FITTED_ON, MAX_TAG_LEN, MAX_TAGS

    if d is None:
        return None
    known = {"method", "threshold", "percentile", "fitted_on", "n_threshold", "modalities",
             "body_parts"}
    if not isinstance(d, dict) or set(d) - known:
        raise MedtlError(f"ood must be an object with keys among {sorted(known)}")
    if d.get("method", "mahalanobis") != "mahalanobis":
        raise MedtlError(f"ood method {str(d.get('method'))[:40]!r}: only 'mahalanobis'")
    out: dict[str, Any] = {"method": "mahalanobis",
                           "threshold": _check_number(d.get("threshold"), "ood threshold",
                                                      0, 1e12),
                           "percentile": _check_number(d.get("percentile", 99.0),
                                                       "ood percentile", 0, 100)}
    if d.get("fitted_on", "val") not in FITTED_ON:
        raise MedtlError(f"ood fitted_on {str(d.get('fitted_on'))[:40]!r}: not one of "
                         f"{list(FITTED_ON)}")
    out["fitted_on"] = d.get("fitted_on", "val")
    n = d.get("n_threshold")
    out["n_threshold"] = None if n is None else int(_check_number(n, "ood n_threshold", 1, 1e9))
    for key in ("modalities", "body_parts"):
        values = d.get(key, [])
        if not isinstance(values, list) or len(values) > MAX_TAGS or not all(
                isinstance(v, str) and 0 < len(v) <= MAX_TAG_LEN and v.isprintable()
                and v == v.strip().upper() for v in values):
            raise MedtlError(f"ood {key} must be a list of at most {MAX_TAGS} short upper-case "
                             "DICOM values")
        out[key] = list(values)
    return out


class _Predicting:
    """What a loaded bundle (one model or an ensemble of them) predicts with, given its
    ``classes``, ``view``, ``ood``, ``prepare`` (one decoded image to the model's input row)
    and ``predict_batch_ood`` (a stack of those rows to probabilities and OOD scores)."""

    classes: list[str]
    view: dict[str, str]
    ood: dict[str, Any] | None

    def prepare(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_batch_ood(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def dataset(self, inputs: Sequence[str | os.PathLike[str]]):
        """Image files (and folders of them) as a medtl Dataset, read with the bundle's view."""
        from medtl.data.sources import dataset_from_files, make_view

        return dataset_from_files(inputs, classes=self.classes, view=make_view(**self.view))

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, K) for a batch of :meth:`prepare`'s rows (for one model: a
        normalised float32 NCHW batch)."""
        return self.predict_batch_ood(batch)[0]

    def predict_dataset(self, ds, *, skip_bad: bool = False) -> np.ndarray:
        """Probabilities (N, K) for every image of ``ds``, in batches of ``BATCH_SIZE``; an
        unreadable image raises DataReadError, or with ``skip_bad`` gets a NaN row (as a run's
        prediction does: its CSV row says UNREADABLE)."""
        return self.predict_dataset_ood(ds, skip_bad=skip_bad)[0]

    def predict_dataset_ood(self, ds, *, skip_bad: bool = False,
                            ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`predict_dataset`'s probabilities and the OOD score (N,) of each image (NaN
        for one skipped; None when the bundle has no detector), from one graph run a batch."""
        from medtl.errors import DataReadError

        out = np.full((len(ds), len(self.classes)), np.nan)
        scores = None if self.ood is None else np.full(len(ds), np.nan)
        for start in range(0, len(ds), BATCH_SIZE):
            read, images = [], []
            for i in range(start, min(start + BATCH_SIZE, len(ds))):
                try:
                    images.append(self.prepare(ds.read(i)))
                except DataReadError:
                    if not skip_bad:
                        raise
                    continue
                read.append(i)
            if images:
                proba, score = self.predict_batch_ood(np.stack(images))
                out[read] = proba
                if scores is not None and score is not None:
                    scores[read] = score
        return out, scores

    def predict_proba(self, paths: Sequence[str | os.PathLike[str]], *,
                      skip_bad: bool = False) -> np.ndarray:
        """Probabilities (N, K), one row per image found in ``paths`` (files or folders)."""
        return self.predict_dataset(self.dataset(paths), skip_bad=skip_bad)


@dataclass
class ExportedModel(_Predicting):
    """A loaded bundle: its classes and operating points, and probabilities for image files.

    The ONNX graph maps the normalised batch to probabilities, calibration temperature
    included; ``temperature`` is shown for information and not applied again."""

    directory: Path
    classes: list[str]
    positive_class: str | None
    operating_points: dict[str, float]
    preprocessing: Preprocessing
    view: dict[str, str]
    temperature: float | None
    input_name: str
    output_name: str
    sha256: str  # of model.onnx
    info: dict[str, Any] = field(repr=False)  # preprocessing.json as read
    session: Any = field(repr=False, default=None)
    # preprocessing.json's "ood" (threshold, training modalities...) when the graph scores it
    ood: dict[str, Any] | None = None
    card: dict[str, Any] | None = field(repr=False, default=None)  # model-card.json, if listed
    model_file: str = MODEL_FILE  # or TORCHSCRIPT_FILE: what error messages name
    # A multi-label model: probabilities are one sigmoid per label (``classes`` names the
    # labels), decided at ``thresholds`` ({"chosen_on": "val", "rule": ..., label: t}, as the
    # run's metrics.json records them; None when the run recorded none).
    multilabel: bool = False
    thresholds: dict[str, Any] | None = None

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """The graph's input row (C, S, S) for one decoded (H, W, 3) uint8 image."""
        pre = self.preprocessing
        return pre.normalise(pre.resize_uint8(image)[None])[0]

    def predict_batch_ood(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (N, K) and, when the bundle has an out-of-distribution detector, the
        OOD score (N,) of each image (None otherwise), from one run of the graph."""
        names = [self.output_name] + ([OOD_OUTPUT] if self.ood is not None else [])
        try:
            out, *rest = self.session.run(names, {self.input_name: batch})
        except Exception as exc:  # onnxruntime's own types: a graph that fails on its input
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise MedtlError(f"{self.directory / self.model_file}: the model failed on a batch "
                             f"({reason})") from None
        out = np.asarray(out, dtype=np.float64)
        if out.shape != (len(batch), len(self.classes)):
            raise MedtlError(f"{self.directory / self.model_file}: output of shape {out.shape}, "
                             f"not ({len(batch)}, {len(self.classes)}); refused")
        if not rest:
            return out, None
        score = np.asarray(rest[0], dtype=np.float64).reshape(-1)
        if score.shape != (len(batch),):
            raise MedtlError(f"{self.directory / self.model_file}: {OOD_OUTPUT} of shape "
                             f"{score.shape}, not ({len(batch)},); refused")
        return out, score


@dataclass(frozen=True)
class _Arg:
    """An input or output as onnxruntime's NodeArg describes it (name, shape)."""

    name: str
    shape: list[Any]


class _TorchScriptSession:
    """A TorchScript module behind onnxruntime's InferenceSession interface (``run``,
    ``get_inputs``, ``get_outputs``), so ExportedModel predicts with it unchanged."""

    def __init__(self, module: Any, input_name: str, outputs: list[str],
                 shape: list[Any]) -> None:
        self.module, self.input_name, self.outputs = module, input_name, outputs
        self.shape = shape

    def get_inputs(self) -> list[_Arg]:
        return [_Arg(self.input_name, self.shape)]

    def get_outputs(self) -> list[_Arg]:
        return [_Arg(name, ["batch"]) for name in self.outputs]

    def run(self, output_names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(feeds[self.input_name], dtype=np.float32))
        with torch.inference_mode():
            out = self.module(x)
        out = list(out) if isinstance(out, tuple | list) else [out]
        if len(out) != len(self.outputs):
            raise ValueError(f"{len(out)} outputs, not {len(self.outputs)}")
        by_name = dict(zip(self.outputs, out, strict=True))
        return [by_name[name].detach().cpu().numpy() for name in output_names]


def _torchscript_session(model: bytes, where: Path) -> _TorchScriptSession:
    """The TorchScript module of the checked bytes (torch.jit.load from memory, never from the
    path, on the CPU), with the input and output names its archive records. Needs PyTorch."""
    import io
    import warnings

    try:
        import torch
    except ImportError:
        raise MedtlError(f"{where}: a TorchScript bundle needs PyTorch; export the run with "
                         "--format onnx to predict without it") from None
    extra = {TORCHSCRIPT_META: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates torch.jit
            module = torch.jit.load(io.BytesIO(model), map_location="cpu",
                                    _extra_files=extra)
        meta = json.loads(extra[TORCHSCRIPT_META] or "null")
    except Exception as exc:  # torch raises RuntimeError and others for a bad archive
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MedtlError(f"{where}: not a TorchScript model medtl wrote ({reason})") from None
    shape = meta.get("shape") if isinstance(meta, dict) else None
    outputs = meta.get("outputs") if isinstance(meta, dict) else None
    if not isinstance(meta.get("input") if isinstance(meta, dict) else None, str) \
            or not isinstance(outputs, list) or not 0 < len(outputs) <= 4 \
            or not all(isinstance(o, str) for o in outputs) \
            or not isinstance(shape, list) or len(shape) != 4:
        raise MedtlError(f"{where}: no {TORCHSCRIPT_META} naming its input, outputs and input "
                         "shape; refused")
    return _TorchScriptSession(module.eval(), meta["input"], outputs, shape)


def _session(model: bytes, where: Path, input_name: str, output_names: Sequence[str]):
    """An onnxruntime session on the checked bytes themselves (no second read of the file, and
    no external-data path resolved beside it); for ``model.pt`` a TorchScript module behind
    the same interface."""
    session = (_torchscript_session(model, where) if where.name == TORCHSCRIPT_FILE
               else _onnx_session(model, where))
    outputs = {o.name for o in session.get_outputs()}
    if input_name not in [i.name for i in session.get_inputs()] \
            or any(name not in outputs for name in output_names):
        raise MedtlError(f"{where}: no input {input_name!r} or no output among "
                         f"{list(output_names)!r}")
    return session


def _onnx_session(model: bytes, where: Path):
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a bad graph
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc)
        raise MedtlError(f"{where}: not an ONNX model onnxruntime can run ({reason})") from None
    return session


def _check_input_shape(session, where: Path, name: str, pre: Preprocessing) -> None:
    """The graph's input, where its dimensions are fixed, is the batch preprocessing.json
    makes: a mismatch is refused on load rather than at the first image."""
    (shape,) = [i.shape for i in session.get_inputs() if i.name == name]
    wanted = [None, pre.channels, pre.size, pre.size]
    if len(shape) != 4 or any(isinstance(d, int) and w is not None and d != w
                              for d, w in zip(shape, wanted, strict=True)):
        raise MedtlError(f"{where}: input {name!r} of shape {shape}, not (N, {pre.channels}, "
                         f"{pre.size}, {pre.size}) as {PREPROCESSING_FILE} says; refused")


def load_bundle(path: str | os.PathLike[str]) -> ExportedModel:
    """Load an exported bundle, every file checked against the manifest and every value of
    preprocessing.json bounded; each problem is one MedtlError naming the file.

    An ONNX bundle (``model.onnx``) runs on onnxruntime and never imports torch; a TorchScript
    bundle (``model.pt``) needs PyTorch, and is loaded from the checked bytes."""
    root = Path(path)
    if is_ensemble_bundle(root):
        return load_ensemble_bundle(root)
    if not is_bundle(root):
        raise MedtlError(f"{root}: not an exported bundle (no {MANIFEST_FILE} and "
                         f"{' or '.join(MODEL_FILES)})")
    return _model_from_files(root, _verified_files(root))


def _card(files: dict[str, bytes], root: Path) -> dict[str, Any] | None:
    """The bundle's model-card.json as a dict (None when the bundle has none)."""
    if CARD_JSON not in files:
        return None
    try:
        card = json.loads(files[CARD_JSON].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MedtlError(f"{root / CARD_JSON}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(card, dict):
        raise MedtlError(f"{root / CARD_JSON}: not a JSON object")
    return card


def _model_from_files(root: Path, files: dict[str, bytes]) -> ExportedModel:
    """The ExportedModel of a bundle's files, already checked against its manifest."""
    model_file = next(name for name in MODEL_FILES if name in files)
    where = root / PREPROCESSING_FILE
    try:
        info = json.loads(files[PREPROCESSING_FILE].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MedtlError(f"{where}: not valid JSON ({type(exc).__name__})") from None
    try:
        checked = _check_preprocessing(info)
    except MedtlError as exc:
        raise MedtlError(f"{where}: {exc}") from None
    outputs = [checked["output_name"]] + ([OOD_OUTPUT] if checked["ood"] is not None else [])
    session = _session(files[model_file], root / model_file, checked["input_name"], outputs)
    _check_input_shape(session, root / model_file, checked["input_name"],
                       checked["preprocessing"])
    card = _card(files, root)
    return ExportedModel(directory=root, sha256=hashlib.sha256(files[model_file]).hexdigest(),
                         info=info, session=session, card=card, model_file=model_file, **checked)



# ------------------------------------------------------------------------------ ensembles
# An ensemble bundle: ensemble.json (combiner, classes, operating points), the ensemble's model
# card, and members/<name>/, each a whole single-model bundle with its own manifest; the
# top-level manifest.json lists every file below the bundle by relative path.
MAX_DEPTH = 3  # members/<name>/<file>


def is_ensemble_bundle(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an ensemble's exported bundle (manifest.json and ensemble.json)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_FILE).is_file() and (p / ENSEMBLE_FILE).is_file()


def _max_tree_files() -> int:
    from medtl.transfer.ensemble import MAX_MEMBERS

    return MAX_FILES * (MAX_MEMBERS + 1)


def _check_rel(rel: Any, where: Path) -> str:
    """A path the ensemble manifest may list: 1 to MAX_DEPTH plain names joined by '/', not the
    top-level manifest itself."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if not 0 < len(parts) <= MAX_DEPTH or rel == MANIFEST_FILE or any(
            not p or p in (".", "..") or len(p) > 255 or any(c in p for c in "\\\0")
            for p in parts):
        raise MedtlError(f"{where}: path {str(rel)[:80]!r} is not a relative path inside the "
                         "bundle; refused")
    return rel


def _tree(root: Path) -> list[str]:
    """Every regular file below ``root`` by relative path (the top-level manifest aside); a
    link, a special file or a folder deeper than MAX_DEPTH is refused."""
    found: list[str] = []

    def walk(folder: Path, prefix: str, depth: int) -> None:
        for entry in sorted(folder.iterdir()):
            rel = prefix + entry.name
            if entry.is_symlink():
                raise MedtlError(f"{entry}: a symbolic link in a bundle; refused")
            if entry.is_dir() and depth < MAX_DEPTH:
                walk(entry, rel + "/", depth + 1)
            elif entry.is_file() and rel != MANIFEST_FILE:
                found.append(rel)
            elif rel != MANIFEST_FILE:
                raise MedtlError(f"{entry}: not a regular file of the bundle; refused")
            if len(found) > _max_tree_files():
                raise MedtlError(f"{root}: more than {_max_tree_files()} files; refused")

    walk(root, "", 1)
    return found


def _limit(rel: str) -> int:
    return MAX_MODEL_BYTES if rel.rsplit("/", 1)[-1] in MODEL_FILES else MAX_OTHER_BYTES


def write_tree_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Write an ensemble bundle's ``manifest.json``: the sha256 of every file below
    ``directory`` by relative path (the members' own manifests included)."""
    root = Path(directory)
    files = {_check_rel(rel, root): hashlib.sha256(_read_file(root / rel, _limit(rel)))
             .hexdigest() for rel in _tree(root)}
    manifest = {"format": BUNDLE_FORMAT, "kind": "ensemble", "files": files}
    write_json(root / MANIFEST_FILE, manifest)
    return manifest


def _verified_tree(root: Path) -> dict[str, bytes]:
    """Every file the ensemble manifest lists, read once and checked against its sha256 (and
    the manifest's own bytes); a file below the bundle it does not list, a link or a special
    file is refused."""
    where = root / MANIFEST_FILE
    raw = _read_file(where, MAX_JSON_BYTES)
    listed = _manifest_listing(where, raw, _max_tree_files())
    if ENSEMBLE_FILE not in listed:
        raise MedtlError(f"{where}: does not list {ENSEMBLE_FILE}; refused")
    if extra := sorted(set(_tree(root)) - set(listed)):
        raise MedtlError(f"{root / extra[0]}: not listed in the manifest; refused")
    out = {MANIFEST_FILE: raw}  # the bytes checked: their sha256 names the bundle
    for rel, digest in listed.items():
        _check_rel(rel, where)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise MedtlError(f"{where}: {rel}: not a sha256 digest")
        data = _read_file(root / rel, _limit(rel))
        if hashlib.sha256(data).hexdigest() != digest:
            raise MedtlError(f"{root / rel}: sha256 differs from the manifest (changed since "
                             "export); refused")
        out[rel] = data
    return out


def _member_files(files: dict[str, bytes], name: str, where: Path) -> dict[str, bytes]:
    """One member's files (by their names in its own folder), which its own manifest.json must
    list exactly, with the same sha256: each member folder stays a bundle of its own."""
    prefix = f"{MEMBERS_DIR}/{name}/"
    own = {rel[len(prefix):]: data for rel, data in files.items() if rel.startswith(prefix)}
    if MANIFEST_FILE not in own:
        raise MedtlError(f"{where / MANIFEST_FILE}: missing (each member is a bundle); refused")
    listed = _manifest_listing(where / MANIFEST_FILE, own.pop(MANIFEST_FILE))
    if set(listed) != set(own):
        odd = sorted(set(listed) ^ set(own))[0]
        raise MedtlError(f"{where / odd}: the member's manifest and its folder disagree; "
                         "refused")
    for name_, data in own.items():
        _check_name(name_, where)
        if listed[name_] != hashlib.sha256(data).hexdigest():
            raise MedtlError(f"{where / name_}: sha256 differs from the member's manifest; "
                             "refused")
    return own


class _EnsembleInput:
    """The image grid an ensemble is shown on (occlusion maps of ``medtl serve``): the
    largest member's input size; ``normalise`` turns grid images into :meth:`prepare`'s
    rows, each member resizing the grid image to its own input."""

    def __init__(self, ensemble: ExportedEnsemble) -> None:
        self.ensemble = ensemble
        self.grid = max((m.preprocessing for m in ensemble.members), key=lambda p: p.size)
        self.size, self.channels = self.grid.size, 3

    def resize_uint8(self, image: np.ndarray) -> np.ndarray:
        return self.grid.resize_uint8(image)

    def normalise(self, batch_uint8: np.ndarray) -> np.ndarray:
        return np.stack([self.ensemble.prepare(image) for image in batch_uint8])

    def to_dict(self) -> dict[str, Any]:
        return {"members": [m.preprocessing.to_dict() for m in self.ensemble.members]}


@dataclass
class ExportedEnsemble(_Predicting):
    """A loaded ensemble bundle: each member an ExportedModel reading the image at its own
    size and normalisation, their probabilities combined as the ensemble run combines them
    (medtl.transfer.ensemble.combine), and the OOD score as an ensemble run's: the highest
    member score over that member's threshold (flagged above 1), present when every member
    has a detector.

    A :meth:`prepare` row is the members' normalised inputs flattened one after the other."""

    directory: Path
    members: list[ExportedModel]
    member_names: list[str]
    method: str
    params: dict[str, Any]
    classes: list[str]
    positive_class: str | None
    operating_points: dict[str, float]
    view: dict[str, str]
    sha256: str  # of manifest.json: it fixes every file of the bundle
    info: dict[str, Any] = field(repr=False)  # ensemble.json as read
    ood: dict[str, Any] | None = None
    card: dict[str, Any] | None = field(repr=False, default=None)
    temperature: float | None = None  # members' probabilities are calibrated in their graphs
    model_file: str = ENSEMBLE_FILE
    multilabel: bool = False  # ensembles combine single-label runs (medtl.ensembles)
    thresholds: dict[str, Any] | None = None

    @property
    def preprocessing(self) -> _EnsembleInput:
        return _EnsembleInput(self)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return np.concatenate([m.prepare(image).ravel() for m in self.members])

    def predict_batch_ood(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        from medtl.transfer.ensemble import combine

        batch = np.asarray(batch, dtype=np.float32).reshape(len(batch), -1)
        shapes = [(m.preprocessing.channels, m.preprocessing.size, m.preprocessing.size)
                  for m in self.members]
        ends = np.cumsum([int(np.prod(s)) for s in shapes])
        if batch.shape[1] != ends[-1]:
            raise MedtlError(f"{self.directory}: an input row of {batch.shape[1]} values, not "
                             f"the members' {ends[-1]}")
        outs = [m.predict_batch_ood(np.ascontiguousarray(
            batch[:, end - int(np.prod(shape)):end].reshape(len(batch), *shape)))
            for m, shape, end in zip(self.members, shapes, ends, strict=True)]
        proba = combine([p for p, _ in outs], self.method, self.params)
        if self.ood is None:
            return proba, None
        scores = np.stack([s / float(m.ood["threshold"])
                           for (_, s), m in zip(outs, self.members, strict=True)])
        return proba, np.max(scores, axis=0)


def _check_ensemble_info(d: Any, where: Path) -> dict[str, Any]:
    """ensemble.json's values checked: format, members (2 to MAX_MEMBERS plain, unique
    names), labels as preprocessing.json's, and the combiner as an ensemble run's."""
    from medtl.transfer.ensemble import MAX_MEMBERS, check_combiner, safe_name

    if not isinstance(d, dict) or d.get("format") != BUNDLE_FORMAT or d.get("kind") != "ensemble":
        raise MedtlError(f"{where}: not a medtl ensemble record of format {BUNDLE_FORMAT}")
    members = d.get("members")
    names = [m.get("name") if isinstance(m, dict) else None for m in members] \
        if isinstance(members, list) else []
    if not 2 <= len(names) <= MAX_MEMBERS or not all(safe_name(n) for n in names) \
            or len(set(names)) != len(names):
        raise MedtlError(f"{where}: members must be 2 to {MAX_MEMBERS} plain, unique folder "
                         "names")
    try:
        labels = _check_labels(d)
    except MedtlError as exc:
        raise MedtlError(f"{where}: {exc}") from None
    combiner = check_combiner({"method": d.get("method"), "params": d.get("params")},
                              len(names), len(labels["classes"]), where)
    return {**labels, "member_names": names, **combiner}


def load_ensemble_bundle(path: str | os.PathLike[str]) -> ExportedEnsemble:
    """Load an ensemble bundle: every file below it checked against the top-level manifest
    (a changed, missing or unlisted file is refused), each member loaded as a bundle of its
    own, and the members' classes, positive class and view checked against ensemble.json."""
    from medtl.transfer.ensemble import _EnsembleOOD

    root = Path(path)
    files = _verified_tree(root)
    where = root / ENSEMBLE_FILE
    try:
        info = json.loads(files[ENSEMBLE_FILE].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MedtlError(f"{where}: not valid JSON ({type(exc).__name__})") from None
    checked = _check_ensemble_info(info, where)
    members = []
    for name in checked["member_names"]:
        folder = root / MEMBERS_DIR / name
        own = _member_files(files, name, folder)
        if TORCHSCRIPT_FILE in own:  # medtl exports ensembles as ONNX only: no code to run
            raise MedtlError(f"{folder / TORCHSCRIPT_FILE}: an ensemble's members are ONNX "
                             "models; refused")
        member = _model_from_files(folder, own)
        if member.multilabel:  # an ensemble combines single-label runs (medtl.ensembles)
            raise MedtlError(f"{folder}: a multi-label member; an ensemble bundle combines "
                             "single-label models; refused")
        if (member.classes, member.positive_class, member.view) != (
                checked["classes"], checked["positive_class"], checked["view"]):
            raise MedtlError(f"{folder}: its classes, positive class or view differ from "
                             f"{where}'s; refused")
        members.append(member)
    oods = [m.ood for m in members]
    # As an ensemble run (medtl.transfer.ensemble.EnsembleModel): a guard only when every
    # member has one.
    ood = None if any(o is None for o in oods) else _EnsembleOOD(oods).record()
    card = _card(files, root)
    return ExportedEnsemble(
        directory=root, members=members, member_names=checked["member_names"],
        method=checked["method"], params=checked["params"], classes=checked["classes"],
        positive_class=checked["positive_class"], operating_points=checked["operating_points"],
        view=checked["view"], info=info, ood=ood, card=card,
        sha256=hashlib.sha256(files[MANIFEST_FILE]).hexdigest())
