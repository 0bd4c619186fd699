"""Kermany's chest X-rays as three classes (normal / bacterial / viral) and as two labels
{pneumonia, viral}, against Kermany et al. 2018's bacterial-vs-viral result (issue 21).

    python benchmarks/kermany_labels.py [--recipes hybrid,fine-tune] [--seeds 0,1,2]
        [--runs /work/bench-runs/kermany_labels] [--threads 1] [--two-label] [--out FILE]

The manifests come from ``scripts/kermany_labels.py`` (written to RUNS/data, pointing at the
images of ../shared/data; the official train/test split, validation carved from train by
patient by ``medtl.train``). Each recipe and seed is one ``medtl.train`` run under RUNS; a run
already there is read, not trained again (so a later call can add seeds or the other part).

**Three classes** (default): trains on three_class.csv and prints the run's own test figures
(metrics.json: macro one-vs-rest AUC with its bootstrap CI, accuracy, per-class AUC), then
scores the anchor's task, bacterial vs viral, on the test images whose truth is bacterial or
viral (242 + 148): score ``s = prob_viral / (prob_bacterial + prob_viral)`` (the model's
choice between the two causes, whatever it thinks of "normal"), AUC with DeLong's 95 % CI
(medtl.evaluation.stats), and accuracy, sensitivity and specificity at the threshold maximising
Youden's J on the VALIDATION split's bacterial and viral images, applied unchanged to test
(Wilson 95 % intervals). Also pneumonia vs normal with ``prob_bacterial + prob_viral``, the
same way, against the paper's other anchor.

**Positive class.** The paper (Cell 172:1122, 2018) reports "a test accuracy of 90.7 %, with a
sensitivity of 88.6 % and a specificity of 90.9 %" and an AUC of 94.0 % "for distinguishing
bacterial and viral pneumonia" without naming the positive class (its Figure 6 caption says
"detecting bacterial versus viral pneumonia"), and no confusion matrix on its 242 bacterial /
148 viral test images reproduces all three figures under either convention (accuracy must lie
between sensitivity and specificity weighted by class size: 89.5 % with bacterial positive,
90.0 % with viral positive, not 90.7 %). So the anchor's convention is unknown; here **viral
is positive**, and with bacterial positive sensitivity and specificity swap (AUC, Youden's
threshold and accuracy are the same either way). The anchor is a binary model trained on the
two causes only; here it is a three-class (or two-label) model restricted to them.

**Two labels** (``--two-label``; needs medtl's multi-label pipeline): trains on two_label.csv
(``--labels pneumonia,viral``) with the same recipes and reads the per-label figures of
metrics.json ``test.labels`` (AUC and DeLong CI, sensitivity and specificity with CIs at the
label's validation threshold, average precision) and ``macro_auc``, ``micro_auc``, ``map``;
then the anchor's task from predictions.csv: the pneumonia images' ``prob_viral``, its
threshold chosen on validation's pneumonia images as above.

Recipes (MobileNetV2, ImageNet weights, 224 px): ``hybrid`` (frozen features, logistic
regression; cheap with the feature cache), ``feature-extractor`` (frozen features, linear
head), ``fine-tune`` (top two blocks, ``--frozen-cache 4``, no flips: chest X-ray laterality).
The feature cache lives in RUNS/cache, empty at the first call, so the first frozen run pays
for extracting the features and the wall times are honest.

Writes benchmarks/results/kermany_labels.json (``--two-label``: kermany_labels_two_label.json)
after every run, so an interrupted call keeps what it finished.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, ROOT, SHARED_DATA, machine, require

KERMANY = SHARED_DATA / "chest_xray_kermany_224"
RECIPES: dict[str, dict[str, Any]] = {
    "hybrid": {"strategy": "hybrid", "head": "logreg", "image_size": 224},
    "feature-extractor": {"strategy": "feature-extractor", "image_size": 224},
    "fine-tune": {"strategy": "fine-tune", "unfreeze": 2, "frozen_cache": 4, "hflip": False,
                  "image_size": 224},
}
ANCHOR = {"run": "Kermany et al. 2018, Inception-v3 fine-tuned (binary model)",
          "task": "bacterial vs viral, 242 + 148 test images", "positive": "not stated",
          "auc": 0.940, "accuracy": 0.907, "sensitivity": 0.886, "specificity": 0.909}
ANCHOR_PNEUMONIA = {"run": "Kermany et al. 2018, Inception-v3 fine-tuned (binary model)",
                    "task": "pneumonia vs normal, 390 + 234 test images", "positive": "pneumonia",
                    "auc": 0.968, "accuracy": 0.928, "sensitivity": 0.932, "specificity": 0.901}
LABELS = ("pneumonia", "viral")


def wilson(k: int, n: int) -> list[float] | None:
    """95 % Wilson interval of k successes in n trials (None when n is 0)."""
    if n == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def binary_task(y_val: np.ndarray, s_val: np.ndarray, y_test: np.ndarray,
                s_test: np.ndarray) -> dict[str, Any]:
    """Test AUC (DeLong CI) and the test figures at validation's Youden threshold."""
    from sklearn.metrics import roc_auc_score

    from medtl.evaluation import stats

    t = stats.youden_threshold(y_val, s_val)
    op = stats.operating_point(y_test, s_test, t)
    n_pos, n_neg = op["tp"] + op["fn"], op["tn"] + op["fp"]
    correct = op["tp"] + op["tn"]
    return {
        "n_val": [int(y_val.sum()), int(len(y_val) - y_val.sum())],  # positives, negatives
        "n_test": [n_pos, n_neg],
        "val_auc": float(roc_auc_score(y_val, s_val)),
        "auc": float(roc_auc_score(y_test, s_test)),
        "auc_ci95": stats.auc_ci_delong(y_test, s_test),
        "threshold": t, "threshold_chosen_on": "val (Youden's J)",
        "accuracy": correct / (n_pos + n_neg), "accuracy_ci95": wilson(correct, n_pos + n_neg),
        "sensitivity": op["sensitivity"], "sensitivity_ci95": wilson(op["tp"], n_pos),
        "specificity": op["specificity"], "specificity_ci95": wilson(op["tn"], n_neg),
        "tp": op["tp"], "fn": op["fn"], "tn": op["tn"], "fp": op["fp"],
    }


def by_split(rows: list[dict[str, str]], keep, truth, score) -> dict[str, tuple]:
    out = {}
    for split in ("val", "test"):
        chosen = [r for r in rows if r["split"] == split and keep(r)]
        out[split] = (np.array([truth(r) for r in chosen], dtype=np.int64),
                      np.array([score(r) for r in chosen], dtype=np.float64))
    return out


def viral_share(r: dict[str, str]) -> float:
    pb, pv = float(r["prob_bacterial"]), float(r["prob_viral"])
    # Both underflowing to 0 means the model is certain of "normal": no preference between
    # the two causes.
    return pv / (pb + pv) if pb + pv > 0 else 0.5


def three_class_tasks(rows: list[dict[str, str]]) -> dict[str, Any]:
    bv = by_split(rows, lambda r: r["label"] in ("bacterial", "viral"),
                  lambda r: r["label"] == "viral", viral_share)
    pn = by_split(rows, lambda r: True, lambda r: r["label"] != "normal",
                  lambda r: float(r["prob_bacterial"]) + float(r["prob_viral"]))
    return {"bacterial_vs_viral": binary_task(*bv["val"], *bv["test"]),
            "pneumonia_vs_normal": binary_task(*pn["val"], *pn["test"])}


def present(value: str) -> bool:
    """A truth cell of a multi-label predictions.csv: 1 (or 1.0) present; 0 or blank not."""
    return bool(value.strip()) and float(value) == 1.0


def two_label_tasks(rows: list[dict[str, str]]) -> dict[str, Any]:
    bv = by_split(rows, lambda r: present(r["pneumonia"]), lambda r: present(r["viral"]),
                  lambda r: float(r["prob_viral"]))
    return {"bacterial_vs_viral": binary_task(*bv["val"], *bv["test"])}


def three_class_metrics(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "auc", "auc_ci95", "auc_weighted", "accuracy", "accuracy_ci95",
            "balanced_accuracy", "balanced_accuracy_ci95", "sensitivity", "specificity", "f1")
    out = {k: m.get(k) for k in keys}
    out["per_class_auc"] = {c: v.get("auc") for c, v in (m.get("per_class") or {}).items()}
    return out


def two_label_metrics(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "macro_auc", "macro_auc_ci95", "micro_auc", "micro_auc_ci95", "map",
            "map_ci95")
    per_label = ("n_known", "n_positive", "auc", "auc_ci95", "average_precision", "threshold",
                 "sensitivity", "sensitivity_ci95", "specificity", "specificity_ci95")
    out = {k: m.get(k) for k in keys}
    out["labels"] = {lab: {k: v.get(k) for k in per_label}
                     for lab, v in (m.get("labels") or {}).items()}
    return out


def pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}"


def ci(c: list[float] | None, scale: float = 1.0, digits: int = 1) -> str:
    return "" if not c else f"({scale * c[0]:.{digits}f}-{scale * c[1]:.{digits}f})"


def print_binary(name: str, b: dict[str, Any]) -> None:
    print(f"  {name:<26} AUC {b['auc']:.3f} {ci(b['auc_ci95'], digits=3)}  "
          f"acc {pct(b['accuracy'])} {ci(b['accuracy_ci95'], 100)}  "
          f"sens {pct(b['sensitivity'])} {ci(b['sensitivity_ci95'], 100)}  "
          f"spec {pct(b['specificity'])} {ci(b['specificity_ci95'], 100)}  "
          f"[t={b['threshold']:.3f} on val, val AUC {b['val_auc']:.3f}]", flush=True)


def print_anchor(name: str, a: dict[str, Any]) -> None:
    print(f"  {name:<26} AUC {a['auc']:.3f}                acc {pct(a['accuracy'])}"
          f"              sens {pct(a['sensitivity'])}              "
          f"spec {pct(a['specificity'])}")


def summarise(rows: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """Mean and sd over seeds of each recipe's figures on ``task``."""
    out: dict[str, Any] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        figs = [r["tasks"][task] for r in rows if r["recipe"] == recipe]
        out[recipe] = {"seeds": len(figs)}
        for k in ("auc", "accuracy", "sensitivity", "specificity"):
            vals = [f[k] for f in figs]
            out[recipe][k] = {"mean": statistics.fmean(vals),
                              "sd": statistics.stdev(vals) if len(vals) > 1 else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="hybrid",
                    help=f"comma-separated, of {', '.join(RECIPES)} (default hybrid)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--runs", type=Path, default=Path("/work/bench-runs/kermany_labels"),
                    help="where the manifests, the feature cache and the runs go")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per run")
    ap.add_argument("--two-label", action="store_true",
                    help="the two-label part (needs medtl's multi-label pipeline)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: "
                    "benchmarks/results/kermany_labels[_two_label].json)")
    args = ap.parse_args()
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    os.environ.setdefault("MEDTL_OFFLINE", "1")
    os.environ["MEDTL_CACHE_DIR"] = str(args.runs / "cache")
    import medtl
    from medtl.run import Run, is_run

    data = require(KERMANY)
    t_all = time.perf_counter()
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "kermany_labels.py"),
                           str(data), str(args.runs / "data")],
                          capture_output=True, text=True, check=False)
    print(made.stdout, end="")
    if made.returncode:
        sys.exit(f"scripts/kermany_labels.py failed: {made.stderr.strip()}")
    part = "two_label" if args.two_label else "three_class"
    manifest = args.runs / "data" / f"{part}.csv"
    out_json = args.out or RESULTS / ("kermany_labels_two_label.json" if args.two_label
                                      else "kermany_labels.json")
    load = {"labels": list(LABELS)} if args.two_label else {}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
    record: dict[str, Any] = {
        "machine": machine(), "command": " ".join(sys.argv), "git_head": head,
        "medtl_source": str(Path(medtl.__file__).parent), "part": part,
        "manifest_counts": made.stdout, "anchor": ANCHOR, "anchor_pneumonia": ANCHOR_PNEUMONIA,
        "positive": "viral (the anchor's convention is not stated)", "rows": []}
    previous: dict[tuple[str, int], dict[str, Any]] = {}
    if out_json.exists():  # keep the rows of recipes and seeds this call does not redo
        old = json.loads(out_json.read_text())
        previous = {(r["recipe"], r["seed"]): r for r in old.get("rows", [])}
        record["rows"] = [r for r in old.get("rows", [])
                          if not (r["recipe"] in recipes and r["seed"] in seeds)]
    for recipe in recipes:
        for seed in seeds:
            out = args.runs / part / f"{recipe}-seed{seed}"
            t0 = time.perf_counter()
            trained_now = not is_run(out)
            if trained_now:
                run = medtl.train(manifest, out=out, overwrite=True, quiet=True, seed=seed,
                                  threads=args.threads, paths="absolute", **load,
                                  **RECIPES[recipe])
            else:
                run = Run(out)
            wall = time.perf_counter() - t0 if trained_now else None
            m = run.metrics
            with open(run.path / "predictions.csv", newline="") as fh:
                preds = list(csv.DictReader(fh))
            tasks = two_label_tasks(preds) if args.two_label else three_class_tasks(preds)
            figures = (two_label_metrics(m["test"]) if args.two_label
                       else three_class_metrics(m["test"]))
            row = {"recipe": recipe, "seed": seed, "options": RECIPES[recipe],
                   "command": " ".join(sys.argv),
                   "run_dir": str(run.path), "trained_now": trained_now, "wall_s": wall,
                   "timing": m.get("timing"), "val_auc": m["val"].get("auc"),
                   "split_overlap": m.get("split_overlap"), "test": figures, "tasks": tasks}
            before = previous.get((recipe, seed))
            if not trained_now and before and before.get("run_dir") == str(run.path):
                # A run read again keeps the wall time and command of the call that trained it.
                row.update({k: before[k] for k in ("wall_s", "trained_now", "command")
                            if k in before})
            record["rows"] = [r for r in record["rows"]
                              if (r["recipe"], r["seed"]) != (recipe, seed)] + [row]
            timing = m.get("timing") or {}
            print(f"\n{recipe} seed {seed}: "
                  + (f"wall {wall:.0f} s" if wall is not None else "read from the run")
                  + f" (train {timing.get('train_s', 0):.0f} s, features "
                  f"{timing.get('feature_s', 0):.0f} s), val AUC {row['val_auc']:.4f}")
            if args.two_label:
                f = figures
                print(f"  macro AUC {f['macro_auc']:.3f} {ci(f.get('macro_auc_ci95'), digits=3)}"
                      f"  micro AUC {f['micro_auc']:.3f}  mAP {f['map']:.3f}")
                for lab, v in f["labels"].items():
                    print(f"  label {lab:<10} AUC {v['auc']:.3f} {ci(v['auc_ci95'], digits=3)}"
                          f"  sens {pct(v['sensitivity'])} {ci(v['sensitivity_ci95'], 100)}"
                          f"  spec {pct(v['specificity'])} {ci(v['specificity_ci95'], 100)}"
                          f"  AP {v['average_precision']:.3f}  [t={v['threshold']:.3f}]")
            else:
                f = figures
                print(f"  three classes: macro AUC {f['auc']:.3f} {ci(f['auc_ci95'], digits=3)}"
                      f"  accuracy {pct(f['accuracy'])} {ci(f['accuracy_ci95'], 100)}  "
                      f"balanced {pct(f['balanced_accuracy'])}  per-class AUC "
                      + ", ".join(f"{c} {a:.3f}" for c, a in f["per_class_auc"].items()))
            for task, b in tasks.items():
                print_binary(task.replace("_", " "), b)
            print_anchor("anchor: bacterial vs viral", ANCHOR)
            if "pneumonia_vs_normal" in tasks:
                print_anchor("anchor: pneumonia vs normal", ANCHOR_PNEUMONIA)
            record["summary"] = {t: summarise(record["rows"], t)
                                 for t in record["rows"][0]["tasks"]}
            record["wall_s_this_call"] = time.perf_counter() - t_all
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(record, indent=2) + "\n")
    print("\nmean (sd) over seeds, bacterial vs viral, viral positive:")
    for recipe, s in record["summary"]["bacterial_vs_viral"].items():
        print(f"  {recipe:<18} {s['seeds']} seed(s): " + "  ".join(
            f"{k} {s[k]['mean']:.3f}" + (f" ({s[k]['sd']:.3f})" if s[k]["sd"] is not None
                                        else "")
            for k in ("auc", "accuracy", "sensitivity", "specificity")))
    print(f"wrote {out_json} ({time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
