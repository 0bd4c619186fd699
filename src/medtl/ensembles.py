"""``medtl ensemble``: several finished runs combined into a run of their own.

The ensemble is built from the members' saved predictions.csv (their validation and test
rows), so building one reads no image and runs no network. Members must share classes, positive
class, view and data fingerprint, and their validation and test rows must name the same images.
The ensemble run holds copies of its members (``members/<name>/``: config.json, metrics.json,
predictions.csv, model/) with the sha256 of each file that decides their predictions, so it is
self-contained and a member changed afterwards is refused (medtl.run.load_run).

``weighted`` and ``stack`` are fitted on validation with cross-fitting
(medtl.transfer.ensemble.cross_fit): the validation figures and the operating points chosen on
them come from out-of-fold fits; the test split is scored once, by the combiner fitted on every
validation row.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medtl import run as bundle
from medtl.console import run_logging
from medtl.errors import MedtlError, check_choice
from medtl.run import Run, load_run, write_csv, write_json
from medtl.transfer import ensemble as comb

log = logging.getLogger("medtl")

SPLITS = ("val", "test")
_ID_COLUMNS = ("path", "slice", "key", "index")
DEFAULT_FOLDS = 5


def ensemble(runs: Sequence[str | Path], *, method: str = "mean", out: str | Path,
             overwrite: bool = False, folds: int = DEFAULT_FOLDS, quiet: bool = False) -> Run:
    """Combine the finished runs ``runs`` into the ensemble run ``out``; return it.

    ``method``: ``mean`` of the members' probabilities; ``vote`` (shares of the members'
    predicted classes, ties broken by the mean probability); ``weighted`` (non-negative weights
    summing to 1 minimising validation log-loss); ``stack`` (logistic regression on the members'
    probabilities). ``folds``: cross-fitting folds of ``weighted`` and ``stack`` on validation
    (grouped by patient when the members' data records a patient regex).
    """
    check_choice("--method", method, comb.METHODS)
    if not 2 <= len(runs) <= comb.MAX_MEMBERS:
        raise MedtlError(f"medtl ensemble: name 2 to {comb.MAX_MEMBERS} runs (got {len(runs)})")
    if not 2 <= folds <= 20:
        raise MedtlError(f"--folds {folds}: cross-fitting takes 2 to 20 folds")
    members = [load_run(r) for r in runs]
    ref = _check_compatible(members)
    multilabel = ref.get("task") == "multilabel"
    if multilabel and method != "mean":
        raise MedtlError(f"--method {method}: a multi-label ensemble takes the mean of its "
                         "members' per-label probabilities (--method mean); vote, weighted and "
                         "stack combine one class per image")
    keys, labels, probas = _aligned_rows(members, ref["classes"], multilabel)
    out = Path(out)
    with bundle.writing_run(out, overwrite=overwrite) as draft, \
            run_logging(draft.path, quiet):
        log.info("ensemble of %d runs, method %s: %s", len(members), method,
                 ", ".join(str(m.path) for m in members))
        combined, params, fit_info = _combine_splits(probas, labels, keys, method, ref, folds)
        names = _member_names(members)
        records = [_copy_member(m, draft.path / bundle.MEMBERS / n, n)
                   for m, n in zip(members, names, strict=True)]
        (draft.path / bundle.MODEL_DIR).mkdir()
        write_json(draft.path / bundle.MODEL_DIR / comb.COMBINER,
                   {"format": 1, "method": method, "params": params})
        config = _config(ref, members, records, method, params, fit_info, out)
        if multilabel:
            metrics, rows = _score_multilabel(combined, labels, keys, ref)
            _report_multilabel(draft.path, config, metrics, combined, labels, ref)
        else:
            metrics = _score(combined, labels, keys, ref)
            rows = _rows(keys, labels, combined, ref["classes"])
            _report(draft.path, config, metrics, combined, labels, ref)
        write_json(draft.path / bundle.METRICS, metrics)
        write_csv(draft.path / bundle.PREDICTIONS, rows)
        bundle.write_config(draft.path, config)
    log.info("ensemble run written to %s", out)
    return Run(out)


# ------------------------------------------------------------------------------ members
def _check_compatible(members: list[Run]) -> dict[str, Any]:
    """The first member's config, once every member is checked against it: a MedtlError
    naming the first member that differs, and in what."""
    configs = [m.config for m in members]
    for m, cfg in zip(members, configs, strict=True):
        if cfg["kind"] == "ensemble":
            raise MedtlError(f"{m.path}: is an ensemble; name its members instead (ensembles "
                             "of ensembles are not supported)")
        if cfg["kind"] != "single":
            raise MedtlError(f"{m.path}: a {cfg['kind']} run has no validation and test "
                             "predictions to combine; members are runs of `medtl train`")
    ref = configs[0]
    fp = (ref.get("data") or {}).get("fingerprint")
    checks = (("task", lambda c: c.get("task") or "single-label"),
              ("classes", lambda c: list(c["classes"])),
              ("positive class", lambda c: c.get("positive_class")),
              ("data fingerprint", lambda c: (c.get("data") or {}).get("fingerprint")),
              ("view", lambda c: c.get("view") or {}))
    for m, cfg in zip(members[1:], configs[1:], strict=True):
        for what, get in checks:
            if get(cfg) != get(ref):
                raise MedtlError(f"{m.path}: its {what} ({_short(get(cfg))}) differs from "
                                 f"{members[0].path}'s ({_short(get(ref))}); an ensemble's "
                                 "members share classes, positive class, view and data")
    if fp is None:
        raise MedtlError(f"{members[0].path}: records no data fingerprint; cannot check that "
                         "the members saw the same data")
    return ref


def _short(v: Any) -> str:
    s = str(v)
    return s[:12] if len(s) == 64 else (s if len(s) <= 60 else s[:59] + "…")


def _row_key(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(row.get(c, "") for c in ("split", *_ID_COLUMNS))


def _aligned_rows(members: list[Run], classes: list[str], multilabel: bool = False):
    """Per split: the rows' identifying columns, labels (class indices; multi-label: (n, K)
    targets with NaN unknown) and each member's probabilities (m, n, k), in the first member's
    order; refused when a member's rows name other images, or the same image with another
    label."""
    truth = ((lambda r: [r.get(c, "") for c in classes]) if multilabel
             else (lambda r: r["label"]))
    keys: dict[str, list[dict[str, str]]] = {}
    labels: dict[str, np.ndarray] = {}
    probas: dict[str, np.ndarray] = {}
    tables = []
    for m in members:
        rows = [r for r in m.predictions() if r.get("split") in SPLITS]
        table = {_row_key(r): r for r in rows}
        if len(table) != len(rows):
            raise MedtlError(f"{m.path}: predictions.csv names an image twice")
        tables.append(table)
    if not any(k[0] == "val" for k in tables[0]):
        raise MedtlError(f"{members[0].path}: predictions.csv has no validation rows; an "
                         "ensemble is fitted and its operating points chosen on them")
    for m, table in zip(members[1:], tables[1:], strict=True):
        if table.keys() != tables[0].keys():
            diff = sorted(table.keys() ^ tables[0].keys())[0]
            raise MedtlError(f"{m.path}: its validation and test predictions name other images "
                             f"than {members[0].path}'s (e.g. {diff[0]} {diff[1]}); members "
                             "must be scored on the same split of the same data")
    for split in SPLITS:
        order = [k for k in tables[0] if k[0] == split]
        if not order:
            continue
        for m, table in zip(members, tables, strict=True):
            if [truth(table[k]) for k in order] != [truth(tables[0][k]) for k in order]:
                raise MedtlError(f"{m.path}: its {split} labels differ from "
                                 f"{members[0].path}'s")
        keys[split] = [{c: tables[0][k].get(c, "") for c in ("split", *_ID_COLUMNS)
                        if c in tables[0][k]} for k in order]
        labels[split] = (np.array([[float(v) if v != "" else np.nan for v in truth(tables[0][k])]
                                   for k in order], dtype=np.float64) if multilabel else
                         np.array([_class_index(tables[0][k]["label"], classes)
                                   for k in order]))
        probas[split] = np.stack([[[_number(table[k].get(f"prob_{c}", "")) for c in classes]
                                   for k in order] for table in tables])
    return keys, labels, probas


def _class_index(label: str, classes: list[str]) -> int:
    if label not in classes:
        raise MedtlError(f"predictions.csv: label {label!r} is not a class of the run")
    return classes.index(label)


def _number(text: str) -> float:
    try:
        v = float(text) if text != "" else float("nan")
    except ValueError:
        raise MedtlError(f"predictions.csv: probability {text[:20]!r} is not a number") from None
    if np.isfinite(v) and not 0.0 <= v <= 1.0:
        raise MedtlError(f"predictions.csv: probability {v} is not in [0, 1]")
    return v


def _member_names(members: list[Run]) -> list[str]:
    """Each member's folder name in the ensemble: its run's name as a plain name, made
    unique."""
    names: list[str] = []
    for i, m in enumerate(members, 1):
        base = "".join(c if c in comb._NAME_CHARS else "_" for c in m.path.resolve().name)
        base = base.lstrip(".")[:90] or f"member{i}"
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def _copy_member(member: Run, dest: Path, name: str) -> dict[str, Any]:
    """Copy what a member needs to predict and be audited; its record in config.json."""
    dest.mkdir(parents=True)
    for f in (bundle.CONFIG, bundle.METRICS, bundle.PREDICTIONS):
        if (member.path / f).is_file():
            shutil.copyfile(member.path / f, dest / f)
    shutil.copytree(member.path / bundle.MODEL_DIR, dest / bundle.MODEL_DIR, symlinks=True)
    linked = [f for f in comb.member_files(dest) if (dest / f).is_symlink()]
    if linked:
        raise MedtlError(f"{member.path / linked[0]}: is a symbolic link; an ensemble copies "
                         "its members' files, not links to them")
    cfg = member.config
    return {"name": name, "backbone": cfg.get("backbone"), "strategy": cfg.get("strategy"),
            "head": cfg.get("head"), "weights": cfg.get("weights"), "seed": cfg.get("seed"),
            "files": comb.member_digests(dest)}


# ------------------------------------------------------------------------------ combining
def _patients(keys: list[dict[str, str]], ref: dict[str, Any]) -> list[str | None] | None:
    """Each row's patient, from the data's patient regex on the file name; None when unknown."""
    from medtl.data.splits import patient_from_name

    regex = (ref.get("data") or {}).get("patient_regex")
    if not regex:
        return None
    try:
        return [patient_from_name(k["path"], regex) for k in keys]
    except MedtlError:  # hashed names, say: cross-fit by class only
        return None


def _combine_splits(probas: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                    keys: dict[str, list[dict[str, str]]], method: str, ref: dict[str, Any],
                    folds: int):
    """Each split's ensemble probabilities, the combiner fitted on all validation rows, and how
    validation was cross-fitted."""
    seed = int(ref.get("seed", 0))
    pv, yv = probas["val"], labels["val"]
    ok = np.isfinite(pv).all(axis=(0, 2))
    params = comb.fit_combiner(pv[:, ok], yv[ok], method, seed)
    out = {s: comb.combine(list(p), method, params) for s, p in probas.items()}
    info: dict[str, Any] = {"fitted_on": "val"}
    if method in ("weighted", "stack"):
        # The combiner saw every validation row; validation's own figures come from folds
        # that did not.
        patients = _patients([k for k, good in zip(keys["val"], ok, strict=True) if good], ref)
        assignment = comb.fold_assignment(yv[ok], patients, folds, seed)
        val = np.full(pv.shape[1:], np.nan)
        val[ok] = comb.cross_fit(pv[:, ok], yv[ok], method, assignment, seed)
        out["val"] = val
        info.update({"cross_fit_folds": int(assignment.max() + 1),
                     "grouped_by": "patient" if patients else "class (stratified)"})
        log.info("%s fitted on validation; its validation figures from %d-fold cross-fitting "
                 "(grouped by %s)", method, info["cross_fit_folds"], info["grouped_by"])
    if method == "weighted":
        log.info("weights: %s", ", ".join(f"{w:.3f}" for w in params["weights"]))
    return out, params, info


# ------------------------------------------------------------------------------ scoring
def _score(combined: dict[str, np.ndarray], labels: dict[str, np.ndarray],
           keys: dict[str, list[dict[str, str]]], ref: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: each split's figures with CIs (medtl.evaluation), operating points chosen
    on validation and applied to test only, as a trained run's."""
    from medtl.evaluation.summary import (
        DEFAULT_TARGET_SENSITIVITY,
        choose_thresholds,
        split_summary,
    )

    classes = list(ref["classes"])
    positive = classes.index(ref["positive_class"]) if ref.get("positive_class") else None
    target = ref.get("target_sensitivity") or DEFAULT_TARGET_SENSITIVITY
    metrics: dict[str, Any] = {"positive_class": ref.get("positive_class")}
    thresholds = None
    for split in SPLITS:
        if split not in combined:
            continue
        p, y = combined[split], labels[split]
        ok = np.isfinite(p).all(axis=1)
        patients = _patients(keys[split], ref)
        m = split_summary(y[ok], p[ok], classes=classes, positive=positive,
                          patients=None if patients is None else
                          [q for q, good in zip(patients, ok, strict=True) if good],
                          thresholds=thresholds, seed=int(ref.get("seed", 0)))
        if split == "val":
            thresholds = choose_thresholds(y[ok], p[ok], positive, target)
            if thresholds:
                metrics["thresholds"] = thresholds
        metrics[split] = m
        auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
        log.info("%s: AUC %s, accuracy %.3f (n=%d)", split, auc, m["accuracy"], m["n"])
    return metrics


def _score_multilabel(combined: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                      keys: dict[str, list[dict[str, str]]], ref: dict[str, Any]
                      ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """metrics.json and predictions.csv rows of a multi-label ensemble: each label's threshold
    chosen on validation (Youden), the figures of every split at those thresholds (as a
    trained multi-label run's, medtl.workflow)."""
    from medtl.evaluation.multilabel import label_thresholds, multilabel_summary
    from medtl.run import multilabel_prediction_rows

    classes = list(ref["classes"])
    seed = int(ref.get("seed", 0))
    ok = {s: np.isfinite(p).all(axis=1) for s, p in combined.items()}
    thresholds = label_thresholds(labels["val"][ok["val"]], combined["val"][ok["val"]],
                                  classes)
    metrics: dict[str, Any] = {"positive_class": None, "thresholds": thresholds}
    rows: list[dict[str, Any]] = []
    for split in SPLITS:
        if split not in combined:
            continue
        p, y, good = combined[split], labels[split], ok[split]
        m = multilabel_summary(y[good], p[good], classes, thresholds, seed=seed)
        metrics[split] = m
        for k, row in zip(keys[split], multilabel_prediction_rows(
                [r["path"] for r in keys[split]], y, p, classes, thresholds, split),
                strict=True):
            rows.append({**k, **{c: v for c, v in row.items() if c != "path"}})
        log.info("%s: macro AUC %s, mAP %s (n=%d)", split,
                 "n/a" if m["macro_auc"] is None else f"{m['macro_auc']:.3f}",
                 "n/a" if m["map"] is None else f"{m['map']:.3f}", m["n"])
    return metrics, rows


def _report_multilabel(out: Path, config: dict[str, Any], metrics: dict[str, Any],
                       combined: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                       ref: dict[str, Any]) -> None:
    """report.html of a multi-label ensemble (figures only); a failure costs the report."""
    from medtl.reporting.html import multilabel_run_figures, write_run_report

    try:
        figures = multilabel_run_figures(classes=list(ref["classes"]), metrics=metrics,
                                         splits={s: (labels[s], combined[s]) for s in combined})
        write_run_report(out, config, metrics, figures=figures)
    except Exception as exc:  # noqa: BLE001 - metrics, predictions and members are on disk
        log.warning("no report.html for this ensemble: %s: %s", type(exc).__name__, exc)


def _rows(keys: dict[str, list[dict[str, str]]], labels: dict[str, np.ndarray],
          combined: dict[str, np.ndarray], classes: list[str]) -> list[dict[str, Any]]:
    """predictions.csv: the members' identifying columns, label, the ensemble's probabilities
    and its prediction (arg-max), one row per image as the members wrote them."""
    rows = []
    for split, ks in keys.items():
        for k, y, p in zip(ks, labels[split], combined[split], strict=True):
            ok = bool(np.isfinite(p).all())
            row: dict[str, Any] = {**k, "label": classes[int(y)]}
            row.update({f"prob_{c}": float(p[i]) if ok else "" for i, c in enumerate(classes)})
            row["prediction"] = classes[int(np.argmax(p))] if ok else "UNREADABLE"
            rows.append(row)
    return rows


def _config(ref: dict[str, Any], members: list[Run], records: list[dict[str, Any]],
            method: str, params: dict[str, Any], fit_info: dict[str, Any],
            out: Path) -> dict[str, Any]:
    """config.json of an ensemble run (kind ``ensemble``; medtl.run checks it on reading)."""
    import medtl

    return {
        "kind": "ensemble", "backbone": "ensemble", "strategy": "ensemble", "head": method,
        "method": method, "combiner": params, "fit": fit_info,
        "weights": {"kind": "ensemble", "source": f"{bundle.MEMBERS}/"},
        "seed": ref.get("seed", 0),
        **({"task": "multilabel"} if ref.get("task") == "multilabel" else {}),
        "classes": ref["classes"], "positive_class": ref.get("positive_class"),
        "target_sensitivity": ref.get("target_sensitivity"),
        "view": ref.get("view") or {}, "data": _data_record(ref, members[0], out),
        "members": records, "medtl_version": medtl.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds")}


def _data_record(ref: dict[str, Any], first: Run, out: Path) -> dict[str, Any]:
    """The first member's data record, its source re-written relative to the ensemble run
    (as ``--paths`` allowed it there), so ``medtl evaluate ENSEMBLE`` finds the data."""
    from medtl.data.privacy import recorded_data_path, recorded_source

    data = dict(ref.get("data") or {})
    source = recorded_data_path(data, first.path)
    mode = data.get("paths") or "absolute"
    if source is not None and mode in ("relative", "absolute"):
        data.update(recorded_source(mode, source, out))
    elif data.get("source_relative_to") == "run":
        data["source_relative_to"] = None
    return data


def _report(out: Path, config: dict[str, Any], metrics: dict[str, Any],
            combined: dict[str, np.ndarray], labels: dict[str, np.ndarray],
            ref: dict[str, Any]) -> None:
    """report.html of the last scored split (figures only: no image is read); a failure costs
    the run its report, said in the log."""
    from medtl.reporting.html import run_figures, write_run_report

    split = SPLITS[-1] if SPLITS[-1] in combined else SPLITS[0]
    classes = list(ref["classes"])
    positive = classes.index(ref["positive_class"]) if ref.get("positive_class") else None
    try:
        figures = run_figures(classes=classes, positive=positive, split=split,
                              y_true=labels[split], proba=combined[split],
                              metrics=metrics[split], history=[])
        write_run_report(out, config, metrics, figures=figures)
    except Exception as exc:  # noqa: BLE001 - metrics, predictions and members are on disk
        log.warning("no report.html for this ensemble: %s: %s", type(exc).__name__, exc)
