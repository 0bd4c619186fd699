"""Learning curves on real data (issue 20, point 1): test AUC against labelled images per class
for frozen features, hybrid logistic regression, the prototype head, fine-tuning and full
fine-tuning, and where one strategy overtakes another.

Each budget is drawn by patient from the training pool (Kermany: patients from the file names;
BreastMNIST has none, so each image is its own), nested within a repeat, with validation
carved from the budget (20 %, by patient); every cell is scored once on the official test split.
Trainable strategies cost the most, so every strategy runs at one small image size
(``--image-size``, 64 px by default) with at most ``--epochs`` epochs (early stopping on
validation AUC as always).

    python benchmarks/curve.py kermany [--sizes 10,25,50,100,all] [--repeats 3]
        [--image-size 64] [--epochs 10] [--threads N] [--out /work/bench-runs/curve-kermany]
    python benchmarks/curve.py breastmnist ...

Finished cells in --out are kept (rerun after an interruption). Writes
benchmarks/results/curve-DATASET.json.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

from _common import SHARED_DATA, require, save

DATASETS = {"kermany": "chest_xray_kermany_224", "breastmnist": "breastmnist_28_resaved.npz"}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dataset", choices=sorted(DATASETS))
    ap.add_argument("--sizes", default="10,25,50,100,all")
    ap.add_argument("--strategies",
                    default="feature-extractor,hybrid:logreg,hybrid:prototype,fine-tune,full")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (1 when another benchmark shares the cores)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("MEDTL_OFFLINE", "1")
    from medtl.curve import curve
    from medtl.data import KERMANY_PATIENT_REGEX

    data = require(SHARED_DATA / DATASETS[args.dataset])
    out = Path(args.out or f"/work/bench-runs/curve-{args.dataset}")
    t0 = time.perf_counter()
    curve(data, out=out, sizes=args.sizes, strategies=args.strategies.split(","),
          repeats=args.repeats, image_size=args.image_size, epochs=args.epochs,
          patient_regex=KERMANY_PATIENT_REGEX if args.dataset == "kermany" else None,
          positive_class="PNEUMONIA" if args.dataset == "kermany" else "0",
          **({"threads": args.threads} if args.threads else {}))
    wall = time.perf_counter() - t0
    summary, crossed = _rows(out / "summary.csv"), _rows(out / "crossings.csv")
    print(f"{'strategy':20s} {'size':>5s} {'n/class':>8s} {'test AUC':>9s} "
          f"{'95% over repeats':>17s} {'train s':>8s}")
    for r in summary:
        lo, hi = r["test_auc_ci95_low"], r["test_auc_ci95_high"]
        ci = f"{float(lo):.3f}-{float(hi):.3f}" if lo not in ("", "None") else "-"
        print(f"{r['strategy']:20s} {r['size']:>5s} {float(r['labelled_per_class_mean']):8.1f}"
              f" {float(r['test_auc_mean']):9.3f} {ci:>17s} {float(r['train_s_mean']):8.1f}")
    for c in crossed:
        print(f"{c['overtakes']} overtakes {c['overtaken']} between {c['from_size']} and "
              f"{c['at_size']} per class: paired difference {float(c['auc_difference']):+.3f}")
    print(f"wall time {wall:.0f} s (cells finished before this command are not counted)")
    cells = _rows(out / "curve.csv")
    # wall_s: this command only (cells finished before it are read, not trained again);
    # cells_train_s: every cell's training time, whenever it ran.
    save(f"curve-{args.dataset}", {"summary": summary, "crossings": crossed, "cells": cells,
                                   "wall_s": round(wall, 1),
                                   "cells_train_s": round(sum(float(c["train_s"])
                                                              for c in cells), 1)})


if __name__ == "__main__":
    main()
