"""The reviews' grid with `medtl bench`: offline ImageNet backbones x transfer approaches.

    python benchmarks/grid.py [--data breastmnist|kermany] [--seeds 3] [--image-size 64]
                              [--trainable-epochs N] [--jobs 1] [--out DIR]

BreastMNIST (default): mobilenet_v2, efficientnet_lite0..2 x feature-extractor, hybrid
(logistic regression), fine-tune, full, scratch, 3 seeds, on the official split. Kermany: the
same grid at one seed (--data kermany --seeds 1 --trainable-epochs 4: ten times BreastMNIST's
images, so fewer epochs; the frozen heads keep their defaults). Prints the leaderboard (mean and
sd over seeds per cell) and the wall time, and writes benchmarks/results/grid_<data>.json. The
bench directory (cells, leaderboard.csv, report.html) stays under --out; rerunning with the same
--out resumes.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _common import SHARED_DATA, require, save

from medtl.bench import bench
from medtl.data import KERMANY_PATIENT_REGEX

BACKBONES = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
STRATEGIES = ("feature-extractor", "hybrid:logreg", "fine-tune", "full", "scratch")
TRAINABLE = ("fine-tune", "full", "scratch")
DATA = {"breastmnist": "breastmnist_28_resaved.npz", "kermany": "chest_xray_kermany_224"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=sorted(DATA), default="breastmnist")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help="a part of the grid (default: all of it); finished cells are kept")
    ap.add_argument("--trainable-epochs", type=int, default=None,
                    help="cap the epochs of fine-tune, full and scratch cells (default: theirs)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    data = require(SHARED_DATA / DATA[args.data])
    out = args.out or Path(tempfile.mkdtemp(prefix=f"medtl-grid-{args.data}-"))
    os.environ.setdefault("MEDTL_CACHE_DIR", str(out / "cache"))
    extra = {"patient_regex": KERMANY_PATIENT_REGEX, "hflip": False} \
        if args.data == "kermany" else {}
    common = dict(backbones=BACKBONES, seeds=args.seeds, out=out, jobs=args.jobs,
                  image_size=args.image_size, quiet=True, **extra)
    t0 = time.perf_counter()
    strategies = args.strategies.split(",")
    trainable = [s for s in strategies if s in TRAINABLE]
    if args.trainable_epochs and trainable:
        # The trainable cells first, with the cap; the whole grid then finds them finished and
        # runs only the frozen cells, whose head epochs must not be capped.
        bench(data, strategies=trainable, epochs=args.trainable_epochs, **common)
    bench(data, strategies=strategies, **common)
    wall = time.perf_counter() - t0
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r["backbone"], r["strategy"] + (f":{r['head']}" if r["head"] else ""))].append(r)
    summary = []
    for (backbone, strategy), rs in cells.items():
        aucs = [float(r["auc"]) for r in rs]
        accs = [float(r["accuracy"]) for r in rs]
        summary.append({"backbone": backbone, "strategy": strategy, "seeds": len(rs),
                        "auc_mean": statistics.mean(aucs),
                        "auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else None,
                        "accuracy_mean": statistics.mean(accs),
                        "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else None,
                        "train_s_mean": statistics.mean(float(r["train_s"]) for r in rs),
                        "trainable_params": int(rs[0]["trainable_params"])})
    summary.sort(key=lambda s: -s["auc_mean"])
    print(f"{'backbone':<20}{'strategy':<20}{'AUC':>14}{'ACC':>14}{'train s':>9}")
    for s in summary:
        sd = f"±{s['auc_sd']:.3f}" if s["auc_sd"] is not None else ""
        asd = f"±{s['accuracy_sd']:.3f}" if s["accuracy_sd"] is not None else ""
        print(f"{s['backbone']:<20}{s['strategy']:<20}{s['auc_mean']:>8.3f}{sd:<6}"
              f"{s['accuracy_mean']:>8.3f}{asd:<6}{s['train_s_mean']:>9.1f}")
    print(f"wall time {wall:.0f} s for {len(rows)} cells ({out})")
    save(f"grid_{args.data}", {"image_size": args.image_size, "seeds": args.seeds,
                               "trainable_epochs": args.trainable_epochs,
                               "wall_s": wall, "summary": summary, "cells": rows})


if __name__ == "__main__":
    main()
