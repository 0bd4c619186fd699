"""The jobs behind the CLI, one function each: train, evaluate, predict, demo.

The CLI only parses options and prints; everything it does is callable from Python.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medtl import run as bundle
from medtl.console import run_logging
from medtl.errors import MedtlError
from medtl.evaluation.stats import brier_score, expected_calibration_error
from medtl.evaluation.summary import DEFAULT_TARGET_SENSITIVITY, choose_thresholds, split_summary
from medtl.run import Run, load_run, prediction_rows, write_csv, write_json
from medtl.training import distributed
from medtl.training.options import TrainOptions

log = logging.getLogger("medtl")


def _throughput(model, data, n: int = 64) -> float | None:
    """Images per second for the whole prediction path (decode, backbone, head), uncached."""
    if len(data) == 0:
        return None
    subset = data.subset(range(min(n, len(data))))
    t0 = time.perf_counter()
    model.predict_proba(subset, cache=False)
    return len(subset) / (time.perf_counter() - t0)


def _split_metrics(clf, data, split: str, positive: int | None, *,
                   thresholds: dict[str, Any] | None = None, seed: int = 0):
    """The metrics.json entry of one split, its predictions.csv rows and probabilities."""
    if data.multilabel:
        return _multilabel_split_metrics(clf, data, split, thresholds=thresholds, seed=seed)
    raw = clf.predict_proba(data, calibrated=False)
    proba = clf.model_.calibrate(raw)
    ok = np.isfinite(proba).all(axis=1)
    metrics = split_summary(data.labels[ok], proba[ok], classes=clf.classes_, positive=positive,
                            patients=[q for q, keep in zip(data.patients, ok, strict=True)
                                      if keep],
                            volumes=([v for v, keep in zip(data.volumes, ok, strict=True)
                                      if keep] if any(data.volumes) else None),
                            thresholds=thresholds, seed=seed)
    if clf.model_.temperature is not None and ok.any():
        metrics["calibration"]["ece_uncalibrated"] = expected_calibration_error(
            data.labels[ok], raw[ok])
        metrics["calibration"]["brier_uncalibrated"] = brier_score(data.labels[ok], raw[ok])
    rows = prediction_rows(data.records, data.labels, proba, clf.classes_, split)
    return metrics, rows, proba


def train(
    data: str | Path,
    options: TrainOptions | None = None,
    *,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    patient_regex: str | None = None,
    val_fraction: float = 0.2,
    window: str = "auto",
    slices: str = "middle",
    mode: str = "2d",
    folds: int | None = None,
    positive_class: str | None = None,
    paths: str = "relative",
    labels: Sequence[str] | None = None,
    uncertain: str = "ignore",
    blank: str = "unknown",
    **option_values: Any,
) -> Run:
    """Load DATA, fit a TransferClassifier, score val and test, write a run directory.

    ``options`` (a :class:`TrainOptions`) and ``option_values`` (its fields as keywords, which
    win) say how to train; the other arguments say what data and where. With ``folds``: K-fold
    cross-validation over train + val instead (see _cross_validate). ``positive_class``: the
    class that sensitivity, specificity, operating points and ROC refer to in a binary task
    (default: the last class in name order, with a warning when its name reads as a negative
    finding). ``resume`` refuses any change of request or data (:func:`_guard_resume`).
    ``paths``: how the data's paths appear in what the run writes (relative to the data root,
    hashed, absolute: medtl.data.privacy.PathDisplay). ``labels``, ``uncertain``, ``blank``:
    which columns of a multi-label manifest are the labels and what -1 and blank mean
    (medtl.data.load_dataset).
    """
    from medtl.transfer.estimator import TransferClassifier

    options = (options or TrainOptions()).replace(**option_values)
    clf = TransferClassifier.from_options(options)
    strategy = clf.make_strategy()  # option mistakes before any slow work
    if distributed.requested():
        check_distributable(strategy, folds)
    _check_weights_run(options)
    if not 0.0 < target_sensitivity <= 1.0:
        raise MedtlError(f"--target-sensitivity {target_sensitivity}: must lie in (0, 1]")
    if folds is not None and folds < 2:
        raise MedtlError(f"--folds {folds}: cross-validation needs at least 2 folds")
    out = Path(out or Path("runs") / f"{Path(str(data)).stem}-{options.backbone}-"
                                     f"{options.strategy}")
    # What the run reads and how it scores; how it trains is ``options``.
    request = {"data": data, "patient_regex": patient_regex, "val_fraction": val_fraction,
               "target_sensitivity": target_sensitivity, "positive_class": positive_class,
               "folds": folds, "view": {"window": window, "slices": slices, "mode": mode},
               "paths": paths, "display": _path_display(paths, data, out),
               "load": _load_options(labels, uncertain, blank)}
    t_start = time.perf_counter()
    if distributed.requested():
        return _train_distributed(clf, request, options, out, overwrite=overwrite,
                                  resume=resume, t_start=t_start)
    return _train_here(clf, request, options, out, overwrite=overwrite, resume=resume,
                       t_start=t_start)


def _multilabel_split_metrics(clf, data, split: str, *, thresholds: dict[str, Any] | None,
                              seed: int, proba: np.ndarray | None = None):
    """_split_metrics of a multi-label split: per-label figures at the labels' thresholds
    (chosen on val; 0.5 where none were chosen). ``proba``: already predicted."""
    from medtl.evaluation.multilabel import multilabel_summary
    from medtl.run import multilabel_prediction_rows

    if proba is None:
        proba = clf.predict_proba(data)
    ok = np.isfinite(proba).all(axis=1)
    metrics = multilabel_summary(data.labels[ok], proba[ok], clf.classes_, thresholds,
                                 seed=seed)
    rows = multilabel_prediction_rows(data.records, data.labels, proba, clf.classes_,
                                      thresholds, split)
    return metrics, rows, proba


def _train_here(clf, request: dict[str, Any], options: TrainOptions, out: Path, *,
                overwrite: bool, resume: bool, t_start: float) -> Run:
    """train() in the process that writes the run (the only one, or DDP's rank 0)."""
    folds = request["folds"]
    # The run is written beside ``out`` and takes its place only when complete (medtl.run).
    with bundle.writing_run(out, overwrite=overwrite, resume=resume) as draft, \
            run_logging(draft.path, options.quiet, append=resume,
                        rewrite=request["display"].scrub):
        ds = _load(request, options)
        request["positive"] = _positive_of(ds, request["positive_class"])
        _guard_resume(draft, options, request, ds, resume=resume)  # before any training
        request["split_overlap"] = _split_overlap(ds)
        if folds is not None:
            _cross_validate(clf, ds, folds, draft.path, request, resume=resume)
        else:
            _fit_and_write(clf, ds, draft.path, request, resume=resume, t_start=t_start)
        (draft.path / bundle.REQUEST).unlink(missing_ok=True)  # served --resume only
        draft.commit()
        log.info("run written to %s", out)
    return Run(out)


def check_distributable(strategy, folds: int | None) -> None:
    """What DDP cannot train, refused under torchrun and before ``--devices N`` starts it."""
    from medtl.transfer.strategies import NetworkStrategy

    if not isinstance(strategy, NetworkStrategy):
        raise MedtlError(f"--strategy {strategy.name} trains no network (frozen features and a "
                         "head take seconds on one process): run it without --devices")
    if folds is not None:
        raise MedtlError("--folds with several processes: run without --devices, or one run "
                         "per fold")
    if strategy.options.align != "none":
        raise MedtlError(f"--align {strategy.options.align} with several processes is not "
                         "supported: run without --devices")


def _train_distributed(clf, request: dict[str, Any], options: TrainOptions, out: Path, *,
                       overwrite: bool, resume: bool, t_start: float) -> Run:
    """One process of a DDP run (medtl.training.distributed): rank 0 writes the run as one
    process would; the others read the same data, train in step with it (reading its
    checkpoints on --resume) and write nothing. Every process returns the finished run."""
    from medtl.training.options import resolve_device

    group = distributed.join(resolve_device(options.device))
    try:
        if group.is_main:
            request["config_extra"] = {"distributed": {
                "processes": group.world_size, "backend": group.backend,
                "sync_bn": options.sync_bn}}
            _train_here(clf, request, options, out, overwrite=overwrite, resume=resume,
                        t_start=t_start)
        else:
            ds = _load(request, options)
            clf.fit(ds.split("train"), ds.split("val"), resume=resume,
                    checkpoint_dir=bundle.partial_dir(out) / bundle.CHECKPOINTS)
        distributed.barrier()  # the others return once rank 0 has written the run
        return Run(out)
    finally:
        distributed.leave()


def _check_weights_run(options: TrainOptions) -> None:
    """``--weights RUN_DIR``: the whole run checked (load_run: a shared run is untrusted
    input), and its backbone read once (medtl.models.run_weights: same backbone, every tensor
    fits), before any slow work or anything written."""
    from medtl.models import get_spec
    from medtl.models.run_weights import is_run_dir, resolve_run_weights

    if is_run_dir(options.weights):
        load_run(options.weights)
        resolve_run_weights(get_spec(options.backbone), options.weights)


def _path_display(paths: str, data: str | Path, out: Path):
    """How the run writes the data's paths (``--paths``); its own folder (and its draft) and
    the cache folder appear in its log by name, not by where they are on this machine."""
    from medtl.data.privacy import PathDisplay
    from medtl.files import cache_root

    return PathDisplay.for_source(paths, data, aliases={
        out: out.name, bundle.partial_dir(out): out.name, cache_root(): "medtl-cache"})


def _load_options(labels: Sequence[str] | None, uncertain: str, blank: str) -> dict[str, Any]:
    """How a multi-label manifest is read, as load_dataset's keywords; empty when they are
    the defaults, so that a single-label run records nothing new."""
    out: dict[str, Any] = {}
    if labels:
        out["labels"] = list(labels)
    if uncertain != "ignore":
        out["uncertain"] = uncertain
    if blank != "unknown":
        out["blank"] = blank
    return out


def _load(request: dict[str, Any], options: TrainOptions):
    from medtl.data import load_dataset

    data = request["data"]
    ds = load_dataset(data, patient_regex=request["patient_regex"],
                      val_fraction=request["val_fraction"], seed=options.seed,
                      skip_bad=options.skip_bad, **request["view"],
                      **request.get("load", {}))
    for path, reason in ds.skipped:
        log.warning("skipped unreadable image %s: %s", path, reason)
    log.info("data %s: classes %s; %s", data, ds.classes,
             "; ".join(f"{s} {sum(c.values())}" for s, c in ds.counts().items()))
    return ds


# A class name read as a negative finding: sensitivity "of normal" is rarely what is meant.
_NEGATIVE_WORDS = {"normal", "healthy", "negative", "benign", "control", "controls", "none",
                   "unremarkable", "nofinding", "nodisease", "absent", "clear", "neg"}
_NEGATIVE_PREFIXES = {"no", "non", "not", "without"}


def looks_negative(name: str) -> bool:
    """Whether a class name reads as a negative finding: normal, healthy, benign, no_tumor,
    Non-COVID, without_effusion, 0_normal, ... (case-insensitive)."""
    import re

    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    lead = [w for w in words if not w.isdigit()][:1]
    return bool(set(words) & _NEGATIVE_WORDS) or bool(set(lead) & _NEGATIVE_PREFIXES)


def positive_index(classes: Sequence[str], requested: str | None) -> int | None:
    """The positive class of a binary task (None for multi-class): the one asked for, else
    the last in name order, said in the log (a warning when its name reads as negative)."""
    if requested is not None:
        if len(classes) != 2:
            raise MedtlError(f"--positive-class {requested}: only for a binary task; this data "
                             f"has {len(classes)} classes ({', '.join(classes)})")
        if requested not in classes:
            raise MedtlError(f"--positive-class {requested}: not a class of the data (classes: "
                             f"{', '.join(classes)})")
        log.info("positive class: %s (--positive-class)", requested)
        return list(classes).index(requested)
    if len(classes) != 2:
        return None
    other, chosen = classes
    if looks_negative(chosen):
        log.warning("positive class: %s, taken as the last class in name order, but its name "
                    "reads as a negative finding: sensitivity, specificity and the operating "
                    "points refer to %s; pass --positive-class %s if %s is the finding",
                    chosen, chosen, other, other)
    else:
        log.info("positive class: %s (the last class in name order; --positive-class chooses "
                 "another)", chosen)
    return 1


def _positive_of(ds, requested: str | None) -> int | None:
    """positive_index for a single-label dataset; a multi-label one has no positive class
    (each label is its own positive), so --positive-class is refused there."""
    if ds.multilabel:
        if requested is not None:
            raise MedtlError(f"--positive-class {requested}: a multi-label task scores each "
                             f"label as its own positive ({', '.join(ds.classes)})")
        return None
    return positive_index(ds.classes, requested)


def _resume_settings(options: TrainOptions, request: dict[str, Any], ds) -> dict[str, Any]:
    """What a run was asked to do, as ``{label: value}`` (labels as the user knows them):
    every option but those that say where and how verbosely it computes (``RESUME_EXEMPT``:
    quiet, threads, cache, device, engine), the request values and the data's fingerprint."""
    import medtl
    from medtl.transfer.strategies import RESUME_EXEMPT  # how and where, not what

    settings = {f"--{k.replace('_', '-')}": v for k, v in options.to_dict().items()
                if k not in RESUME_EXEMPT}
    for k in ("patient_regex", "val_fraction", "target_sensitivity", "positive_class",
              "folds"):
        settings[f"--{k.replace('_', '-')}"] = request[k]
    settings.update({f"--{k}": v for k, v in request["view"].items()})
    settings.update({f"--{k}": v for k, v in request.get("load", {}).items()})
    # By content, not path: a moved copy of the same data resumes.
    settings["data images"] = len(ds)
    settings["data fingerprint"] = ds.fingerprint()
    settings["medtl version"] = medtl.__version__
    return settings


def _guard_resume(draft, options: TrainOptions, request: dict[str, Any], ds, *,
                  resume: bool) -> None:
    """Record the request in the draft; on --resume, first refuse any change from the one
    recorded (one line naming each difference), before any checkpoint is read."""
    settings = _resume_settings(options, request, ds)
    if resume and not bundle.check_request(draft.path, settings, out=draft.out):
        log.warning("%s holds no record of its request (left by an older medtl): --resume "
                    "cannot check that request and data are unchanged", draft.path)
    bundle.write_request(draft.path, settings)


def _split_overlap(ds) -> dict[str, Any]:
    """Shared patients and byte-identical files across the splits the run uses, warned about
    and recorded in metrics.json, zeros included (so a reader sees it was checked)."""
    from medtl.data.checks import split_overlap

    found = split_overlap(ds)
    if found["shared_patients"] or found["identical_files"]:
        log.warning("the splits overlap: %d patient(s) in more than one split, %d group(s) of "
                    "byte-identical files across splits; test figures are optimistic (e.g. "
                    "%s). `medtl check` lists them all", found["shared_patients"],
                    found["identical_files"], "; ".join(found["examples"][:2]))
    return found


def _fit_and_write(clf, ds, out: Path, request: dict[str, Any], *, resume: bool,
                   t_start: float, eval_names: Sequence[str] = ("val", "test")) -> None:
    """Fit ``clf`` on ds's train (val for choices), score ``eval_names``, write the run."""
    checkpoints = out / bundle.CHECKPOINTS
    train_ds, val_ds = ds.split("train"), ds.split("val")
    clf.fit(train_ds, val_ds, checkpoint_dir=checkpoints, resume=resume)
    write_fitted(clf, ds, out, request, t_start=t_start, eval_names=eval_names)
    # The best weights are in model/; the last-epoch checkpoint only served resumption.
    shutil.rmtree(checkpoints, ignore_errors=True)


def write_fitted(clf, ds, out: Path, request: dict[str, Any], *, t_start: float,
                 eval_names: Sequence[str] = ("val", "test"),
                 extra_metrics: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None,
                 ) -> None:
    """Score a fitted ``clf`` on ds's ``eval_names`` and write the run's files into ``out``
    (config.json last). ``extra_metrics(clf, thresholds)``: more figures for metrics.json,
    scored with the operating thresholds chosen on val (federated runs: each site's test)."""
    # Binary problems: the class sensitivity, operating points and ROC refer to (train()).
    positive = request["positive"]
    eval_splits = [s for s in eval_names if s in ds.split_names()]
    metrics, rows, probas = _score_splits(clf, ds, eval_splits, positive, request)
    display = request["display"]  # --paths: every path written below goes through it
    rows = [{**r, "path": display.show(r["path"])} for r in rows]
    metrics["positive_class"] = None if positive is None else ds.classes[positive]
    if "split_overlap" in request:
        metrics["split_overlap"] = request["split_overlap"]
    model = clf.model_
    metrics["timing"] = {**clf.timing_,
                         "predict_images_per_s": _throughput(model, ds.split(eval_splits[-1])),
                         "total_s": time.perf_counter() - t_start, "engine": model.engine}
    metrics["params"] = {"total": model.n_total, "trainable": model.n_trainable}
    if extra_metrics is not None:
        metrics.update(extra_metrics(clf, metrics.get("thresholds")))
    skipped = [f"{display.show(p)}: {display.scrub(r)}" for p, r in ds.skipped]
    skipped += [display.scrub(s) for s in clf.skipped_]
    if skipped:
        metrics["skipped_unreadable"] = len(skipped)
        log.warning("%d unreadable images skipped (--skip-bad)", len(skipped))
    model.save(out / bundle.MODEL_DIR)
    config = _run_config(clf, ds, request, positive, skipped, run_dir=out)
    config.update(request.get("config_extra", {}))
    # The last guard: no string of either file names the data (or the run) by where it is.
    metrics, config = display.scrub_tree(metrics), display.scrub_tree(config)
    write_json(out / bundle.METRICS, metrics)
    write_csv(out / bundle.PREDICTIONS, rows)
    write_csv(out / bundle.HISTORY, clf.history_)
    if ds.multilabel:
        _write_multilabel_report(clf, ds, out, config, metrics, probas, show=display.show)
    else:
        _write_report(clf, ds, out, config, metrics, probas[eval_splits[-1]], eval_splits[-1],
                      positive, show=display.show)
    # config.json last: its presence marks a complete run that load_run may trust.
    bundle.write_config(out, {"kind": "single", **config})


def _write_report(clf, ds, out: Path, config: dict[str, Any], metrics: dict[str, Any],
                  proba: np.ndarray, split: str, positive: int | None,
                  show: Callable[[str], str] = str) -> None:
    """report.html of the last scored split. Each figure is guarded by reporting itself; any
    other failure costs the run its report (said in the log), never the finished run."""
    from medtl.reporting.html import confident_errors, run_figures, write_run_report

    split_ds = ds.split(split)
    try:
        figures = run_figures(classes=ds.classes, positive=positive, split=split,
                              y_true=split_ds.labels, proba=proba, metrics=metrics[split],
                              history=clf.history_)
        # Images are named as --paths says (``show``); burned-in DICOM show no pixels.
        errors = [{**e, "path": show(e["path"])}
                  for e in confident_errors(split_ds, proba, ds.classes)]
        gallery = _gallery(clf, split_ds, proba, ds.classes, positive, ds.view.mode)
        if gallery is not None:
            gallery["entries"] = [{**e, "path": show(e["path"])} for e in gallery["entries"]]
        write_run_report(out, config, metrics, figures=figures, errors=errors,
                         explanations=gallery)
    except Exception as exc:  # noqa: BLE001 - metrics, predictions and model are on disk
        log.warning("no report.html for this run: %s: %s", type(exc).__name__, exc)


def _write_multilabel_report(clf, ds, out: Path, config: dict[str, Any],
                            metrics: dict[str, Any], probas: dict[str, np.ndarray],
                            show: Callable[[str], str] = str) -> None:
    """report.html of a multi-label run: per-label tables, ROC grid and error co-occurrence of
    each scored split; as _write_report, a failure costs the run its report only."""
    from medtl.reporting.html import multilabel_run_figures, write_run_report

    try:
        figures = multilabel_run_figures(
            classes=ds.classes, metrics=metrics, history=clf.history_,
            splits={s: (ds.split(s).labels, p) for s, p in probas.items()})
        split = list(probas)[-1]
        gallery = _gallery(clf, ds.split(split), probas[split], ds.classes, None, ds.view.mode)
        if gallery is not None:  # images named as --paths says, as in _write_report
            gallery["entries"] = [{**e, "path": show(e["path"])} for e in gallery["entries"]]
        write_run_report(out, {"task": "multilabel", **config}, metrics, figures=figures,
                         explanations=gallery)
    except Exception as exc:  # noqa: BLE001 - metrics, predictions and model are on disk
        log.warning("no report.html for this run: %s: %s", type(exc).__name__, exc)


def _score_splits(clf, ds, eval_splits: Sequence[str], positive: int | None,
                  request: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                    dict[str, np.ndarray]]:
    """Metrics, predictions.csv rows and probabilities of each split in order: thresholds are
    chosen on val and only applied to the splits after it (never chosen on test)."""
    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    probas: dict[str, np.ndarray] = {}
    thresholds = None
    for split in eval_splits:
        m, r, probas[split] = _split_metrics(clf, ds.split(split), split, positive,
                                             thresholds=thresholds, seed=clf.seed)
        if split == "val":
            # Operating points are chosen here and only applied to the splits after it.
            ok = np.isfinite(probas[split]).all(axis=1)
            thresholds = _val_thresholds(ds.split(split), probas[split], ok, positive,
                                         request["target_sensitivity"])
            if thresholds:
                metrics["thresholds"] = thresholds
            if ds.multilabel:  # val's rows and figures at the thresholds it chose
                m, r, _ = _multilabel_split_metrics(clf, ds.split(split), split,
                                                    thresholds=thresholds, seed=clf.seed,
                                                    proba=probas[split])
        metrics[split] = m
        rows.extend(r)
        if ds.multilabel:
            _log_multilabel(split, m)
            continue
        log.info("%s: AUC %s %s, accuracy %.3f, sensitivity %s, specificity %s (n=%d)",
                 split, _f(m["auc"]), _ci(m.get("auc_ci95")), m["accuracy"],
                 _f(m["sensitivity"]), _f(m["specificity"]), m["n"])
        if "per_volume" in m:
            v = m["per_volume"]
            log.info("%s per volume (mean slice probability): AUC %s %s, accuracy %.3f (n=%d)",
                     split, _f(v["auc"]), _ci(v.get("auc_ci95")), v["accuracy"], v["n"])
        for name, op in m.get("operating_points", {}).items():
            log.info("%s at the %s threshold %.3f chosen on val: sensitivity %s, "
                     "specificity %s", split, name, op["threshold"], _f(op["sensitivity"]),
                     _f(op["specificity"]))
    if eval_splits[-1] == "val":
        log.warning("no test split in %s: only validation figures are reported",
                    request["data"])
    return metrics, rows, probas


def _val_thresholds(val, proba: np.ndarray, ok: np.ndarray, positive: int | None,
                    target_sensitivity: float) -> dict[str, Any] | None:
    """The operating thresholds chosen on validation: Youden's and the target-sensitivity
    point of a binary task, or one Youden threshold per label of a multi-label one."""
    if val.multilabel:
        from medtl.evaluation.multilabel import label_thresholds

        return label_thresholds(val.labels[ok], proba[ok], val.classes)
    return choose_thresholds(val.labels[ok], proba[ok], positive, target_sensitivity)


def _log_multilabel(split: str, m: dict[str, Any]) -> None:
    log.info("%s: macro AUC %s %s, micro AUC %s, mAP %s (n=%d)", split, _f(m["macro_auc"]),
             _ci(m.get("macro_auc_ci95")), _f(m["micro_auc"]), _f(m["map"]), m["n"])
    for name, lab in m["labels"].items():
        log.info("%s %s: AUC %s %s, sensitivity %s, specificity %s at %.3f (%d known, %d "
                 "positive)", split, name, _f(lab["auc"]), _ci(lab.get("auc_ci95")),
                 _f(lab["sensitivity"]), _f(lab["specificity"]), lab["threshold"],
                 lab["n_known"], lab["n_positive"])


def _run_config(clf, ds, request: dict[str, Any], positive: int | None,
                skipped: list[str], *, run_dir: Path) -> dict[str, Any]:
    """config.json of a single run (medtl.run owns its layout and format version)."""
    import medtl

    model, options = clf.model_, clf.options
    strategy = clf.make_strategy()
    w = model.backbone.weights_info
    return {
        "backbone": options.backbone, "strategy": options.strategy,
        "head": getattr(clf, "head_name_", None) or strategy.head_name,
        "head_params": clf.head_params_,
        "class_weight": "balanced" if clf.balanced_ else None,
        "calibration": {"method": "temperature", "temperature": model.temperature,
                        "fitted_on": "val"} if model.temperature is not None else None,
        "target_sensitivity": request["target_sensitivity"],
        "stages": clf.stages_,
        "weights": {"requested": options.weights, **{k: v for k, v in w.to_dict().items()
                                                     if k != "path"}},
        "preprocessing": model.preprocessing.to_dict(), "in_chans": options.in_chans,
        "view": ds.view.to_dict(),
        **({"task": "multilabel"} if ds.multilabel else {}),
        "classes": ds.classes, "positive_class": None if positive is None
        else ds.classes[positive],
        "seed": options.seed, "epochs": options.epochs, "device": model.device,
        "engine": model.engine,
        "strategy_params": strategy.own_values(),
        "options": options.to_dict(),
        "data": {**_recorded_source(request, run_dir),
                 "fingerprint": ds.fingerprint(), "counts": ds.counts(),
                 "patient_regex": request["patient_regex"],
                 "val_fraction": request["val_fraction"], "skipped": skipped,
                 **request.get("load", {})},
        **_align_record(clf, ds),
        "medtl_version": medtl.__version__,
        "environment": {"python": platform.python_version(), "torch": _torch_version(),
                        "machine": platform.machine()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _align_record(clf, ds) -> dict[str, Any]:
    """config.json's ``align`` (--align only; absent otherwise): method, weight, the target's
    image count and fingerprint, and how many of the run's test images were among the target
    (any: the test figures are transductive, docs/domain-adaptation.md)."""
    align = getattr(clf, "align_", None)
    if not align:
        return {}
    record = {k: v for k, v in align.items() if k != "_keys"}
    if "test" in ds.split_names():
        test = ds.split("test")
        keys = align.get("_keys") or set()
        overlap = sum(test.content_key(i) in keys for i in range(len(test)))
        record["test_images_in_target"] = overlap
        if overlap:
            log.warning("--align: %d of the %d test images were among the target images "
                        "aligned to: the test figures are transductive", overlap, len(test))
    return {"align": record}


def _gallery(clf, data, proba, classes, positive, mode) -> dict[str, Any] | None:
    """Grad-CAM maps of the report split's most confident hits and misses; a failure costs the
    report its gallery (said in the log), never the run."""
    from medtl.explain import gallery

    try:
        return gallery(clf, data, proba, classes, positive, mode=mode)
    except Exception as exc:  # noqa: BLE001 - the run's figures are already safe on disk
        log.warning("no explanation gallery in the report: %s: %s", type(exc).__name__, exc)
        return None


CV_FIGURES = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1")
MULTILABEL_CV_FIGURES = ("auc", "macro_auc", "micro_auc", "map")


def _cross_validate(clf, ds, folds: int, out: Path, request: dict[str, Any], *,
                    resume: bool) -> None:
    """K folds over train + val, grouped by patient when known; the test split is not used.

    Each fold is a complete run in ``out/folds/fold-K`` (its held-out fold scored as
    ``heldout``, a validation part carved from the rest for early stopping and choices); a
    finished fold is kept by ``--resume``. ``out`` gets cv.csv, metrics.json (``cv``: per-fold
    figures, mean and sd) and the out-of-fold predictions.
    """
    from sklearn.base import clone

    from medtl.data.splits import cross_validation_folds
    from medtl.run import load_run as _load

    fold_sets = cross_validation_folds(ds, folds, seed=clf.seed,
                                       val_fraction=request["val_fraction"] or 0.2)
    log.info("cross-validation: %d folds over train + val (%d images), grouped by %s; the "
             "test split is not used", folds, sum(len(f.split("heldout")) for f in fold_sets),
             "patient" if any(ds.patients) else "image")
    per_fold, rows = [], []
    figures = MULTILABEL_CV_FIGURES if ds.multilabel else CV_FIGURES
    for k, fold_ds in enumerate(fold_sets, 1):
        fold_dir = bundle.fold_path(out, k)
        if resume and (fold_dir / "config.json").is_file():
            log.info("fold %d/%d: finished before, kept", k, folds)
        else:
            if fold_dir.exists() and not resume:
                shutil.rmtree(fold_dir)
            fold_dir.mkdir(parents=True, exist_ok=True)
            bundle.write_marker(fold_dir)  # each fold is a run of its own (load_run, evaluate)
            log.info("fold %d/%d: %s", k, folds, "; ".join(
                f"{s} {sum(c.values())}" for s, c in fold_ds.counts().items()))
            fold_clf = clone(clf)
            with run_logging(fold_dir, quiet=True, append=resume,
                             rewrite=request["display"].scrub):
                # The source's split overlap is the whole run's, recorded at its top.
                fold_request = {key: v for key, v in request.items() if key != "split_overlap"}
                _fit_and_write(fold_clf, fold_ds, fold_dir,
                               {**fold_request, "config_extra": {"fold": k, "folds": folds}},
                               resume=resume, t_start=time.perf_counter(),
                               eval_names=("val", "heldout"))
        fold_run = _load(fold_dir)
        m = fold_run.metrics["heldout"]
        per_fold.append({"fold": k, **{f: m.get(f) for f in ("n", *figures)}})
        rows.extend({"fold": k, **r} for r in fold_run.predictions() if r["split"] == "heldout")
        log.info("fold %d/%d held out: AUC %s, %s", k, folds, _f(m["auc"]),
                 f"mAP {_f(m['map'])}" if ds.multilabel else f"accuracy {m['accuracy']:.3f}")
    summary = {"folds": folds, "per_fold": per_fold, "mean": {}, "sd": {}}
    for f in figures:
        values = [r[f] for r in per_fold if r[f] is not None]
        summary["mean"][f] = float(np.mean(values)) if values else None
        summary["sd"][f] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        if values:
            log.info("cv %s: %.3f +- %.3f", f, summary["mean"][f], summary["sd"][f] or 0.0)
    write_csv(out / bundle.CV_TABLE, per_fold)
    write_csv(out / bundle.PREDICTIONS, rows)
    display = request["display"]  # --paths, as in each fold's files
    write_json(out / bundle.METRICS, display.scrub_tree({"cv": summary, "positive_class":
        _positive_name(ds.classes, request), "split_overlap": request.get("split_overlap")}))
    bundle.write_config(out, display.scrub_tree(_cv_config(clf, ds, folds, request,
                                                           run_dir=out)))


def _recorded_source(request: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """config.json's data source as ``--paths`` allows: see medtl.data.privacy.recorded_source
    (relative: from the run folder, which keeps its depth when the draft becomes the run)."""
    from medtl.data.privacy import recorded_source

    return recorded_source(request.get("paths", "relative"), request["data"], run_dir)


def _cv_config(clf, ds, folds: int, request: dict[str, Any], *,
               run_dir: Path) -> dict[str, Any]:
    """config.json of a cross-validation run (medtl.run owns its layout)."""
    import medtl

    o = clf.options
    return {
        "kind": "cv", "backbone": o.backbone, "strategy": o.strategy, "head": o.head,
        "weights": {"requested": o.weights}, "in_chans": o.in_chans, "seed": o.seed,
        "epochs": o.epochs, "target_sensitivity": request["target_sensitivity"],
        "view": request["view"], **({"task": "multilabel"} if ds.multilabel else {}),
        "data": {**_recorded_source(request, run_dir),
                 "fingerprint": ds.fingerprint(), "counts": ds.counts(),
                 "patient_regex": request["patient_regex"],
                 "val_fraction": request["val_fraction"], **request.get("load", {})},
        "folds": folds, "classes": ds.classes,
        "positive_class": _positive_name(ds.classes, request),
        "options": o.to_dict(), "medtl_version": medtl.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds")}


def _positive_name(classes: Sequence[str], request: dict[str, Any]) -> str | None:
    positive = request.get("positive")
    return None if positive is None else classes[positive]


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f"(95% CI {ci[0]:.3f}-{ci[1]:.3f})"


def _torch_version() -> str:
    import torch

    return torch.__version__


def evaluate(run: str | Path | Run, data: str | Path | None = None, *, split: str = "test",
             device: str = "auto", skip_bad: bool = False, quiet: bool = False,
             paths: str = "relative", tta: str | None = None,
             adapt_bn: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Re-score a saved run on a split of DATA (by default the data it was trained on).

    ``tta``: the test-time augmentation (none | flip | standard) in place of the one the run
    recorded (None: the run's own); the result's ``tta`` says which was used.

    Returns ``{"metrics": ..., "rows": ..., "data": ...}``; rows are predictions.csv rows,
    ``data`` what was scored. Without DATA the folder or manifest recorded in the run's
    config.json is read: it must exist (a run from elsewhere names paths of its own machine).
    The run is checked whole (``load_run``) and its model loaded before any data is read.
    ``paths``: how the rows name the images (relative to DATA's root, hashed, absolute).
    ``adapt_bn``: image files or folders (labels unused) whose BatchNorm statistics the model
    takes before scoring (AdaBN, medtl.transfer.adapt), for this evaluation only; the result's
    ``adapted_bn`` says how many of the scored images were among them (transductive when
    any were).
    """
    from medtl.data import load_dataset
    from medtl.data.privacy import PathDisplay, recorded_data_path

    run = run if isinstance(run, Run) else load_run(run)
    cfg = run.config
    d = cfg.get("data") or {}
    if data is None:
        recorded = recorded_data_path(d, run.path)
        if recorded is None:
            named = (f" only as '{d['source']}' (--paths {d.get('paths')})"
                     if d.get("source") else "")
            raise MedtlError(f"{run.path}: this run does not record where its data is{named}; "
                             "pass DATA")
        source = Path(recorded)
        if not (source.is_dir() or source.is_file()):
            raise MedtlError(f"{run.path}: the data it records, {source}, is not a folder or "
                             "file here; pass DATA")
        log.info("evaluating on the data recorded in %s: %s", run.path / bundle.CONFIG, source)
    else:
        source = data
    display = PathDisplay.for_source(paths, source)  # a bad --paths before the model loads
    clf = run.load_model(device=device, quiet=quiet, skip_bad=skip_bad)
    used = _use_tta(clf, tta)
    ds = load_dataset(source, patient_regex=d.get("patient_regex"),
                      val_fraction=d.get("val_fraction", 0.2), seed=cfg.get("seed", 0),
                      skip_bad=skip_bad, **cfg.get("view", {}),
                      **{k: d[k] for k in ("labels", "uncertain", "blank") if k in d})
    if ds.multilabel != (cfg.get("task") == "multilabel"):
        task = "multi-label" if ds.multilabel else "single-label"
        raise MedtlError(f"{source}: {task} data, and the run was trained on "
                         f"{'single' if ds.multilabel else 'multi'}-label data")
    if list(ds.classes) != list(cfg["classes"]):
        what = "labels" if ds.multilabel else "classes"
        raise MedtlError(f"{source}: {what} {ds.classes} differ from the run's "
                         f"{cfg['classes']}")
    if split not in ds.split_names():
        raise MedtlError(f"{source}: no '{split}' split (has: {', '.join(ds.split_names())})")
    positive = cfg["classes"].index(cfg["positive_class"]) if cfg.get("positive_class") else None
    scored = ds.split(split)
    adapted = None
    if adapt_bn:
        adapted = _adapt_bn(clf, adapt_bn, run, quiet=quiet)
        target = adapted.pop("_keys")
        overlap = sum(scored.content_key(i) in target for i in range(len(scored)))
        adapted["scored_images_adapted_on"] = overlap
        adapted["transductive"] = overlap > 0
        if overlap:
            log.warning("AdaBN: %d of the %d images scored were among those adapted to: "
                        "transductive figures", overlap, len(scored))
    metrics, rows, _ = _split_metrics(clf, scored, split, positive,
                                      thresholds=run.metrics.get("thresholds"),
                                      seed=cfg.get("seed", 0))
    if adapted is not None:
        metrics["adapted_bn"] = adapted
    rows = [{**r, "path": display.show(r["path"])} for r in rows]
    return {"metrics": metrics, "rows": rows, "data": str(source), "tta": used}


def _adapt_bn(clf, target: Sequence[str | Path], run: Run, *, quiet: bool) -> dict[str, Any]:
    """AdaBN of a loaded run's model on TARGET's images; the record, with ``_keys`` (the
    target images' content keys, to tell transductive use)."""
    from medtl.data import dataset_from_files
    from medtl.data.sources import make_view
    from medtl.transfer.adapt import adapt_model

    ds = dataset_from_files(target, classes=clf.classes_,
                            view=make_view(**run.config.get("view", {})))
    record = adapt_model(clf.model_, ds, quiet=quiet)
    # The out-of-distribution guard was fitted on the unadapted features.
    clf.model_.ood = None
    record["_keys"] = {ds.content_key(i) for i in range(len(ds))}
    return record


def adapt(run: str | Path | Run, target: Sequence[str | Path], *, out: str | Path,
          overwrite: bool = False, device: str = "auto", quiet: bool = False) -> Run:
    """AdaBN as a run: a copy of RUN whose model took the BatchNorm statistics of TARGET's
    images (labels unused), recorded in config.json's ``adapted_bn``; ``evaluate``,
    ``predict``, ``export`` and ``serve`` then use the adapted model. The source run's val and
    test figures, which were the unadapted model's, move to metrics.json's
    ``before_adaptation``; its operating thresholds (chosen on its validation) stay."""
    src = run if isinstance(run, Run) else load_run(run)
    if src.kind != "single":
        raise MedtlError(f"{src.path}: adapt one trained run (not a {src.kind} run)")
    clf = src.load_model(device=device, quiet=quiet)
    with bundle.writing_run(Path(out), overwrite=overwrite) as draft, \
            run_logging(draft.path, quiet):
        record = _adapt_bn(clf, target, src, quiet=quiet)
        record.pop("_keys")
        record["source_run"] = src.path.name  # by name: --paths' rule for what runs record
        clf.model_.save(draft.path / bundle.MODEL_DIR)
        before = src.metrics
        write_json(draft.path / bundle.METRICS, {
            "positive_class": before.get("positive_class"),
            "thresholds": before.get("thresholds"),
            "before_adaptation": {k: before[k] for k in ("val", "test") if k in before},
            "adapted_bn": record})
        bundle.write_config(draft.path, {**src.config, "adapted_bn": record})
        draft.commit()
        log.info("adapted run written to %s (AdaBN on %d images)", out, record["images"])
    return Run(Path(out))


def _use_tta(clf, tta: str | None) -> str:
    """Set the test-time augmentation a loaded run predicts with: ``tta``, or the run's own
    when None; an override is logged (the run's operating points were chosen on validation
    with its own). Refused where the run's augmentation forbids it (medtl.data.tta)."""
    model = clf.model_
    recorded = model.tta
    if tta is not None and tta != recorded:
        from medtl.data.tta import check_tta

        check_tta(tta, augment=model.options.augment, hflip=model.options.hflip)
        model.options = model.options.replace(tta=tta)
        log.info("test-time augmentation: %s in place of the run's %s", tta, recorded)
    elif model.tta != "none":
        log.info("test-time augmentation: %s (recorded in the run)", model.tta)
    return model.tta


def predict(run: str | Path | Run, inputs: Sequence[str | Path], *,
            output: str | Path | None = None, device: str = "auto", skip_bad: bool = False,
            quiet: bool = False, paths: str = "relative",
            tta: str | None = None,
            adapt_bn: Sequence[str | Path] | None = None) -> list[dict[str, Any]]:
    """Class probabilities for image files (or folders of them) with a saved run.

    ``adapt_bn``: image files or folders (labels unused) whose BatchNorm statistics the model
    takes for these predictions only (AdaBN, as ``evaluate``'s); predicting the same images is
    transductive, which is logged. Not for a bundle: ``medtl adapt`` then ``export`` instead.

    ``tta``: the test-time augmentation in place of the run's own (None: the run's); a bundle
    applies the one it was exported with inside its graph, so ``tta`` is refused for one.

    ``paths``: how rows name the images: relative to the folder given (a file given by its
    name), hashed, or absolute. ``run`` may be an exported bundle (``medtl export``): it is
    checked against its manifest and predicts with onnxruntime without importing torch (a
    TorchScript bundle needs torch)."""
    from medtl.data import dataset_from_files
    from medtl.data.privacy import PathDisplay
    from medtl.data.sources import make_view
    from medtl.export.bundle import is_bundle, load_bundle

    display = PathDisplay.for_inputs(paths, inputs)
    if not isinstance(run, Run) and is_bundle(run):
        if tta is not None:
            raise MedtlError(f"{run}: a bundle applies the test-time augmentation it was "
                             "exported with (preprocessing.json 'tta'); --tta is for runs")
        if adapt_bn:
            raise MedtlError(f"{run}: a bundle's BatchNorm statistics are fixed in its graph; "
                             "adapt the run (medtl adapt RUN TARGET --out DIR) and export that")
        exported = load_bundle(run)
        ds = exported.dataset(inputs)
        proba, scores = exported.predict_dataset_ood(ds, skip_bad=skip_bad)
        classes, ood = exported.classes, exported.ood
        multilabel = exported.multilabel
        thresholds = exported.thresholds
    else:
        run = run if isinstance(run, Run) else load_run(run)
        clf = run.load_model(device=device, quiet=quiet, skip_bad=skip_bad)
        _use_tta(clf, tta)
        ds = dataset_from_files(inputs, classes=clf.classes_,
                                view=make_view(**run.config.get("view", {})))
        if adapt_bn:
            target = _adapt_bn(clf, adapt_bn, run, quiet=quiet).pop("_keys")
            overlap = sum(ds.content_key(i) in target for i in range(len(ds)))
            if overlap:
                log.warning("AdaBN: %d of the %d images predicted were among those adapted "
                            "to (transductive)", overlap, len(ds))
        proba, scores = clf.model_.predict_proba_ood(ds)
        classes = clf.classes_
        ood = None if clf.model_.ood is None else clf.model_.ood.record()
        multilabel = run.config.get("task") == "multilabel"
        thresholds = run.metrics.get("thresholds")
    if multilabel:
        from medtl.run import multilabel_prediction_rows

        rows = multilabel_prediction_rows(ds.records, None, proba, classes, thresholds, None,
                                          show=display.show)
    else:
        rows = prediction_rows(ds.records, None, proba, classes, None, show=display.show)
    if any(ds.volumes) and not multilabel:
        rows = _with_volume_rows(rows, ds.volumes, proba, classes, show=display.show)
    adapted = bool(adapt_bn) or (isinstance(run, Run) and "adapted_bn" in run.config)
    rows = _with_ood_columns(rows, ds, scores, ood, adapted=adapted)
    if output is not None:
        write_csv(Path(output), rows)
    return rows


def report(runs: Sequence[str | Path], out: str | Path, *, split: str = "test",
           title: str | None = None, by_group: bool = False, rank_by: str = "auc") -> Path:
    """Compare saved runs in one self-contained HTML page: runs ranked and one chosen on their
    validation ``rank_by`` (a cross-validation run's mean over folds; never on ``split``),
    ``split``'s figures shown, DeLong's and McNemar's paired tests of each run against the
    chosen one, ROC overlays and AUC against training time."""
    from medtl.files import atomic_write
    from medtl.reporting.compare import check_rank_by, compare_runs

    if not runs:
        raise MedtlError("medtl report: name at least one run directory")
    check_rank_by(rank_by)  # before any run is read
    paths = [Path(p) for p in runs]
    entries = [_report_entry(p, split) for p in paths]
    names = [e["name"] for e in entries]
    for e, p in zip(entries, paths, strict=True):
        if names.count(e["name"]) > 1:  # same leaf name: keep the parent to tell them apart
            e["name"] = f"{p.parent.name}/{p.name}"
    out = Path(out)
    atomic_write(out, compare_runs(entries, split=split, title=title, by_group=by_group,
                                   rank_by=rank_by))
    return out


def _report_entry(path: Path, split: str) -> dict[str, Any]:
    """A saved run as the plain data medtl.reporting.compare works on."""
    from medtl.reporting.compare import cv_entry

    if (path / "folds").is_dir() and (path / "config.json").is_file():
        run = Run(path)
        folds = [Run(f).metrics for f in sorted((path / "folds").glob("fold-*"))
                 if (f / "config.json").is_file()]
        return cv_entry(path.name, run.config, run.predictions(), folds, split,
                        cv=run.metrics.get("cv"))
    run = load_run(path)
    metrics = run.metrics
    if split not in metrics:
        raise MedtlError(f"{run.path}: metrics.json has no '{split}' figures")
    return {"name": run.path.name, "config": run.config, "metrics": metrics,
            "rows": [r for r in run.predictions() if r.get("split") == split]}


def _with_ood_columns(rows: list[dict[str, Any]], ds, scores: np.ndarray | None,
                      ood: dict[str, Any] | None, *, adapted: bool = False
                      ) -> list[dict[str, Any]]:
    """``ood_score``, ``ood`` and ``ood_reason`` on every row (medtl.transfer.ood): the image
    rows first, then a volume row flagged when any of its slices is, with their highest score.
    A model without a detector (saved before the guard) says so once; then only a DICOM's
    tags could flag, and no training tags are known, so ``ood`` is empty."""
    from medtl.transfer.ood import ood_columns

    if ood is None and adapted:
        log.warning("AdaBN: the out-of-distribution detector was fitted on the unadapted "
                    "features, so it is off for these predictions: the ood columns are empty")
    elif ood is None:
        log.warning("this model has no out-of-distribution detector (saved before medtl had "
                    "one): the ood columns are empty; train or export it again to have them")
    cols = ood_columns(scores, None if ood is None else ood["threshold"], ds.paths,
                       *(() if ood is None else (ood["modalities"], ood["body_parts"])))
    out = [{**r, **c} for r, c in zip(rows, cols, strict=False)]
    volumes = list(dict.fromkeys(v for v in ds.volumes if v))  # as _with_volume_rows adds
    for row, volume in zip(rows[len(cols):], volumes, strict=True):
        mine = [c for c, v in zip(cols, ds.volumes, strict=True) if v == volume]
        known = [c["ood_score"] for c in mine if c["ood_score"] is not None]
        flags = [c["ood"] for c in mine if c["ood"] is not None]
        out.append({**row, "ood_score": max(known) if known else None,
                    "ood": any(flags) if flags else None,
                    "ood_reason": "; ".join(dict.fromkeys(c["ood_reason"] for c in mine
                                                          if c["ood_reason"]))})
    return out


def _with_volume_rows(rows: list[dict[str, Any]], volumes: Sequence[str | None],
                      proba: np.ndarray, classes: Sequence[str],
                      show: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """Slice rows followed by one row per volume: the mean of its slices' probabilities."""
    out = [{**r, "level": "slice" if v else "image"} for r, v in zip(rows, volumes, strict=True)]
    for volume in dict.fromkeys(v for v in volumes if v):
        idx = [i for i, v in enumerate(volumes) if v == volume]
        p = proba[idx]
        p = p[np.isfinite(p).all(axis=1)]
        mean = p.mean(axis=0) if len(p) else np.full(len(classes), np.nan)
        row = prediction_rows([volume], None, mean[None, :], classes, None, show=show)[0]
        out.append({**row, "level": "volume"})
    return out


def explain(run: str | Path | Run, inputs: Sequence[str | Path], *, out: str | Path,
            method: str = "gradcam", target: str = "predicted", device: str = "auto",
            sanity_check: bool = False, skip_bad: bool = False, quiet: bool = False,
            paths: str = "relative") -> dict[str, Any]:
    """Attribution maps of a saved run for image files (medtl.explain.explain_images)."""
    from medtl.data.privacy import PATH_MODES
    from medtl.errors import check_choice
    from medtl.explain import METHODS, explain_images

    check_choice("method", method, METHODS)  # before the model loads
    check_choice("--paths", paths, PATH_MODES)
    run = run if isinstance(run, Run) else load_run(run)
    if run.kind == "ensemble" and sanity_check:  # before every member loads
        raise MedtlError(f"{run.path}: --sanity-check is not supported for an ensemble run; "
                         "run it on a member (members/NAME)")
    clf = run.load_model(device=device, quiet=True, skip_bad=skip_bad)
    # An ensemble's map: the mean of its members' maps (medtl.explain.runs._EnsembleMaps)
    names = [m["name"] for m in run.config["members"]] if run.kind == "ensemble" else None
    # Multi-label: each row's prediction lists the labels present at their val thresholds.
    thresholds = (run.metrics.get("thresholds") if run.config.get("task") == "multilabel"
                  else None)
    return explain_images(clf, inputs, out=out, view=run.config.get("view"), method=method,
                          target=target, sanity_check=sanity_check, skip_bad=skip_bad,
                          quiet=quiet, paths=paths, member_names=names, thresholds=thresholds)


def demo(out: str | Path = "runs/demo", *, quiet: bool = False) -> Run:
    """The main job on the embedded Kermany sample: frozen ImageNet MobileNetV2 + logistic
    regression, validation carved by patient, scored on the sample's held-out test images."""
    from medtl.data.samples import DEMO_PATIENT_REGEX, demo_data_path

    return train(demo_data_path(), backbone="mobilenet_v2", strategy="hybrid", head="logreg",
                 patient_regex=DEMO_PATIENT_REGEX, out=out, overwrite=True, quiet=quiet)
