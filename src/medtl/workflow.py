"""The jobs behind the CLI, one function each: train, evaluate, predict, demo.

The CLI only parses options and prints; everything it does is callable from Python.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from collections.abc import Sequence
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

log = logging.getLogger("medtl")


def _throughput(clf, data, n: int = 64) -> float | None:
    """Images per second for the whole prediction path (decode, backbone, head), uncached."""
    if len(data) == 0:
        return None
    subset = data.subset(range(min(n, len(data))))
    t0 = time.perf_counter()
    if clf.trainable_:
        quiet, clf.quiet = clf.quiet, True
        clf.predict_proba(subset)
        clf.quiet = quiet
    else:
        x = clf.extractor_.transform(subset, skip_bad=True, use_cache=False, progress=False)
        clf.predict_proba_features(x)
    return len(subset) / (time.perf_counter() - t0)


def _split_metrics(clf, data, split: str, positive: int | None, *,
                   thresholds: dict[str, Any] | None = None, seed: int = 0):
    """The metrics.json entry of one split, its predictions.csv rows and probabilities."""
    raw = clf.predict_proba(data, calibrated=False)
    proba = clf._apply_temperature(raw)
    ok = np.isfinite(proba).all(axis=1)
    metrics = split_summary(data.labels[ok], proba[ok], classes=clf.classes_, positive=positive,
                            patients=[q for q, keep in zip(data.patients, ok, strict=True)
                                      if keep],
                            volumes=([v for v, keep in zip(data.volumes, ok, strict=True)
                                      if keep] if any(data.volumes) else None),
                            thresholds=thresholds, seed=seed)
    if getattr(clf, "temperature_", None) is not None and ok.any():
        metrics["calibration"]["ece_uncalibrated"] = expected_calibration_error(
            data.labels[ok], raw[ok])
        metrics["calibration"]["brier_uncalibrated"] = brier_score(data.labels[ok], raw[ok])
    rows = prediction_rows(data.records, data.labels, proba, clf.classes_, split)
    return metrics, rows, proba


def train(
    data: str | Path,
    *,
    backbone: str = "mobilenet_v2",
    strategy: str = "auto",
    head: str = "logreg",
    weights: str = "imagenet",
    image_size: int | None = None,
    in_chans: int = 3,
    epochs: int | None = None,
    batch_size: int = 64,
    unfreeze: int | None = None,
    gradual: bool = False,
    keep: int | None = None,
    lr: float = 1e-3,
    lr_decay: float = 0.5,
    augment: str = "basic",
    hflip: bool = True,
    patience: int = 5,
    class_weight: str = "auto",
    sampler: str = "none",
    calibrate: bool = False,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    seed: int = 0,
    device: str = "auto",
    engine: str = "auto",
    patient_regex: str | None = None,
    val_fraction: float = 0.2,
    skip_bad: bool = False,
    window: str = "auto",
    slices: str = "middle",
    mode: str = "2d",
    cache: bool = True,
    folds: int | None = None,
    quiet: bool = False,
) -> Run:
    """Load DATA, fit a TransferClassifier, score val and test, write a run directory.

    With ``folds``: K-fold cross-validation over train + val instead (see _cross_validate).
    """
    from medtl.data import load_dataset
    from medtl.transfer.strategies import TransferClassifier

    clf = TransferClassifier(
        backbone=backbone, strategy=strategy, head=head, weights=weights,
        image_size=image_size, in_chans=in_chans, epochs=epochs, batch_size=batch_size,
        unfreeze=unfreeze, gradual=gradual, keep=keep, class_weight=class_weight,
        sampler=sampler, calibrate=calibrate, lr=lr, lr_decay=lr_decay, augment=augment,
        hflip=hflip, patience=patience, seed=seed, device=device, engine=engine, cache=cache,
        skip_bad=skip_bad, quiet=quiet)
    clf._validate()  # option mistakes before any slow work
    if not 0.0 < target_sensitivity <= 1.0:
        raise MedtlError(f"--target-sensitivity {target_sensitivity}: must lie in (0, 1]")
    if folds is not None and folds < 2:
        raise MedtlError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if out is None:
        out = Path("runs") / f"{Path(str(data)).stem}-{backbone}-{strategy}"
    out = Path(out)
    request = {
        "data": data, "backbone": backbone, "strategy": strategy, "head": head,
        "weights": weights, "in_chans": in_chans, "seed": seed, "epochs": epochs,
        "patient_regex": patient_regex, "val_fraction": val_fraction,
        "target_sensitivity": target_sensitivity,
        "view": {"window": window, "slices": slices, "mode": mode},
    }
    t_start = time.perf_counter()
    # The run is written beside ``out`` and takes its place only when complete (medtl.run).
    with bundle.writing_run(out, overwrite=overwrite, resume=resume) as draft, \
            run_logging(draft.path, quiet, append=resume):
        ds = load_dataset(data, patient_regex=patient_regex, val_fraction=val_fraction,
                          seed=seed, skip_bad=skip_bad, window=window, slices=slices, mode=mode)
        for path, reason in ds.skipped:
            log.warning("skipped unreadable image %s: %s", path, reason)
        counts = ds.counts()
        log.info("data %s: classes %s; %s", data, ds.classes,
                 "; ".join(f"{s} {sum(c.values())}" for s, c in counts.items()))
        if folds is not None:
            _cross_validate(clf, ds, folds, draft.path, request, resume=resume)
        else:
            _fit_and_write(clf, ds, draft.path, request, resume=resume, t_start=t_start)
        draft.commit()
        log.info("run written to %s", out)
    return Run(out)


def _fit_and_write(clf, ds, out: Path, request: dict[str, Any], *, resume: bool,
                   t_start: float, eval_names: Sequence[str] = ("val", "test")) -> None:
    """Fit ``clf`` on ds's train (val for choices), score ``eval_names``, write the run."""
    import medtl
    from medtl.reporting.html import confident_errors, run_figures, write_run_report

    checkpoints = out / bundle.CHECKPOINTS
    train_ds, val_ds = ds.split("train"), ds.split("val")
    clf.fit(train_ds, val_ds, checkpoint_dir=checkpoints, resume=resume)
    positive = len(ds.classes) - 1 if len(ds.classes) == 2 else None

    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    probas: dict[str, np.ndarray] = {}
    eval_splits = [s for s in eval_names if s in ds.split_names()]
    thresholds = None
    for split in eval_splits:
        m, r, probas[split] = _split_metrics(clf, ds.split(split), split, positive,
                                             thresholds=thresholds, seed=request["seed"])
        if split == "val":
            # Operating points are chosen here and only applied to the splits after it.
            ok = np.isfinite(probas[split]).all(axis=1)
            thresholds = choose_thresholds(ds.split(split).labels[ok], probas[split][ok],
                                           positive, request["target_sensitivity"])
            if thresholds:
                metrics["thresholds"] = thresholds
        metrics[split] = m
        rows.extend(r)
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
    throughput = _throughput(clf, ds.split(eval_splits[-1]))
    metrics["timing"] = {"train_s": clf.train_s_, "resumed_s": clf.resumed_s_,
                         "feature_s": clf.feature_s_,
                         "predict_images_per_s": throughput,
                         "total_s": time.perf_counter() - t_start,
                         "engine": _engine(clf)}
    metrics["params"] = {"total": clf.n_total_, "trainable": clf.n_trainable_}
    skipped = [f"{p}: {r}" for p, r in ds.skipped] + clf.skipped_
    if skipped:
        metrics["skipped_unreadable"] = len(skipped)
        log.warning("%d unreadable images skipped (--skip-bad)", len(skipped))

    clf.save_model(out / bundle.MODEL_DIR)
    w = clf.backbone_.weights_info
    strategy, data = request["strategy"], request["data"]
    config = {
        "backbone": request["backbone"], "strategy": strategy,
        "head": request["head"] if strategy == "hybrid" else "linear",
        "head_params": getattr(clf.head_, "params_", None),
        "class_weight": "balanced" if clf.balanced_ else None,
        "calibration": {"method": "temperature", "temperature": clf.temperature_,
                        "fitted_on": "val"} if clf.temperature_ is not None else None,
        "target_sensitivity": request["target_sensitivity"],
        "stages": getattr(clf, "stages_", None),
        "weights": {"requested": request["weights"], "kind": w.kind, "source": w.source,
                    "sha256": w.sha256},
        "preprocessing": clf.preprocessing_.to_dict(), "in_chans": request["in_chans"],
        "view": ds.view.to_dict(),
        "classes": ds.classes, "positive_class": None if positive is None
        else ds.classes[positive],
        "seed": request["seed"], "epochs": request["epochs"], "device": clf.device_,
        "engine": _engine(clf),
        "strategy_params": {k: getattr(clf, k) for k in (
            "unfreeze", "gradual", "keep", "lr", "lr_decay", "augment", "hflip", "patience",
            "sampler")}
        if clf.trainable_ else None,
        "data": {"source": str(Path(str(data)).resolve()), "fingerprint": ds.fingerprint(),
                 "counts": ds.counts(), "patient_regex": request["patient_regex"],
                 "val_fraction": request["val_fraction"], "skipped": skipped},
        "medtl_version": medtl.__version__,
        "environment": {"python": platform.python_version(), "torch": _torch_version(),
                        "machine": platform.machine()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    config.update(request.get("config_extra", {}))
    write_json(out / bundle.METRICS, metrics)
    write_csv(out / bundle.PREDICTIONS, rows)
    write_csv(out / bundle.HISTORY, clf.history_)
    report_split = eval_splits[-1]
    split_ds = ds.split(report_split)
    figures = run_figures(classes=ds.classes, positive=positive, split=report_split,
                          y_true=split_ds.labels, proba=probas[report_split],
                          metrics=metrics[report_split], history=clf.history_)
    write_run_report(out, config, metrics, figures=figures,
                     errors=confident_errors(split_ds, probas[report_split], ds.classes),
                     explanations=_gallery(clf, split_ds, probas[report_split], ds.classes,
                                           positive, ds.view.mode))
    # config.json last: its presence marks a complete run that load_run may trust.
    bundle.write_config(out, {"kind": "single", **config})
    # The best weights are in model/; the last-epoch checkpoint only served resumption.
    shutil.rmtree(checkpoints, ignore_errors=True)


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


def _cross_validate(clf, ds, folds: int, out: Path, request: dict[str, Any], *,
                    resume: bool) -> None:
    """K folds over train + val, grouped by patient when known; the test split is not used.

    Each fold is a complete run in ``out/folds/fold-K`` (its held-out fold scored as
    ``heldout``, a validation part carved from the rest for early stopping and choices); a
    finished fold is kept by ``--resume``. ``out`` gets cv.csv, metrics.json (``cv``: per-fold
    figures, mean and sd) and the out-of-fold predictions.
    """
    from medtl.data.splits import cross_validation_folds
    from medtl.run import load_run as _load

    fold_sets = cross_validation_folds(ds, folds, seed=request["seed"],
                                       val_fraction=request["val_fraction"] or 0.2)
    log.info("cross-validation: %d folds over train + val (%d images), grouped by %s; the "
             "test split is not used", folds, sum(len(f.split("heldout")) for f in fold_sets),
             "patient" if any(ds.patients) else "image")
    per_fold, rows = [], []
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
            fold_clf = type(clf)(**clf.get_params())
            with run_logging(fold_dir, quiet=True, append=resume):
                _fit_and_write(fold_clf, fold_ds, fold_dir,
                               {**request, "config_extra": {"fold": k, "folds": folds}},
                               resume=resume, t_start=time.perf_counter(),
                               eval_names=("val", "heldout"))
        fold_run = _load(fold_dir)
        m = fold_run.metrics["heldout"]
        per_fold.append({"fold": k, **{f: m.get(f) for f in ("n", *CV_FIGURES)}})
        rows.extend({"fold": k, **r} for r in fold_run.predictions() if r["split"] == "heldout")
        log.info("fold %d/%d held out: AUC %s, accuracy %.3f", k, folds, _f(m["auc"]),
                 m["accuracy"])
    summary = {"folds": folds, "per_fold": per_fold, "mean": {}, "sd": {}}
    for f in CV_FIGURES:
        values = [r[f] for r in per_fold if r[f] is not None]
        summary["mean"][f] = float(np.mean(values)) if values else None
        summary["sd"][f] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        if values:
            log.info("cv %s: %.3f +- %.3f", f, summary["mean"][f], summary["sd"][f] or 0.0)
    write_csv(out / bundle.CV_TABLE, per_fold)
    write_csv(out / bundle.PREDICTIONS, rows)
    write_json(out / bundle.METRICS, {"cv": summary})
    import medtl

    options = ("weights", "patient_regex", "val_fraction", "data", "config_extra")
    bundle.write_config(out, {
        "kind": "cv", **{k: v for k, v in request.items() if k not in options},
        "weights": {"requested": request["weights"]},
        "data": {"source": str(Path(str(request["data"])).resolve()),
                 "fingerprint": ds.fingerprint(), "counts": ds.counts(),
                 "patient_regex": request["patient_regex"],
                 "val_fraction": request["val_fraction"]},
        "folds": folds, "classes": ds.classes,
        "positive_class": ds.classes[-1] if len(ds.classes) == 2 else None,
        "params": clf.get_params(), "medtl_version": medtl.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds")})


def _engine(clf) -> str | None:
    if clf.trainable_:
        return f"torch-{clf.device_}"
    return clf.extractor_.engine_used


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f"(95% CI {ci[0]:.3f}-{ci[1]:.3f})"


def _torch_version() -> str:
    import torch

    return torch.__version__


def evaluate(run: str | Path | Run, data: str | Path | None = None, *, split: str = "test",
             device: str = "auto", skip_bad: bool = False, quiet: bool = False,
             ) -> dict[str, Any]:
    """Re-score a saved run on a split of DATA (by default the data it was trained on).

    Returns ``{"metrics": ..., "rows": ...}``; rows are predictions.csv rows.
    """
    from medtl.data import load_dataset

    run = run if isinstance(run, Run) else load_run(run)
    cfg = run.config
    d = cfg.get("data", {})
    if data is None and "source" not in d:
        raise MedtlError(f"{run.path}: this run does not record its data; pass DATA")
    source = data if data is not None else d["source"]
    ds = load_dataset(source, patient_regex=d.get("patient_regex"),
                      val_fraction=d.get("val_fraction", 0.2), seed=cfg.get("seed", 0),
                      skip_bad=skip_bad, **cfg.get("view", {}))
    if list(ds.classes) != list(cfg["classes"]):
        raise MedtlError(f"{source}: classes {ds.classes} differ from the run's {cfg['classes']}")
    if split not in ds.split_names():
        raise MedtlError(f"{source}: no '{split}' split (has: {', '.join(ds.split_names())})")
    clf = run.load_model(device=device, quiet=quiet, skip_bad=skip_bad)
    positive = cfg["classes"].index(cfg["positive_class"]) if cfg.get("positive_class") else None
    metrics, rows, _ = _split_metrics(clf, ds.split(split), split, positive,
                                      thresholds=run.metrics.get("thresholds"),
                                      seed=cfg.get("seed", 0))
    return {"metrics": metrics, "rows": rows}


def predict(run: str | Path | Run, inputs: Sequence[str | Path], *,
            output: str | Path | None = None, device: str = "auto", skip_bad: bool = False,
            quiet: bool = False) -> list[dict[str, Any]]:
    """Class probabilities for image files (or folders of them) with a saved run."""
    from medtl.data import dataset_from_files
    from medtl.data.sources import make_view

    run = run if isinstance(run, Run) else load_run(run)
    clf = run.load_model(device=device, quiet=quiet, skip_bad=skip_bad)
    ds = dataset_from_files(inputs, classes=clf.classes_,
                            view=make_view(**run.config.get("view", {})))
    proba = clf.predict_proba(ds)
    rows = prediction_rows(ds.records, None, proba, clf.classes_, None)
    if any(ds.volumes):
        rows = _with_volume_rows(rows, ds.volumes, proba, clf.classes_)
    if output is not None:
        write_csv(Path(output), rows)
    return rows


def report(runs: Sequence[str | Path], out: str | Path, *, split: str = "test",
           title: str | None = None, by_group: bool = False) -> Path:
    """Compare saved runs in one self-contained HTML page: a leaderboard by AUC, with DeLong's
    paired test of each run against the best, a ROC overlay and AUC against training time."""
    from medtl.reporting.compare import compare_runs
    from medtl.run import atomic_write_text

    if not runs:
        raise MedtlError("medtl report: name at least one run directory")
    paths = [Path(p) for p in runs]
    entries = [_report_entry(p, split) for p in paths]
    names = [e["name"] for e in entries]
    for e, p in zip(entries, paths, strict=True):
        if names.count(e["name"]) > 1:  # same leaf name: keep the parent to tell them apart
            e["name"] = f"{p.parent.name}/{p.name}"
    out = Path(out)
    atomic_write_text(out, compare_runs(entries, split=split, title=title, by_group=by_group))
    return out


def _report_entry(path: Path, split: str) -> dict[str, Any]:
    """A saved run as the plain data medtl.reporting.compare works on."""
    from medtl.reporting.compare import cv_entry

    if (path / "folds").is_dir() and (path / "config.json").is_file():
        run = Run(path)
        folds = [Run(f).metrics for f in sorted((path / "folds").glob("fold-*"))
                 if (f / "config.json").is_file()]
        return cv_entry(path.name, run.config, run.predictions(), folds, split)
    run = load_run(path)
    metrics = run.metrics
    if split not in metrics:
        raise MedtlError(f"{run.path}: metrics.json has no '{split}' figures")
    return {"name": run.path.name, "config": run.config, "metrics": metrics,
            "rows": [r for r in run.predictions() if r.get("split") == split]}


def _with_volume_rows(rows: list[dict[str, Any]], volumes: Sequence[str | None],
                      proba: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Slice rows followed by one row per volume: the mean of its slices' probabilities."""
    out = [{**r, "level": "slice" if v else "image"} for r, v in zip(rows, volumes, strict=True)]
    for volume in dict.fromkeys(v for v in volumes if v):
        idx = [i for i, v in enumerate(volumes) if v == volume]
        p = proba[idx]
        p = p[np.isfinite(p).all(axis=1)]
        mean = p.mean(axis=0) if len(p) else np.full(len(classes), np.nan)
        row = prediction_rows([volume], None, mean[None, :], classes, None)[0]
        out.append({**row, "level": "volume"})
    return out


def demo(out: str | Path = "runs/demo", *, quiet: bool = False) -> Run:
    """The main job on the embedded Kermany sample: frozen ImageNet MobileNetV2 + logistic
    regression, validation carved by patient, scored on the sample's held-out test images."""
    from medtl.data.samples import DEMO_PATIENT_REGEX, demo_data_path

    return train(demo_data_path(), backbone="mobilenet_v2", strategy="hybrid", head="logreg",
                 patient_regex=DEMO_PATIENT_REGEX, out=out, overwrite=True, quiet=quiet)
