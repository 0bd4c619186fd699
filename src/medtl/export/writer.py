"""Export a trained run as a folder that predicts without medtl: ``model.onnx`` (normalised
pixels to calibrated probabilities), ``preprocessing.json`` (how to build those pixels, the
classes, the operating points) and ``manifest.json`` (a sha256 of every file).

One ONNX input contract for every kind of run, the one medtl's own prediction path uses:
``image`` float32 (N, C, S, S), RGB uint8 pixels resized to S, divided by 255, averaged to one
channel for a grey model (C = 1), then ``(x - mean) / std``; normalisation is never inside the
graph, for frozen and network models alike (``Preprocessing.normalise``). The output
``probabilities`` (N, K) is what ``clf.predict_proba`` returns, calibration included: a
softmax over the classes, or for a multi-label model (``model.multilabel``) one sigmoid per
label, rows not summing to 1, with the labels' decision thresholds in preprocessing.json.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtl.data.tta import TTAModel
from medtl.errors import MedtlError
from medtl.export.bundle import OOD_OUTPUT
from medtl.files import fsync_dir
from medtl.run import Run
from medtl.training.features import PooledFeatures
from medtl.transfer.fitted import FeaturesThenHead, FrozenModel, NetworkModel
from medtl.transfer.heads import SklearnHead

PREPROCESSING_FORMAT = 1
OPSET = 17
INPUT = "image"
OUTPUT = "probabilities"
FORMATS = ("onnx", "torchscript")
# medtl's calibration clips probabilities here before the log (training.calibration).
_CLIP = 1e-12


class _Probabilities(nn.Module):
    """Logits to probabilities exactly as FittedModel.calibrate computes them: softmax, then
    with a temperature softmax(log(clip(p)) / T); for a multi-label model one sigmoid per
    label (a softmax would make the labels compete; no temperature: multi-label runs are not
    calibrated)."""

    def __init__(self, module: nn.Module, temperature: float | None,
                 multilabel: bool = False) -> None:
        super().__init__()
        self.module = module
        self.temperature = temperature
        self.multilabel = multilabel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return torch.sigmoid(self.module(x))
        p = torch.softmax(self.module(x), dim=1)
        if self.temperature is None:
            return p
        return torch.softmax(torch.log(p.clamp(_CLIP, 1.0)) / self.temperature, dim=1)


def is_multilabel(model) -> bool:
    """Whether ``model`` (a FittedModel) predicts one independent sigmoid per label."""
    return bool(getattr(model, "multilabel", False))


def _check_multilabel(run: Run, model) -> None:
    """A multi-label run is exported as one only from a model that predicts sigmoids, with no
    temperature (which is a softmax calibration): anything else is an inconsistent run."""
    said = run.config.get("task") == "multilabel"
    if said != is_multilabel(model):
        raise MedtlError(f"{run.path}: config.json says the task is "
                         f"{'multi-label' if said else 'single-label'} but its model is "
                         f"{'multi-label' if is_multilabel(model) else 'single-label'}; refused")
    if said and model.temperature is not None:
        raise MedtlError(f"{run.path}: a multi-label model with a temperature; refused (its "
                         "probabilities are per-label sigmoids, never temperature-scaled)")


def export_run(run: Run, out: str | Path, *, format: str = "onnx",
               overwrite: bool = False) -> Path:
    """Write the deployable bundle of ``run`` into the new folder ``out``; return it.

    ``format``: ``onnx`` (``model.onnx``, every kind of run) or ``torchscript`` (``model.pt``,
    runs whose model is a torch module end to end; loading it needs PyTorch). An ensemble run
    (ONNX only) becomes one bundle per member in ``members/<name>/`` and ``ensemble.json``,
    their combiner, loaded by medtl.export.bundle.load_bundle. Beside the model:
    ``preprocessing.json``, the model card (``model-card.json``, ``model-card.md``) and
    ``manifest.json``. An existing non-empty ``out`` is refused unless ``overwrite``; the bundle
    is written in a temporary sibling and renamed, so ``out`` is never left half written.
    """
    if format not in FORMATS:
        raise MedtlError(f"export format {format!r} is not one of {', '.join(FORMATS)}")
    if run.kind == "ensemble" and run.config.get("task") == "multilabel":
        raise MedtlError(f"{run.path}: a multi-label ensemble is not exported (or served) as "
                         "one bundle yet; export or serve a member (members/NAME), or predict "
                         "and evaluate with the ensemble run itself")
    if run.kind == "ensemble" and format != "onnx":
        raise MedtlError(f"{run.path}: an ensemble is exported with --format onnx only (each "
                         "member becomes a model.onnx of its own, combined without PyTorch)")
    out = Path(out)
    _check_out(out, overwrite)
    # An ensemble's load checks every member's files against the sha256 the ensemble recorded
    clf = run.load_model(quiet=True)
    if run.kind != "ensemble":
        _check_multilabel(run, clf.model_)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.urandom(4).hex()}.tmp")
    tmp.mkdir()
    try:
        if run.kind == "ensemble":
            _write_ensemble(run, clf.model_, tmp)
        else:
            _write_single(run, clf.model_, tmp, format)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out


def _write_single(run: Run, model, folder: Path, format: str) -> None:
    """A run's bundle in the existing folder ``folder``: model, preprocessing.json, model
    card and manifest."""
    from medtl.export.bundle import CARD_JSON, CARD_MD, TORCHSCRIPT_FILE, write_manifest
    from medtl.export.card import card_markdown, model_card

    record = preprocessing_record(run, model)
    if format == "onnx":
        write_onnx(model, folder / "model.onnx")
    elif OOD_OUTPUT not in write_torchscript(model, folder / TORCHSCRIPT_FILE):
        record.pop("ood", None)  # no score in this model: load_bundle would refuse it
    (folder / "preprocessing.json").write_text(json.dumps(record, indent=2) + "\n",
                                               encoding="utf-8")
    card = model_card(run, ood=record.get("ood"))
    (folder / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (folder / CARD_MD).write_text(card_markdown(card), encoding="utf-8")
    write_manifest(folder)


def _write_ensemble(run: Run, model, folder: Path) -> None:
    """An ensemble run's bundle in ``folder``: each member's own bundle (ONNX) in
    members/<name>/, ensemble.json (the combiner, classes, operating points chosen on the
    ensemble's validation), the ensemble's model card, and a manifest of every file."""
    import medtl
    from medtl.export.bundle import (
        BUNDLE_FORMAT,
        CARD_JSON,
        CARD_MD,
        ENSEMBLE_FILE,
        MEMBERS_DIR,
        write_tree_manifest,
    )
    from medtl.export.card import card_markdown, model_card
    from medtl.run import MEMBERS

    cfg = run.config
    records = cfg["members"]
    for record, member in zip(records, model.members, strict=True):
        dest = folder / MEMBERS_DIR / record["name"]
        dest.mkdir(parents=True)
        _write_single(Run(run.path / MEMBERS / record["name"]), member.model_, dest, "onnx")
    thresholds = run.metrics.get("thresholds") or {}
    ood = None if model.ood is None else model.ood.record()
    info = {
        "format": BUNDLE_FORMAT, "kind": "ensemble", "method": model.method,
        "params": model.params,
        "combined": "the members' calibrated probabilities, combined as the ensemble run "
                    "combines them (medtl.transfer.ensemble.combine)",
        "members": [{"name": r["name"], "backbone": r.get("backbone"),
                     "strategy": r.get("strategy"), "head": r.get("head"),
                     "input": m.model_.preprocessing.to_dict()}
                    for r, m in zip(records, model.members, strict=True)],
        "classes": list(model.classes), "positive_class": cfg.get("positive_class"),
        "operating_points": {k: v for k, v in thresholds.items()
                             if k not in ("chosen_on", "target_sensitivity")},
        "operating_points_chosen_on": thresholds.get("chosen_on"),
        "view": cfg.get("view") or {}, "ood": ood,
        "medtl_version": medtl.__version__,
        "run": {k: cfg.get(k) for k in ("backbone", "strategy", "head", "method")}}
    (folder / ENSEMBLE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    card = model_card(run, ood=ood)
    (folder / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (folder / CARD_MD).write_text(card_markdown(card), encoding="utf-8")
    write_tree_manifest(folder)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_symlink():  # --overwrite would replace the link's target, not the link
        raise MedtlError(f"{out}: is a symbolic link; give the bundle folder itself")
    if out.exists() and not out.is_dir():
        raise MedtlError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MedtlError(f"{out}: folder exists and is not empty (pass --overwrite to replace)")


def write_torchscript(model, path: Path) -> tuple[str, ...]:
    """The model's normalised pixels -> calibrated probabilities as a traced TorchScript module
    (the module write_onnx exports), saved with its input and output names (``medtl.json``
    inside the archive, so the manifest's sha256 covers them); return the output names.

    A scikit-learn head other than logistic regression has no torch form: refused."""
    from medtl.export.bundle import TORCHSCRIPT_META

    module, outputs = _torchscript_module(model)
    pre = model.preprocessing
    dummy = torch.zeros(1, pre.channels, pre.size, pre.size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values made constants
        traced = torch.jit.trace(module.cpu().eval(), dummy, check_trace=False)
    meta = {"format": 1, "input": INPUT, "outputs": list(outputs),
            "shape": [None, pre.channels, pre.size, pre.size]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates torch.jit
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_META: json.dumps(meta)})
    return outputs


def _torchscript_module(model) -> tuple[nn.Module, tuple[str, ...]]:
    """The torch module to trace and its output names: calibrated probabilities (and the OOD
    score as a second output where the model has a detector with a torch form)."""
    logits = model.torch_module() if isinstance(model, FrozenModel | NetworkModel) else None
    if logits is None:
        head = getattr(getattr(model, "head", None), "head", type(model).__name__)
        raise MedtlError(f"the {head!r} head is a scikit-learn model and has no TorchScript "
                         "form; export it with --format onnx")
    if (tta := _tta_module(model, logits)) is not None:
        return tta, ((OUTPUT,) if model.ood is None else (OUTPUT, OOD_OUTPUT))
    if getattr(model, "ood", None) is None:
        return _Probabilities(logits, model.temperature, is_multilabel(model)), (OUTPUT,)
    # The OOD score from the same pooled features, as write_onnx builds it
    if isinstance(model, NetworkModel):
        features, head = PooledFeatures(model.network), model.network.classifier
    else:
        features, head = PooledFeatures(model.backbone), logits.head
    return (_WithOod(features, head.eval(), model.temperature, model.ood,
                     is_multilabel(model)), (OUTPUT, OOD_OUTPUT))


def preprocessing_record(run: Run, model) -> dict[str, Any]:
    """What a deployment needs besides the graph (preprocessing.json, format 1)."""
    import medtl

    cfg, metrics = run.config, run.metrics
    thresholds = metrics.get("thresholds") or {}
    multilabel = is_multilabel(model)
    return {
        "format": PREPROCESSING_FORMAT,
        **model.preprocessing.to_dict(),
        "view": cfg.get("view"),
        "classes": list(model.classes),
        # Only a multi-label bundle says its task: a single-label one stays as it was
        **({"task": "multilabel",
            "thresholds": _label_thresholds(thresholds, model.classes)} if multilabel else {}),
        "positive_class": cfg.get("positive_class"),
        # choose_thresholds records its thresholds beside what they were chosen for; a
        # multi-label run's are per label ("thresholds" above), not operating points
        "operating_points": {} if multilabel else {
            k: v for k, v in thresholds.items() if k not in ("chosen_on", "target_sensitivity")},
        "temperature": model.temperature,
        "input": {"name": INPUT, "layout": "NCHW", "dtype": "float32",
                  "channels": model.preprocessing.channels,
                  "scale": "pixels / 255 then (x - mean) / std"
                           + (" (grey: RGB averaged first)" if model.preprocessing.channels == 1
                              else "")},
        "output": {"name": OUTPUT, **({"probabilities": "one sigmoid per label, in the order "
                                                         "of classes (rows do not sum to 1)"}
                                      if multilabel else {})},
        "medtl_version": medtl.__version__,
        "run": {k: cfg.get(k) for k in ("backbone", "strategy", "head", "weights")},
        # The graph's OOD_OUTPUT is flagged above this threshold (None: no detector, no output)
        "ood": None if model.ood is None else model.ood.record(),
        "tta": _tta_record(model),
    }


def _label_thresholds(thresholds: dict[str, Any], labels: list[str]) -> dict[str, Any] | None:
    """A multi-label run's decision thresholds as metrics.json records them (what they were
    chosen on and by which rule, then one per label), or None when the run recorded none."""
    if not any(label in thresholds for label in labels):
        return None
    missing = [label for label in labels if label not in thresholds]
    if missing:
        raise MedtlError(f"metrics.json: no decision threshold for the label(s) "
                         f"{', '.join(missing)}; refused")
    # What they were chosen on, by which rule, and the labels that fell back to 0.5
    # (medtl.evaluation.multilabel.label_thresholds)
    return {**{k: thresholds[k] for k in ("chosen_on", "rule", "fallback")
               if k in thresholds and k not in labels},
            **{label: float(thresholds[label]) for label in labels}}


def _tta_record(model) -> dict[str, Any]:
    """preprocessing.json's "tta": what the graph does inside (it averages the views itself;
    a client sends the one image, normalised as ``input`` says)."""
    views = model.tta_views()
    return {"mode": model.tta,
            "views": ["identity"] if views is None else list(views.names),
            "averaged": ("sigmoid probabilities of the views, per label" if is_multilabel(model)
                         else "softmax probabilities of the views, before the temperature"),
            "ood_from": "identity"}


class _TtaOutputs(nn.Module):
    """medtl.data.tta's TTAModel (views, pooled features, head, mean of the views' softmax;
    :class:`_SigmoidTTA` for a multi-label model: of the views' sigmoids), then the
    temperature as FittedModel.calibrate applies it to that mean, and, with a detector, the
    unaugmented view's Mahalanobis distance."""

    def __init__(self, tta: nn.Module, temperature: float | None, detector) -> None:
        super().__init__()
        self.tta = tta
        self.temperature = temperature
        self.with_ood = detector is not None
        if detector is not None:
            self.register_buffer("location", torch.from_numpy(detector.location_.copy()))
            self.register_buffer("whitener", torch.from_numpy(detector.whitener_.copy()))

    def forward(self, x: torch.Tensor):
        p, f = self.tta(x)
        if self.temperature is not None:
            p = torch.softmax(torch.log(p.clamp(_CLIP, 1.0)) / self.temperature, dim=1)
        if not self.with_ood:
            return p
        z = (f - self.location) @ self.whitener
        return p, torch.sqrt((z * z).sum(dim=1))


def _tta_module(model, head_module: nn.Module | None) -> nn.Module | None:
    """The whole TTA model as one torch module (None with TTA off, or no torch head)."""
    views = model.tta_views()
    if views is None or head_module is None:
        return None
    if isinstance(model, NetworkModel):
        features, head = PooledFeatures(model.network), model.network.classifier
    else:
        features, head = PooledFeatures(model.backbone), head_module.head
    kind = _SigmoidTTA if is_multilabel(model) else TTAModel
    return _TtaOutputs(kind(views.cpu(), features, head.eval()), model.temperature,
                       model.ood).eval()


class _SigmoidTTA(TTAModel):
    """TTAModel for a multi-label model: the mean over the views of each label's sigmoid (as
    FittedModel's TTA averages a multi-label model's per-view probabilities)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.views.n_views
        f = self.features(self.views(x))
        p = torch.sigmoid(self.head(f).float())
        p = p.reshape(v, -1, p.shape[1]).mean(dim=0)
        return p, f.reshape(v, -1, f.shape[1])[0]


def write_onnx(model, path: Path) -> Path:
    """The model's normalised pixels -> calibrated probabilities as one ONNX graph, and, when
    the model has an out-of-distribution detector, its Mahalanobis distance as a second output
    (bundle.OOD_OUTPUT) computed in the graph from the same pooled features."""
    if isinstance(model, NetworkModel):
        features, head = PooledFeatures(model.network), model.network.classifier
    elif isinstance(model, FrozenModel):
        features, head = PooledFeatures(model.backbone), model.head
        if isinstance(head, SklearnHead):
            head = head.as_linear()
            if head is None:
                return _sklearn_to_onnx(model, path)
    else:
        raise MedtlError(f"cannot export a {type(model).__name__}")
    if model.tta != "none":  # the views and their mean inside the graph (medtl.data.tta)
        module = _tta_module(model, FeaturesThenHead(features.backbone, head.eval()))
        return _torch_to_onnx(module, model, path,
                              outputs=(OUTPUT,) if model.ood is None else (OUTPUT, OOD_OUTPUT))
    if model.ood is None:  # a run saved before the guard: probabilities alone
        module = FeaturesThenHead(features.backbone, head.eval())
        return _torch_to_onnx(_Probabilities(module, model.temperature, is_multilabel(model)),
                              model, path)
    return _torch_to_onnx(_WithOod(features, head.eval(), model.temperature, model.ood,
                                   is_multilabel(model)),
                          model, path, outputs=(OUTPUT, OOD_OUTPUT))


class _WithOod(nn.Module):
    """Pooled features once, then the calibrated probabilities of the head and the features'
    Mahalanobis distance ``||(f - location) @ whitener||`` (medtl.transfer.ood)."""

    def __init__(self, features: nn.Module, head: nn.Module, temperature: float | None,
                 detector, multilabel: bool = False) -> None:
        super().__init__()
        self.features = features
        self.probabilities = _Probabilities(head, temperature, multilabel)
        self.register_buffer("location", torch.from_numpy(detector.location_.copy()))
        self.register_buffer("whitener", torch.from_numpy(detector.whitener_.copy()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        z = (f - self.location) @ self.whitener
        return self.probabilities(f), torch.sqrt((z * z).sum(dim=1))


def _torch_to_onnx(module: nn.Module, model, path: Path,
                   outputs: tuple[str, ...] = (OUTPUT,)) -> Path:
    pre = model.preprocessing
    dummy = torch.zeros(1, pre.channels, pre.size, pre.size)
    # The TorchScript-based exporter, as training/features.py: dynamo needs onnxscript.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (dummy,), str(path), dynamo=False,
                          input_names=[INPUT], output_names=list(outputs),
                          dynamic_axes={INPUT: {0: "batch"},
                                        **{name: {0: "batch"} for name in outputs}},
                          opset_version=OPSET)
    return path


def _sklearn_to_onnx(model: FrozenModel, path: Path) -> Path:
    """Backbone features (torch export) joined to the scikit-learn head (skl2onnx)."""
    import onnx
    from onnx import compose, helper

    feats_path = path.with_name("features.onnx")
    views = model.tta_views()
    # With TTA the features are those of every view, stacked view-major (V * N rows)
    feats_module = (PooledFeatures(model.backbone) if views is None
                    else nn.Sequential(views.cpu(), PooledFeatures(model.backbone)))
    _torch_to_onnx(feats_module, model, feats_path, outputs=("features",))
    features = onnx.load(str(feats_path))
    feats_path.unlink()
    dim = int(model.backbone.num_features)
    head = (_multilabel_sklearn_graph(model.head, dim) if is_multilabel(model)
            else _sklearn_graph(model.head, dim))
    head.ir_version = features.ir_version  # merge_models wants one IR version
    head = compose.add_prefix(head, prefix="head_")
    merged = compose.merge_models(features, head, io_map=[("features", "head_features")])
    graph = merged.graph
    proba = next(o.name for o in graph.output if o.name.endswith("probabilities"))
    ood_features = "features"
    if views is not None:
        proba, ood_features = _tta_mean_nodes(graph, proba, views.n_views, len(model.classes),
                                              int(model.backbone.num_features))
    nodes = [helper.make_node("Identity", [proba], [OUTPUT])]
    if model.temperature is not None:
        t = float(model.temperature)
        graph.initializer.extend([helper.make_tensor("calib_lo", onnx.TensorProto.FLOAT, [],
                                                     [_CLIP]),
                                  helper.make_tensor("calib_hi", onnx.TensorProto.FLOAT, [],
                                                     [1.0]),
                                  helper.make_tensor("calib_t", onnx.TensorProto.FLOAT, [],
                                                     [t])])
        nodes = [helper.make_node("Clip", [proba, "calib_lo", "calib_hi"], ["calib_p"]),
                 helper.make_node("Log", ["calib_p"], ["calib_log"]),
                 helper.make_node("Div", ["calib_log", "calib_t"], ["calib_z"]),
                 helper.make_node("Softmax", ["calib_z"], [OUTPUT], axis=1)]
    graph.node.extend(nodes)
    outputs = [helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, ["batch", None])]
    if model.ood is not None:
        outputs.append(_ood_nodes(graph, model.ood, ood_features))
    del graph.output[:]
    graph.output.extend(outputs)
    onnx.checker.check_model(merged)
    onnx.save(merged, str(path))
    return path


def _tta_mean_nodes(graph, proba: str, n_views: int, k: int, dim: int) -> tuple[str, str]:
    """Append to ``graph`` the mean over the views of the head's (V * N, K) probabilities
    ``proba`` and the unaugmented view's rows of ``features``; return the two tensor names."""
    from onnx import helper, numpy_helper

    graph.initializer.extend([
        numpy_helper.from_array(np.array([n_views, -1, k], np.int64), "tta_shape_p"),
        numpy_helper.from_array(np.array([n_views, -1, dim], np.int64), "tta_shape_f"),
        numpy_helper.from_array(np.array(0, np.int64), "tta_first")])
    graph.node.extend([
        helper.make_node("Reshape", [proba, "tta_shape_p"], ["tta_p3"]),
        helper.make_node("ReduceMean", ["tta_p3"], ["tta_probabilities"], axes=[0], keepdims=0),
        helper.make_node("Reshape", ["features", "tta_shape_f"], ["tta_f3"]),
        helper.make_node("Gather", ["tta_f3", "tta_first"], ["tta_features"], axis=0)])
    return "tta_probabilities", "tta_features"


def _ood_nodes(graph, detector, features: str = "features"):
    """Append to ``graph`` the Mahalanobis distance of its ``features`` tensor as OOD_OUTPUT
    (Sub location, MatMul whitener, ReduceSumSquare, Sqrt); return that output's info."""
    import onnx
    from onnx import helper, numpy_helper

    graph.initializer.extend([numpy_helper.from_array(detector.location_, "ood_location"),
                              numpy_helper.from_array(detector.whitener_, "ood_whitener")])
    graph.node.extend([
        helper.make_node("Sub", [features, "ood_location"], ["ood_centred"]),
        helper.make_node("MatMul", ["ood_centred", "ood_whitener"], ["ood_z"]),
        helper.make_node("ReduceSumSquare", ["ood_z"], ["ood_d2"], axes=[1], keepdims=0),
        helper.make_node("Sqrt", ["ood_d2"], [OOD_OUTPUT])])
    return helper.make_tensor_value_info(OOD_OUTPUT, onnx.TensorProto.FLOAT, ["batch"])


def _multilabel_sklearn_graph(head: SklearnHead, dim: int):
    """A one-vs-rest head (heads.MaskedOneVsRest) as ONNX: each label's binary estimator as
    :func:`_sklearn_graph` converts it, on the shared ``features``; the column of class 1 of
    each, side by side -> ``probabilities`` (N, K), as MaskedOneVsRest.predict_proba."""
    import onnx
    from onnx import compose, helper, numpy_helper

    nodes, inits, columns, opsets = [], [], [], {}
    for k, est in enumerate(head.estimator_.estimators_):
        part = compose.add_prefix(_sklearn_graph(head, dim, est), prefix=f"l{k}_")
        g = part.graph
        # One input for every label: the prefixed copies read the shared features.
        for node in g.node:
            node.input[:] = ["features" if i == f"l{k}_features" else i for i in node.input]
        proba = next(o.name for o in g.output if o.name.endswith("probabilities"))
        positive = list(est.classes_).index(1)
        inits.extend(g.initializer)
        inits.append(numpy_helper.from_array(np.array([positive], np.int64), f"l{k}_col"))
        nodes.extend(g.node)
        nodes.append(helper.make_node("Gather", [proba, f"l{k}_col"], [f"l{k}_present"],
                                      axis=1))
        columns.append(f"l{k}_present")
        for o in part.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    nodes.append(helper.make_node("Concat", columns, ["probabilities"], axis=1))
    f32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "multilabel_head", [helper.make_tensor_value_info("features", f32, [None, dim])],
        [helper.make_tensor_value_info("probabilities", f32, [None, len(columns)])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                   for d, v in opsets.items()])


def _sklearn_graph(head: SklearnHead, dim: int, est=None):
    """The fitted estimator (``head``'s, or ``est``, one label's of a one-vs-rest head) as
    ONNX: ``features`` (N, dim) float32 -> ``probabilities``."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.neighbors import KNeighborsClassifier

    est = head.estimator_ if est is None else est
    inputs = [("features", FloatTensorType([None, dim]))]
    opset = {"": OPSET, "ai.onnx.ml": 3}
    try:
        if isinstance(est, CalibratedClassifierCV):
            return _platt_svm_graph(est, inputs, opset)
        if isinstance(est[-1], KNeighborsClassifier):
            return _knn_graph(est)
        return to_onnx(est, initial_types=inputs, options={"zipmap": False},
                       target_opset=opset)
    except MedtlError:
        raise
    except Exception as exc:  # skl2onnx raises many kinds for an unsupported model
        raise MedtlError(f"cannot export the {head.head!r} head ({type(est).__name__}) to "
                         f"ONNX: {exc}") from exc


def _platt_svm_graph(cal, inputs, opset):
    """The SVM head: SVC decision values (skl2onnx) then medtl's Platt scaling as ONNX nodes.

    skl2onnx's own CalibratedClassifierCV converter gives wrong probabilities for a binary SVC
    (the decision value's sign is flipped; seen with skl2onnx 1.20), and has no converter for
    the FrozenEstimator the head wraps its pipeline in; so the sigmoid calibration, averaged
    over the calibrated folds as ``CalibratedClassifierCV.predict_proba`` does, is built here
    (for more than two classes: one sigmoid per class on its one-vs-rest decision value, then
    each row divided by its sum, :func:`_platt_multiclass_nodes`).
    """
    import onnx
    from onnx import helper
    from skl2onnx import to_onnx
    from sklearn.svm import SVC

    pipelines = {id(c.estimator): getattr(c.estimator, "estimator", c.estimator)
                 for c in cal.calibrated_classifiers_}
    if len(pipelines) != 1:
        raise MedtlError("cannot export an SVM head calibrated over several fitted SVMs")
    pipeline = next(iter(pipelines.values()))
    model = to_onnx(pipeline, initial_types=inputs, target_opset=opset,
                    options={SVC: {"raw_scores": True, "zipmap": False}})
    graph = model.graph
    scores = next(o.name for o in graph.output if o.name != "label")
    f32 = onnx.TensorProto.FLOAT
    if len(cal.classes_) > 2:
        _platt_multiclass_nodes(graph, cal, scores, pipeline[-1].classes_)
        return model
    consts = {"svm_one": [1.0], "svm_n": [float(len(cal.calibrated_classifiers_))]}
    nodes = [helper.make_node("Slice", [scores, "svm_c1", "svm_c2", "svm_axis"], ["svm_f"])]
    parts = []
    for i, c in enumerate(cal.calibrated_classifiers_):
        (sig,) = c.calibrators
        consts[f"svm_a{i}"], consts[f"svm_b{i}"] = [-float(sig.a_)], [-float(sig.b_)]
        nodes += [helper.make_node("Mul", ["svm_f", f"svm_a{i}"], [f"svm_af{i}"]),
                  helper.make_node("Add", [f"svm_af{i}", f"svm_b{i}"], [f"svm_z{i}"]),
                  helper.make_node("Sigmoid", [f"svm_z{i}"], [f"svm_q{i}"])]
        parts.append(f"svm_q{i}")
    nodes += [helper.make_node("Sum", parts, ["svm_sum"]),
              helper.make_node("Div", ["svm_sum", "svm_n"], ["svm_p1"]),
              helper.make_node("Sub", ["svm_one", "svm_p1"], ["svm_p0"]),
              helper.make_node("Concat", ["svm_p0", "svm_p1"], ["svm_probabilities"], axis=1)]
    graph.initializer.extend([helper.make_tensor(k, f32, [], v) for k, v in consts.items()])
    graph.initializer.extend([helper.make_tensor(k, onnx.TensorProto.INT64, [1], [v])
                              for k, v in (("svm_c1", 1), ("svm_c2", 2), ("svm_axis", 1))])
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("svm_probabilities", f32, [None, 2])])
    return model


def _platt_multiclass_nodes(graph, cal, scores: str, svm_classes) -> None:
    """Append to ``graph`` the Platt scaling of K > 2 one-vs-rest decision values ``scores``
    (N, K), as ``_CalibratedClassifier.predict_proba`` computes it: ``sigmoid(-(a_k s_k +
    b_k))`` per class, each row divided by its sum (uniform where the sum is 0), averaged over
    the calibrated folds; output ``svm_probabilities`` (N, K)."""
    import onnx
    from onnx import helper, numpy_helper

    k = len(cal.classes_)
    if list(np.searchsorted(cal.classes_, svm_classes)) != list(range(k)):
        raise MedtlError("cannot export this SVM head to ONNX: its SVM does not score every "
                         "class in order")
    n = helper.make_node
    inits = {"svm_one": np.array([1.0 / k], np.float32), "svm_zero": np.array(0, np.float32),
             "svm_n": np.array(len(cal.calibrated_classifiers_), np.float32),
             "svm_ax1": np.array([1], np.int64)}
    nodes, parts = [], []
    for i, c in enumerate(cal.calibrated_classifiers_):
        inits[f"svm_a{i}"] = np.array([-float(s.a_) for s in c.calibrators], np.float32)
        inits[f"svm_b{i}"] = np.array([-float(s.b_) for s in c.calibrators], np.float32)
        nodes += [n("Mul", [scores, f"svm_a{i}"], [f"svm_af{i}"]),
                  n("Add", [f"svm_af{i}", f"svm_b{i}"], [f"svm_z{i}"]),
                  n("Sigmoid", [f"svm_z{i}"], [f"svm_q{i}"]),
                  n("ReduceSum", [f"svm_q{i}", "svm_ax1"], [f"svm_den{i}"], keepdims=1),
                  n("Equal", [f"svm_den{i}", "svm_zero"], [f"svm_is0{i}"]),
                  n("Div", [f"svm_q{i}", f"svm_den{i}"], [f"svm_r{i}"]),
                  n("Where", [f"svm_is0{i}", "svm_one", f"svm_r{i}"], [f"svm_p{i}"])]
        parts.append(f"svm_p{i}")
    nodes += [n("Sum", parts, ["svm_sum"]),
              n("Div", ["svm_sum", "svm_n"], ["svm_probabilities"])]
    graph.initializer.extend([numpy_helper.from_array(v, name) for name, v in inits.items()])
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("svm_probabilities",
                                                       onnx.TensorProto.FLOAT, [None, k])])


def _knn_graph(pipeline):
    """The kNN head (``Normalizer -> KNeighborsClassifier(weights="distance")``) as ONNX nodes.

    skl2onnx's converter ignores distance weights in its probabilities (uniform votes; seen
    with skl2onnx 1.20), so the vote is built here: Euclidean distances to every training
    feature, the k nearest, weights 1/d (only the exact matches when a distance is 0, as
    scikit-learn does), summed per class and normalised.
    """
    import onnx
    from onnx import helper, numpy_helper
    from sklearn.preprocessing import Normalizer

    norm, knn = pipeline.steps[0][1], pipeline.steps[-1][1]
    if (len(pipeline.steps) != 2 or not isinstance(norm, Normalizer) or norm.norm != "l2"
            or knn.weights != "distance" or knn.effective_metric_ != "euclidean"):
        raise MedtlError("cannot export this kNN head to ONNX: only the built-in "
                         "Normalizer -> distance-weighted Euclidean kNN is converted")
    k, f32 = int(knn.n_neighbors), onnx.TensorProto.FLOAT
    onehot = np.eye(len(knn.classes_), dtype=np.float32)[knn._y]
    inits = [numpy_helper.from_array(np.asarray(knn._fit_X, np.float32), "knn_X"),
             numpy_helper.from_array(onehot, "knn_Y"),
             numpy_helper.from_array(np.array([k], np.int64), "knn_k"),
             numpy_helper.from_array(np.array([1], np.int64), "knn_ax1"),
             numpy_helper.from_array(np.array([2], np.int64), "knn_ax2"),
             numpy_helper.from_array(np.array(0, np.float32), "knn_zero")]
    n = helper.make_node
    nodes = [n("ReduceL2", ["features"], ["knn_l2"], axes=[1], keepdims=1),
             n("Div", ["features", "knn_l2"], ["knn_x"]),
             n("Unsqueeze", ["knn_x", "knn_ax1"], ["knn_x3"]),
             n("Sub", ["knn_x3", "knn_X"], ["knn_diff"]),
             n("ReduceSumSquare", ["knn_diff"], ["knn_d2"], axes=[2], keepdims=0),
             n("Sqrt", ["knn_d2"], ["knn_d"]),
             n("TopK", ["knn_d", "knn_k"], ["knn_dk", "knn_ik"], axis=1, largest=0),
             n("Equal", ["knn_dk", "knn_zero"], ["knn_is0"]),
             n("Cast", ["knn_is0"], ["knn_w0"], to=f32),
             n("ReduceMax", ["knn_w0"], ["knn_any0"], axes=[1], keepdims=1),
             n("Cast", ["knn_any0"], ["knn_anyb"], to=onnx.TensorProto.BOOL),
             n("Reciprocal", ["knn_dk"], ["knn_inv"]),
             n("Where", ["knn_anyb", "knn_w0", "knn_inv"], ["knn_w"]),
             n("Gather", ["knn_Y", "knn_ik"], ["knn_votes"], axis=0),
             n("Unsqueeze", ["knn_w", "knn_ax2"], ["knn_w3"]),
             n("Mul", ["knn_votes", "knn_w3"], ["knn_wv"]),
             n("ReduceSum", ["knn_wv", "knn_ax1"], ["knn_sum"], keepdims=0),
             n("ReduceSum", ["knn_sum", "knn_ax1"], ["knn_total"], keepdims=1),
             n("Div", ["knn_sum", "knn_total"], ["knn_probabilities"])]
    graph = helper.make_graph(
        nodes, "knn_head",
        [helper.make_tensor_value_info("features", f32, [None, knn.n_features_in_])],
        [helper.make_tensor_value_info("knn_probabilities", f32, [None, len(knn.classes_)])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


__all__ = ["export_run", "is_multilabel", "preprocessing_record", "write_onnx"]
