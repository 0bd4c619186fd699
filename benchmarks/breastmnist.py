"""BreastMNIST (MedMNIST v2): every transfer strategy on the official 546 / 78 / 156 split.

    python benchmarks/breastmnist.py [--backbone mobilenet_v2] [--image-size 128]
                                     [--strategies S,...] [--seeds 1] [--out DIR]

The 28x28 ultrasound images are upsampled (bilinear) to --image-size, every strategy is trained
on train, chooses its hyper-parameters and epoch on the official val split, and is scored on the
official test split. Ultrasound has no laterality, so horizontal flips stay on. Prints test AUC
and accuracy per run beside the MedMNIST v2 table (Yang et al. 2023) and writes
benchmarks/results/breastmnist.json (breastmnist_BACKBONE_SIZE.json for other settings) after
every run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import SHARED_DATA, require, save

import medtl

STRATEGIES = {
    "feature-extractor": {"strategy": "feature-extractor"},
    "hybrid:logreg": {"strategy": "hybrid", "head": "logreg"},
    "hybrid:svm": {"strategy": "hybrid", "head": "svm"},
    "hybrid:rf": {"strategy": "hybrid", "head": "rf"},
    "hybrid:knn": {"strategy": "hybrid", "head": "knn"},
    "fine-tune": {"strategy": "fine-tune", "unfreeze": 2},
    "fine-tune:gradual": {"strategy": "fine-tune", "gradual": True, "epochs": 5},
    "full": {"strategy": "full", "epochs": 30, "patience": 8},
    "scratch": {"strategy": "scratch", "epochs": 30, "patience": 8},
    "truncated": {"strategy": "truncated", "epochs": 30, "patience": 8},
    "auto": {"strategy": "auto", "epochs": 5},
}
MEDMNIST = [  # test AUC / ACC, Yang et al., Scientific Data 2023, Table 3
    ("ResNet-18 (28)", 0.901, 0.863), ("ResNet-18 (224)", 0.891, 0.833),
    ("ResNet-50 (28)", 0.857, 0.812), ("ResNet-50 (224)", 0.866, 0.842),
    ("auto-sklearn", 0.836, 0.803), ("AutoKeras", 0.871, 0.831),
    ("Google AutoML Vision", 0.919, 0.861),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    data = require(SHARED_DATA / "breastmnist_28_resaved.npz")
    out = args.out or Path(tempfile.mkdtemp(prefix="medtl-breastmnist-"))
    os.environ["MEDTL_CACHE_DIR"] = str(out / "cache")
    default = args.backbone == "mobilenet_v2" and args.image_size == 128
    name_json = "breastmnist" if default else f"breastmnist_{args.backbone}_{args.image_size}"
    rows = []
    print(f"{'run':<30}{'seed':>5}{'AUC':>7}{'ACC':>7}{'train s':>9}{'trainable':>11}")
    for name in args.strategies.split(","):
        for seed in range(args.seeds):
            opts = {"backbone": args.backbone, "image_size": args.image_size, **STRATEGIES[name]}
            t0 = time.perf_counter()
            run = medtl.train(data, seed=seed, out=out / f"{name.replace(':', '-')}-{seed}",
                              overwrite=True, quiet=True, **opts)
            wall = time.perf_counter() - t0
            t = run.metrics["test"]
            rows.append({"run": name, "seed": seed, "options": opts, "auc": t["auc"],
                         "accuracy": t["accuracy"], "val_auc": run.metrics["val"]["auc"],
                         "wall_s": wall, "train_s": run.metrics["timing"]["train_s"],
                         "trainable_params": run.metrics["params"]["trainable"],
                         "stages": run.config.get("stages")})
            print(f"{name:<30}{seed:>5}{t['auc']:>7.3f}{t['accuracy']:>7.3f}{wall:>9.1f}"
                  f"{run.metrics['params']['trainable']:>11,}", flush=True)
            save(name_json, {"rows": rows, "reference_medmnist_v2": MEDMNIST})
    if args.seeds > 1:
        print("\nmean over seeds")
        for name in args.strategies.split(","):
            aucs = [r["auc"] for r in rows if r["run"] == name]
            accs = [r["accuracy"] for r in rows if r["run"] == name]
            print(f"{name:<30}{statistics.mean(aucs):>12.3f}{statistics.mean(accs):>7.3f}")
    print("\nMedMNIST v2 (test AUC / ACC)")
    for ref, auc, acc in MEDMNIST:
        print(f"{ref:<30}{'':>5}{auc:>7.3f}{acc:>7.3f}")


if __name__ == "__main__":
    main()
