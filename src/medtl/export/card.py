"""A model card for an exported run, in the sections of Mitchell et al. 2019, "Model Cards for
Model Reporting" (FAT* '19): model details, intended use, factors, metrics, evaluation and
training data, quantitative analyses, ethical considerations, caveats and recommendations.

Every value is read from the run's config.json and metrics.json; what a run does not record is
said to be unrecorded, never guessed. The card names no file and no patient: the data appears
only by its folder name and fingerprint (whatever ``--paths`` the run was trained with), and
overlapping patients and skipped images only as counts.

A multi-label run (config.json ``"task": "multilabel"``) gets the same sections with its own
figures: per label AUC, average precision, and sensitivity and specificity at the label's
threshold (chosen on validation), then macro and micro AUC and mean average precision.
"""

from __future__ import annotations

import os
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medtl.run import Run

CARD_FORMAT = 1
RESEARCH_USE = ("Research use only: not for clinical diagnosis, treatment or patient "
                "management, and not a medical device.")
# metrics.json's figures with a 95 % CI, in the order a reader wants them
_FIGURES = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision",
            "f1")
_POINT_FIGURES = ("sensitivity", "specificity", "ppv", "npv")
_NAMES = {"auc": "AUC", "balanced_accuracy": "balanced accuracy", "f1": "F1", "ppv": "PPV",
          "npv": "NPV", "macro_auc": "macro AUC", "micro_auc": "micro AUC",
          "map": "mean average precision (mAP)"}
# A multi-label split's summary figures (each with a 95 % CI), and each label's
_MULTILABEL_FIGURES = ("macro_auc", "micro_auc", "map")
_LABEL_FIGURES = ("auc", "sensitivity", "specificity")
_LABEL_VALUES = ("n_known", "n_positive", "average_precision", "threshold", "precision", "f1")
_RULES = {"youden": "Youden's J (sensitivity + specificity - 1, maximised)"}


def _multilabel(cfg: dict[str, Any]) -> bool:
    return cfg.get("task") == "multilabel"


def model_card(run: Run, *, ood: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model card of ``run`` as a JSON-ready dict (``model-card.json``); ``ood``: the
    model's out-of-distribution record (``MahalanobisDetector.record()``), when it has one."""
    cfg, metrics = run.config, run.metrics
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    scored = "test" if isinstance(metrics.get("test"), dict) else (
        "val" if isinstance(metrics.get("val"), dict) else None)
    return {
        "format": CARD_FORMAT,
        "summary": _summary(cfg, metrics, scored),
        "model_details": _details(cfg, metrics),
        "intended_use": _intended_use(cfg, data),
        "factors": _factors(cfg, metrics, scored),
        "metrics": (_multilabel_metrics(metrics, scored) if _multilabel(cfg)
                    else _metrics(metrics, scored)),
        "training_data": _data(data, metrics, ("train",), _multilabel(cfg)),
        "evaluation_data": _data(data, metrics, ("val", "test"), _multilabel(cfg)),
        "quantitative_analyses": {s: (_multilabel_figures(metrics[s]) if _multilabel(cfg)
                                      else _split_figures(metrics[s])) for s in ("val", "test")
                                  if isinstance(metrics.get(s), dict)},
        "calibration": _calibration(cfg, metrics, scored),
        "out_of_distribution": _ood(ood),
        "ethical_considerations": _ethics(),
        "caveats_and_recommendations": _caveats(cfg, metrics, data, scored),
        **({"ensemble": _ensemble(cfg)} if cfg.get("kind") == "ensemble" else {}),
    }


def _ensemble(cfg: dict[str, Any]) -> dict[str, Any]:
    """An ensemble run's combiner and members, each with its provenance as the ensemble
    recorded it (config.json ``members``): backbone, strategy, head, starting weights, seed."""
    members = [m for m in cfg.get("members") or [] if isinstance(m, dict)]
    out = []
    for m in members:
        w = m.get("weights") if isinstance(m.get("weights"), dict) else {}
        out.append({"name": m.get("name"), "backbone": m.get("backbone"),
                    "strategy": m.get("strategy"), "head": m.get("head"), "seed": m.get("seed"),
                    "weights": {"kind": w.get("kind"), "source": _shown_source(w.get("source")),
                                "sha256": w.get("sha256"), "chain": _weights_chain(w)}})
    fit = cfg.get("fit") if isinstance(cfg.get("fit"), dict) else {}
    return {"method": cfg.get("method"), "combiner": cfg.get("combiner"), "fit": fit,
            "members": out,
            "note": f"The {cfg.get('method')} of {len(out)} members' calibrated probabilities; "
                    "each member reads the image at its own input size and normalisation."}


def _task(cfg: dict[str, Any]) -> str:
    classes = [str(c) for c in cfg.get("classes", [])]
    if _multilabel(cfg):
        return (f"multi-label image classification: {len(classes)} labels, each present or "
                f"absent ({', '.join(classes)})")
    kind = "binary" if len(classes) == 2 else f"{len(classes)}-class"
    return f"{kind} image classification: {' vs '.join(classes)}"


def _model_name(cfg: dict[str, Any]) -> str:
    head = cfg.get("head")
    return f"{cfg.get('backbone')} ({cfg.get('strategy')}" + (f", {head} head)" if head else ")")


def _summary(cfg: dict[str, Any], metrics: dict[str, Any], scored: str | None) -> dict[str, Any]:
    """One line a web page can show, and its parts."""
    m = metrics.get(scored, {}) if scored else {}
    auc, ci = m.get("auc"), m.get("auc_ci95")
    macro = "macro " if _multilabel(cfg) else ""  # a multi-label split's auc is its macro AUC
    if auc is None:
        perf = "no test figures recorded"
    else:
        perf = f"{scored} {macro}AUC {auc:.3f}" \
            + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "") \
            + (f", micro AUC {_fmt(m.get('micro_auc'))}, mAP {_fmt(m.get('map'))}"
               if macro else "") + f", n={m.get('n')}"
    return {"model": _model_name(cfg), "task": _task(cfg), "classes": list(cfg.get("classes", [])),
            "positive_class": cfg.get("positive_class"), "split": scored,
            "auc": auc, "auc_ci95": ci, "n": m.get("n"), "research_use": RESEARCH_USE,
            "line": f"{_model_name(cfg)} - {_task(cfg)} - {perf} - research use only, "
                    "not for clinical diagnosis"}


def _shown_source(source: Any) -> Any:
    """A local file or run folder by its name only: the card names no path on this machine."""
    if isinstance(source, str):
        prefix, sep, rest = source.partition(":")
        if sep and prefix in ("run", "file") and os.path.isabs(rest):
            return f"{prefix}:{PurePath(rest).name}"
        if os.path.isabs(source):
            return PurePath(source).name
    return source


def _weights_chain(w: dict[str, Any]) -> list[dict[str, Any]]:
    """Multi-stage transfer (``--weights RUN_DIR``, or a ``medtl pretrain`` file): every stage
    the starting weights went through, oldest first (ImageNet, then each run or
    self-supervised pretraining), this run's starting point last."""
    staged = w.get("kind") == "run" or w.get("method") is not None
    chain = w.get("chain") if staged else None
    stages = [s for s in chain if isinstance(s, dict)] if isinstance(chain, list) else []
    return [{"kind": s.get("kind"), "source": _shown_source(s.get("source")),
             "sha256": s.get("sha256"), "data_fingerprint": s.get("data_fingerprint"),
             **({"method": s["method"]} if s.get("method") else {})}
            for s in [*stages, w]]


def _details(cfg: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    w = cfg.get("weights") if isinstance(cfg.get("weights"), dict) else {}
    return {
        "backbone": cfg.get("backbone"), "strategy": cfg.get("strategy"),
        "head": cfg.get("head"), "head_params": cfg.get("head_params"),
        "weights": {"requested": _shown_source(w.get("requested")), "kind": w.get("kind"),
                    "source": _shown_source(w.get("source")), "sha256": w.get("sha256"),
                    "chain": _weights_chain(w)},
        "stages": cfg.get("stages"), "epochs": cfg.get("epochs"), "seed": cfg.get("seed"),
        "class_weight": cfg.get("class_weight"),
        "parameters": metrics.get("params"),
        "input": cfg.get("preprocessing"), "view": cfg.get("view"),
        "medtl_version": cfg.get("medtl_version"), "trained": cfg.get("created"),
        "environment": cfg.get("environment"), "run_kind": cfg.get("kind"),
        "type": "convolutional/transformer image backbone with a classification head, "
                "transfer-learned by medtl",
    }


def _data_name(data: dict[str, Any]) -> str | None:
    """The data's folder name only (never where it lies); none for --paths hashed."""
    source = data.get("source")
    if not isinstance(source, str) or data.get("paths") == "hashed":
        return None
    name = PurePath(source.replace("\\", "/")).name
    return name if name not in ("", ".", "..") else None


def _intended_use(cfg: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    classes = ", ".join(str(c) for c in cfg.get("classes", []))
    view = cfg.get("view") or {}
    name = _data_name(data)
    source = f"the training data ({name})" if name else "the training data"
    return {
        "research_use": RESEARCH_USE,
        "primary_uses": [f"Research on {_task(cfg)} of images like those of {source}.",
                         "Reproducing or comparing transfer-learning results; reader studies "
                         "under an approved research protocol."],
        "primary_users": ["researchers", "engineers integrating the model for research"],
        "out_of_scope": [
            "Clinical diagnosis, triage or any decision about a patient.",
            f"Images of another modality, body part, projection or view than {source}.",
            "Patient populations other than the training data's (e.g. paediatric vs adult, "
            "other sites, scanners or countries): the run records none of these.",
            (f"Findings other than the labels it was trained on ({classes}): an image is "
             "never said to show anything else, and a label said absent does not mean a "
             "normal image." if _multilabel(cfg) else
             f"Findings other than the classes it was trained on ({classes}); an image "
             "showing none of them still gets one of them."),
            *([f"3-D volumes: the model reads 2-D images ({view.get('slices')} slice of a "
               "volume)."] if view.get("mode") == "2d" else []),
        ],
    }


def _factors(cfg: dict[str, Any], metrics: dict[str, Any], scored: str | None) -> dict[str, Any]:
    m = metrics.get(scored, {}) if scored else {}
    return {
        "evaluated": (["label" if _multilabel(cfg) else "class"]
                      + (["patient (mean probability per patient)"]
                                   if "per_patient" in m else [])
                      + (["volume (mean over slices)"] if "per_volume" in m else [])),
        "not_recorded": ["age", "sex", "ethnicity", "site", "scanner or device",
                         "acquisition protocol"],
        "note": "No subgroup analysis by demographic or acquisition factors was run; "
                "performance in such subgroups is unknown.",
        "view": cfg.get("view"),
    }


def _metrics(metrics: dict[str, Any], scored: str | None) -> dict[str, Any]:
    thresholds = metrics.get("thresholds") or {}
    points = (metrics.get(scored, {}) if scored else {}).get("operating_points") or {}
    return {
        "reported": list(_FIGURES) + ["calibration error (ECE)", "Brier score"],
        "confidence_intervals": "95 % stratified bootstrap (2,000 resamples, seeded); AUC also "
                                "by DeLong where both classes have two images",
        "split": scored,
        "decision_thresholds": {
            "chosen_on": thresholds.get("chosen_on"),
            "target_sensitivity": thresholds.get("target_sensitivity"),
            "operating_points": {name: {"threshold": thresholds.get(name),
                                        **({f"{scored}_{k}": v for k, v in points[name].items()
                                            if k != "threshold"} if name in points else {})}
                                 for name in ("youden", "sensitivity_target")
                                 if name in thresholds},
        },
        "positive_class": metrics.get("positive_class"),
    }


def _multilabel_metrics(metrics: dict[str, Any], scored: str | None) -> dict[str, Any]:
    """The metrics section of a multi-label run: what is reported and each label's decision
    threshold (where it was chosen, by which rule) with its figures on ``scored``."""
    thresholds = metrics.get("thresholds") or {}
    labels = (metrics.get(scored, {}) if scored else {}).get("labels") or {}
    names = list(labels) or [k for k in thresholds if k not in ("chosen_on", "rule",
                                                                "fallback")]
    return {
        "task": "multi-label",
        "reported": ["per-label AUC", "per-label average precision",
                     "per-label sensitivity and specificity at the label's threshold",
                     "macro AUC", "micro AUC", "mean average precision (mAP)",
                     "co-occurrence of errors"],
        "confidence_intervals": "per-label AUC by DeLong, sensitivity and specificity by "
                                "Wilson; macro and micro AUC and mAP by a percentile bootstrap "
                                "over images; labels unknown for an image are left out",
        "split": scored,
        "decision_thresholds": {
            "chosen_on": thresholds.get("chosen_on"), "rule": thresholds.get("rule"),
            "fell_back_to_0.5": list(thresholds.get("fallback") or []),
            "per_label": {name: {"threshold": thresholds.get(name),
                                 **{f"{scored}_{k}": labels[name].get(k)
                                    for k in ("sensitivity", "specificity")
                                    if name in labels and k in labels[name]}}
                          for name in names},
        },
        "positive_class": None,
    }


def _multilabel_figures(m: dict[str, Any]) -> dict[str, Any]:
    """One multi-label split's figures: macro and micro AUC and mAP with their 95 % CIs, then
    per label (AUC, sensitivity and specificity with CIs; counts, AP, threshold, ...)."""
    out: dict[str, Any] = {"n": m.get("n")}
    for name in _MULTILABEL_FIGURES:
        if name in m:
            out[name] = {"value": m[name], "ci95": m.get(f"{name}_ci95")}
    labels = m.get("labels") if isinstance(m.get("labels"), dict) else {}
    out["labels"] = {}
    for label, lab in labels.items():
        if not isinstance(lab, dict):
            continue
        out["labels"][label] = {
            **{k: lab[k] for k in _LABEL_VALUES if k in lab},
            **{k: {"value": lab[k], "ci95": lab.get(f"{k}_ci95")} for k in _LABEL_FIGURES
               if k in lab}}
    if "error_cooccurrence" in m:
        out["error_cooccurrence"] = m["error_cooccurrence"]
    return out


def _split_figures(m: dict[str, Any]) -> dict[str, Any]:
    """One split's figures: each with its 95 % CI, per class and per patient where recorded."""
    out: dict[str, Any] = {"n": m.get("n")}
    for name in _FIGURES:
        if name in m:
            out[name] = {"value": m[name], "ci95": m.get(f"{name}_ci95")}
    if "auc_ci95_delong" in m:
        out["auc"]["ci95_delong"] = m["auc_ci95_delong"]
    for key in ("confusion_matrix", "auc_weighted", "per_class", "operating_points"):
        if key in m:
            out[key] = m[key]
    for group in ("per_patient", "per_volume"):
        if isinstance(m.get(group), dict):
            out[group] = _split_figures(m[group])
    return out


def _data(data: dict[str, Any], metrics: dict[str, Any], splits: tuple[str, ...],
          multilabel: bool = False) -> dict:
    counts = data.get("counts") if isinstance(data.get("counts"), dict) else {}
    out: dict[str, Any] = {"dataset": _data_name(data), "fingerprint": data.get("fingerprint"),
                           "splits": {}}
    for split in splits:
        if split not in counts:
            continue
        m = metrics.get(split) if isinstance(metrics.get(split), dict) else {}
        per = m.get("per_patient")
        if multilabel:  # counts are each label's positives; an image may have several
            out["splits"][split] = {"images": m.get("n"), "positives_per_label": counts[split],
                                    "patients": None}
            continue
        out["splits"][split] = {"images": sum(counts[split].values()),
                                "per_class": counts[split],
                                "patients": per.get("n") if isinstance(per, dict) else None}
    if "train" in splits:
        out["validation_fraction"] = data.get("val_fraction")
        out["patients_from_file_names"] = bool(data.get("patient_regex"))
        out["skipped_unreadable"] = len(data.get("skipped") or [])
    return out


def _calibration(cfg: dict[str, Any], metrics: dict[str, Any], scored: str | None) -> dict:
    cal = cfg.get("calibration") if isinstance(cfg.get("calibration"), dict) else None
    m = (metrics.get(scored, {}) if scored else {}).get("calibration") or {}
    return {"method": cal.get("method") if cal else "none",
            "temperature": cal.get("temperature") if cal else None,
            "fitted_on": cal.get("fitted_on") if cal else None, "split": scored,
            **{k: m[k] for k in ("ece", "brier", "ece_uncalibrated", "brier_uncalibrated")
               if k in m}}


def _ood(record: dict[str, Any] | None) -> dict[str, Any]:
    if record is None:
        return {"guard": False, "note": "No out-of-distribution detector: every image, of any "
                                        "kind, gets one of the classes without a warning."}
    if isinstance(record.get("members"), list):  # an ensemble's (medtl.transfer.ensemble)
        return {"guard": True, **record,
                "note": "Each member scores an image by its own feature distance to its "
                        "training images over its own threshold; the ensemble's score is the "
                        "highest of them, so an image is flagged (score > 1) when any member "
                        "flags it."}
    tags = [f"{k.replace('_', ' ')} {', '.join(record[k])}" for k in ("modalities", "body_parts")
            if record.get(k)]
    note = (f"Each image's pooled features are scored by their {record.get('method')} distance "
            "to the training images' features and flagged above the "
            f"{_fmt(record.get('percentile'))}th percentile of {record.get('fitted_on')} "
            f"distances (threshold {_fmt(record.get('threshold'))}).")
    if tags:
        note += f" A DICOM whose tags are not the training data's ({'; '.join(tags)}) is flagged."
    return {"guard": True, **record, "note": note}


def _ethics() -> list[str]:
    return [RESEARCH_USE,
            "The card names no image file and no patient; the data is identified by its folder "
            "name and a content fingerprint only.",
            "A model trained on one hospital's or one public data set's images can fail silently "
            "on others; errors may fall unevenly on groups the data under-represents.",
            "Probabilities are model scores, calibrated only as the calibration section says."]


def _caveats(cfg: dict[str, Any], metrics: dict[str, Any], data: dict[str, Any],
             scored: str | None) -> list[str]:
    out = []
    if scored is None:
        out.append("No evaluation figures are recorded for this run (saved from Python without "
                   "a test split): its performance is unknown.")
    elif scored == "val":
        out.append("No test split: the figures are on validation, where thresholds (and "
                   "calibration) were chosen, so they are optimistic.")
    else:
        n = metrics[scored].get("n")
        out.append(f"Test figures come from {n} images split from the same data as training: "
                   "they do not measure performance on other sites, devices or populations "
                   "(no external validation is recorded).")
    overlap = metrics.get("split_overlap")
    if isinstance(overlap, dict) and (overlap.get("shared_patients")
                                      or overlap.get("identical_files")):
        out.append(f"The splits overlap: {overlap.get('shared_patients')} patient(s) in more than "
                   f"one split and {overlap.get('identical_files')} group(s) of identical files "
                   "across splits, so the test figures are optimistic.")
    skipped = len(data.get("skipped") or [])
    if skipped:
        out.append(f"{skipped} unreadable image(s) were skipped in training and evaluation.")
    if data and not data.get("patient_regex"):
        out.append("Patients were not identified: images of one patient may lie in more than "
                   "one split.")
    if _multilabel(cfg):
        out.append("Each label's probability is its own sigmoid, not calibrated (temperature "
                   "scaling is not applied to multi-label runs), and the labels' probabilities "
                   "do not sum to 1.")
    elif cfg.get("calibration") is None and cfg.get("kind") != "ensemble":  # members calibrate
        out.append("No temperature calibration: probabilities may be over- or under-confident "
                   "(see the calibration error).")
    if metrics.get("thresholds") and _multilabel(cfg):
        out.append("Each label's decision threshold was chosen on validation; re-check them on "
                   "local data before any use, as prevalence and image acquisition change them.")
    elif metrics.get("thresholds"):
        out.append("Operating-point thresholds were chosen on validation; re-check them on "
                   "local data before any use, as prevalence and image acquisition change them.")
    return out


def card_markdown(card: dict[str, Any]) -> str:
    """``model-card.md``: the card for a human reader (a clinician, an integrator)."""
    s, d, use = card["summary"], card["model_details"], card["intended_use"]
    w = d["weights"]
    lines = [f"# Model card: {s['model']}", "", f"> **{RESEARCH_USE}**", "",
             f"*{s['line']}*", "", "## Model details", "",
             (f"- Task: {s['task']}; one decision threshold per label"
              if card["metrics"].get("task") == "multi-label"
              else f"- Task: {s['task']}; positive class: {_fmt(s['positive_class'])}"),
             f"- Backbone: {d['backbone']}; strategy: {d['strategy']}; head: {_fmt(d['head'])}",
             f"- Starting weights: {_fmt(w['kind'])} from {_fmt(w['source'])} "
             f"(sha256 {_fmt(w['sha256'])})",
             *([f"- Transfer chain: {_chain_line(w['chain'])}"] if w.get("chain") else []),
             f"- Trained with medtl {d['medtl_version']} on {_fmt(d['trained'])}",
             f"- Input: {_input(d['input'])}", *_ensemble_markdown(card.get("ensemble")),
             "", "## Intended use", "",
             f"**{use['research_use']}**", "", *[f"- {u}" for u in use["primary_uses"]], "",
             "Out of scope:", "", *[f"- {u}" for u in use["out_of_scope"]], "", "## Factors", "",
             f"- Evaluated by: {', '.join(card['factors']['evaluated'])}",
             f"- Not recorded: {', '.join(card['factors']['not_recorded'])}. "
             f"{card['factors']['note']}", "", "## Training and evaluation data", ""]
    train, ev = card["training_data"], card["evaluation_data"]
    multilabel = card["metrics"].get("task") == "multi-label"
    lines += [f"Data set: {_fmt(train['dataset'])} (fingerprint {_fmt(train['fingerprint'])})",
              "", f"| split | images | {'positives per label' if multilabel else 'per class'} "
              "| patients |", "|---|---|---|---|"]
    for split, c in {**train["splits"], **ev["splits"]}.items():
        per = ", ".join(f"{k} {v}" for k, v in
                        c["positives_per_label" if multilabel else "per_class"].items())
        lines.append(f"| {split} | {_fmt(c['images'])} | {per} | {_fmt(c['patients'])} |")
    lines += ["", *(_multilabel_markdown(card) if multilabel else _metrics_markdown(card))]
    return "\n".join(lines + _closing_markdown(card))


def _ensemble_markdown(ens: dict[str, Any] | None) -> list[str]:
    if not ens:
        return []
    lines = ["", "## Ensemble members", "", ens["note"], "",
             "| member | backbone | strategy | head | starting weights | seed |",
             "|---|---|---|---|---|---|"]
    for m in ens["members"]:
        w = m["weights"]
        lines.append(f"| {m['name']} | {_fmt(m['backbone'])} | {_fmt(m['strategy'])} | "
                     f"{_fmt(m['head'])} | {_fmt(w['kind'])} from {_fmt(w['source'])} "
                     f"(sha256 {str(w['sha256'])[:12]}) | {_fmt(m['seed'])} |")
    return lines


def _metrics_markdown(card: dict[str, Any]) -> list[str]:
    lines = ["## Metrics", "",
             f"Confidence intervals: {card['metrics']['confidence_intervals']}.", ""]
    for split, figs in card["quantitative_analyses"].items():
        lines += [f"### {split} (n = {figs['n']})", "", "| metric | value (95 % CI) |",
                  "|---|---|", *[f"| {_NAMES.get(k, k)} | {_ci(figs[k])} |"
                                 for k in _FIGURES if k in figs], ""]
    points = card["metrics"]["decision_thresholds"]["operating_points"]
    split = card["metrics"]["split"]
    if points:
        lines += [f"### Operating points (thresholds chosen on "
                  f"{card['metrics']['decision_thresholds']['chosen_on']})", "",
                  f"| operating point | threshold | figures on {split} |", "|---|---|---|"]
        lines += [f"| {name} | {_fmt(p['threshold'])} | "
                  + ", ".join(f"{_NAMES.get(f, f)} {_fmt(p[f'{split}_{f}'])}"
                              for f in _POINT_FIGURES if f"{split}_{f}" in p)
                  + " |" for name, p in points.items()]
        lines.append("")
    return lines


def _multilabel_markdown(card: dict[str, Any]) -> list[str]:
    metrics = card["metrics"]
    th = metrics["decision_thresholds"]
    fell = th.get("fell_back_to_0.5") or []
    lines = ["## Metrics", "", f"Confidence intervals: {metrics['confidence_intervals']}.", "",
             f"Decision thresholds: one per label, chosen on {_fmt(th['chosen_on'])} by "
             f"{_RULES.get(th['rule'], _fmt(th['rule']))}"
             + (f"; 0.5 for {', '.join(fell)} (validation lacked a positive or a negative)"
                if fell else "") + ". A label is called present when its probability is at "
             "least its threshold.", ""]
    for split, figs in card["quantitative_analyses"].items():
        lines += [f"### {split} (n = {figs['n']})", "", "| metric | value (95 % CI) |",
                  "|---|---|", *[f"| {_NAMES.get(k, k)} | {_ci(figs[k])} |"
                                 for k in _MULTILABEL_FIGURES if k in figs], "",
                  "| label | known (positive) | AUC (95 % CI) | AP | threshold | "
                  "sensitivity (95 % CI) | specificity (95 % CI) |",
                  "|---|---|---|---|---|---|---|"]
        for label, lab in figs["labels"].items():
            lines.append(
                f"| {label} | {_fmt(lab.get('n_known'))} ({_fmt(lab.get('n_positive'))}) | "
                + " | ".join([_ci(lab["auc"]) if "auc" in lab else "not recorded",
                              _fmt(lab.get("average_precision")), _fmt(lab.get("threshold")),
                              *[_ci(lab[k]) if k in lab else "not recorded"
                                for k in ("sensitivity", "specificity")]]) + " |")
        lines.append("")
    return lines


def _closing_markdown(card: dict[str, Any]) -> list[str]:
    cal = card["calibration"]
    return ["## Calibration", "",
            f"- Method: {_fmt(cal['method'])}; temperature: {_fmt(cal['temperature'])}",
            f"- Expected calibration error ({_fmt(cal['split'])}): {_fmt(cal.get('ece'))}; "
            f"Brier score: {_fmt(cal.get('brier'))}", "", "## Out-of-distribution inputs", "",
            card["out_of_distribution"]["note"], "", "## Ethical considerations", "",
            *[f"- {e}" for e in card["ethical_considerations"]], "",
            "## Caveats and recommendations", "",
            *[f"- {c}" for c in card["caveats_and_recommendations"]], "",
            "*Sections after Mitchell et al. 2019, \"Model Cards for Model Reporting\".*", ""]


def _chain_line(chain: list[dict[str, Any]]) -> str:
    """``random -> run:A (data 069557a3d795) -> run:B (data ...)``: each stage by its source,
    a run with the fingerprint of the data it was trained on."""
    def stage(s: dict[str, Any]) -> str:
        notes = [f"self-supervised {_fmt(s['method'])}"] if s.get("method") else []
        if s.get("data_fingerprint"):
            notes.append(f"data {str(s['data_fingerprint'])[:12]}")
        return _fmt(s["source"]) + (f" ({' on '.join(notes)})" if notes else "")

    return " -> ".join(stage(s) for s in chain)


def _input(pre: Any) -> str:
    if not isinstance(pre, dict):
        return "not recorded"
    return (f"{pre.get('size')} x {pre.get('size')} px, {pre.get('channels')} channel(s), "
            f"{pre.get('resize')} resize ({pre.get('interpolation')})")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "not recorded" if v is None else str(v)


def _ci(fig: dict[str, Any]) -> str:
    ci = fig.get("ci95")
    return f"{_fmt(fig['value'])} ({_fmt(ci[0])}-{_fmt(ci[1])})" if ci else _fmt(fig["value"])


__all__ = ["CARD_FORMAT", "RESEARCH_USE", "card_markdown", "model_card"]
