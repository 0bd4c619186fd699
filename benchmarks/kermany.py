"""Kermany chest X-rays (Kermany et al., Cell 2018): transfer runs on the full official train
split (validation carved by patient), scored on the official 624-image test split.

    python benchmarks/kermany.py [--runs mobilenet_v2:hybrid:logreg,...] [--out DIR]

Prints test AUC, accuracy, sensitivity (pneumonia), specificity and wall time per run, next to
the paper's Inception-v3 (ACC 92.8 %, sens 93.2 %, spec 90.1 %, AUC 0.968), and writes
benchmarks/results/kermany.json. Each run's directory is kept under --out for inspection.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import SHARED_DATA, require, save

import medtl
from medtl.data import KERMANY_PATIENT_REGEX

DEFAULT_RUNS = ",".join(
    f"{bb}:{s}" for bb in ("mobilenet_v2", "efficientnet_lite0")
    for s in ("feature-extractor", "hybrid:logreg", "hybrid:svm"))
PAPER = {"run": "Kermany et al. 2018, Inception-v3 fine-tuned", "auc": 0.968, "accuracy": 0.928,
         "sensitivity": 0.932, "specificity": 0.901}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=DEFAULT_RUNS,
                    help="comma-separated backbone:strategy[:head]")
    ap.add_argument("--out", type=Path, default=None, help="where run directories go")
    args = ap.parse_args()
    data = require(SHARED_DATA / "chest_xray_kermany_224")
    out = args.out or Path(tempfile.mkdtemp(prefix="medtl-kermany-"))
    # A fresh feature cache, so the first run of each backbone pays for its features and the
    # wall times are honest; later runs of the same backbone reuse them, as a user's would.
    os.environ["MEDTL_CACHE_DIR"] = str(out / "cache")
    rows = []
    print(f"{'run':<42}{'AUC':>7}{'ACC':>7}{'sens':>7}{'spec':>7}{'wall s':>9}")
    for spec in args.runs.split(","):
        backbone, strategy, *head = spec.split(":")
        t0 = time.perf_counter()
        run = medtl.train(data, backbone=backbone, strategy=strategy,
                          head=head[0] if head else "logreg", weights="imagenet",
                          patient_regex=KERMANY_PATIENT_REGEX, out=out / spec.replace(":", "-"),
                          overwrite=True, quiet=True)
        wall = time.perf_counter() - t0
        t = run.metrics["test"]
        row = {"run": spec, "auc": t["auc"], "accuracy": t["accuracy"],
               "sensitivity": t["sensitivity"], "specificity": t["specificity"],
               "n_test": t["n"], "n_train": run.config["data"]["counts"]["train"],
               "wall_s": wall, "feature_s": run.metrics["timing"]["feature_s"],
               "engine": run.metrics["timing"]["engine"],
               "trainable_params": run.metrics["params"]["trainable"],
               "head_params": run.config.get("head_params"), "run_dir": str(run.path)}
        rows.append(row)
        print(f"{spec:<42}{t['auc']:>7.3f}{t['accuracy']:>7.3f}{t['sensitivity']:>7.3f}"
              f"{t['specificity']:>7.3f}{wall:>9.1f}", flush=True)
    p = PAPER
    print(f"{p['run']:<42}{p['auc']:>7.3f}{p['accuracy']:>7.3f}{p['sensitivity']:>7.3f}"
          f"{p['specificity']:>7.3f}")
    save("kermany", {"rows": rows, "reference": PAPER})


if __name__ == "__main__":
    main()
