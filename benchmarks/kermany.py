"""Kermany chest X-rays (Kermany et al., Cell 2018): transfer runs on the full official train
split (validation carved by patient), scored on the official 624-image test split.

    python benchmarks/kermany.py [--suite frozen|trainable] [--runs SPEC,...] [--out DIR]

``frozen`` (default): feature-extractor and hybrid heads at each backbone's own input size;
writes benchmarks/results/kermany.json. ``trainable``: fine-tune --gradual, full and auto at
160 px (the size that keeps every run within 45 minutes on a 2-core CPU), no horizontal flips
(chest X-ray laterality), basic augmentation; writes benchmarks/results/kermany_trainable.json
after every run, so an interrupted suite keeps what it finished; with --runs, only those runs'
rows are replaced. A SPEC is
``backbone:strategy[:head]``, where strategy may be one of the trainable presets below.

Prints test AUC, accuracy, sensitivity (pneumonia), specificity and wall time per run, next to
the paper's Inception-v3 (ACC 92.8 %, sens 93.2 %, spec 90.1 %, AUC 0.968). Each run's directory
is kept under --out for inspection.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _common import RESULTS, SHARED_DATA, require, save

import medtl
from medtl.data import KERMANY_PATIENT_REGEX

BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
SUITES = {
    "frozen": [f"{bb}:{s}" for bb in BACKBONES
               for s in ("feature-extractor", "hybrid:logreg", "hybrid:svm")],
    "trainable": [f"{bb}:{s}" for bb in BACKBONES for s in ("auto", "full", "gradual")],
}
TRAINABLE_SIZE = 160
# The reviews' fine-tuning: the top blocks, one more per stage (here at most 4 of 9); auto
# may climb to every block; full trains every layer from the start.
PRESETS = {
    "gradual": {"strategy": "fine-tune", "gradual": True, "unfreeze": 4, "epochs": 3},
    "auto": {"strategy": "auto", "epochs": 3},
    "full": {"strategy": "full", "epochs": 6},
    # Not in the default suite: the same at the backbones' own 224 px, for as long as 45
    # minutes allow on this CPU.
    "full224": {"strategy": "full", "epochs": 10, "image_size": 224},
}
TRAINABLE_COMMON = {"image_size": TRAINABLE_SIZE, "hflip": False, "augment": "basic"}
PAPER = {"run": "Kermany et al. 2018, Inception-v3 fine-tuned", "auc": 0.968, "accuracy": 0.928,
         "sensitivity": 0.932, "specificity": 0.901}


def options(spec: str) -> dict:
    backbone, strategy, *head = spec.split(":")
    if strategy in PRESETS:
        return {"backbone": backbone, **TRAINABLE_COMMON, **PRESETS[strategy]}
    return {"backbone": backbone, "strategy": strategy, "head": head[0] if head else "logreg"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="frozen")
    ap.add_argument("--runs", default=None, help="comma-separated specs (default: the suite's)")
    ap.add_argument("--out", type=Path, default=None, help="where run directories go")
    args = ap.parse_args()
    data = require(SHARED_DATA / "chest_xray_kermany_224")
    out = args.out or Path(tempfile.mkdtemp(prefix="medtl-kermany-"))
    # A fresh feature cache, so the first run of each backbone pays for its features and the
    # wall times are honest; later runs of the same backbone reuse them, as a user's would.
    os.environ["MEDTL_CACHE_DIR"] = str(out / "cache")
    specs = args.runs.split(",") if args.runs else SUITES[args.suite]
    result_name = "kermany" if args.suite == "frozen" else "kermany_trainable"
    rows = []
    previous = RESULTS / f"{result_name}.json"
    if args.runs and previous.exists():
        # A partial re-run replaces its own rows and keeps the suite's others.
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["run"] not in specs]
    print(f"{'run':<42}{'AUC':>7}{'ACC':>7}{'sens':>7}{'spec':>7}{'wall s':>9}")
    for spec in specs:
        opts = options(spec)
        t0 = time.perf_counter()
        run = medtl.train(data, weights="imagenet", patient_regex=KERMANY_PATIENT_REGEX,
                          out=out / spec.replace(":", "-"), overwrite=True, quiet=True, **opts)
        wall = time.perf_counter() - t0
        t = run.metrics["test"]
        row = {"run": spec, "options": opts, "auc": t["auc"], "accuracy": t["accuracy"],
               "sensitivity": t["sensitivity"], "specificity": t["specificity"],
               "n_test": t["n"], "n_train": run.config["data"]["counts"]["train"],
               "wall_s": wall, "feature_s": run.metrics["timing"]["feature_s"],
               "engine": run.metrics["timing"]["engine"],
               "trainable_params": run.metrics["params"]["trainable"],
               "total_params": run.metrics["params"]["total"],
               "val_auc": run.metrics["val"]["auc"],
               "head_params": run.config.get("head_params"),
               "stages": run.config.get("stages"), "run_dir": str(run.path),
               "operating_points": t.get("operating_points"),
               "auc_ci95": t.get("auc_ci95"), "accuracy_ci95": t.get("accuracy_ci95")}
        rows.append(row)
        print(f"{spec:<42}{t['auc']:>7.3f}{t['accuracy']:>7.3f}{t['sensitivity']:>7.3f}"
              f"{t['specificity']:>7.3f}{wall:>9.1f}", flush=True)
        for s in row["stages"] or []:
            print(f"    stage {s['stage']:<20} val AUC {s['val_auc']:.4f} {s['epochs']:>3} ep "
                  f"{s['seconds']:>7.1f} s  {'kept' if s['accepted'] else 'undone'}", flush=True)
        save(result_name, {"rows": rows, "reference": PAPER})
    p = PAPER
    print(f"{p['run']:<42}{p['auc']:>7.3f}{p['accuracy']:>7.3f}{p['sensitivity']:>7.3f}"
          f"{p['specificity']:>7.3f}")


if __name__ == "__main__":
    main()
