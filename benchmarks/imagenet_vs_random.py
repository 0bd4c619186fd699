"""How much do ImageNet weights add to frozen MobileNetV2 features on Kermany chest X-rays?

For several seeds: a balanced sample of --train-images from the official train split (val carved
by patient from it), the full 624-image official test split, and medtl's hybrid pipeline
(frozen features + standardised logistic regression, C chosen on validation) run twice, with
ImageNet weights and with random weights (the seed also draws the random initialisation).
Prints test AUC per seed and the mean +- sd of the difference; writes
benchmarks/results/imagenet_vs_random.json.

    python benchmarks/imagenet_vs_random.py [--seeds 8] [--train-images 400]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _common import SHARED_DATA, require, save

import medtl
from medtl.data import KERMANY_PATIENT_REGEX


def manifest(root: Path, n_train: int, seed: int, out: Path) -> Path:
    rng = np.random.default_rng(seed)
    rows = ["path,label,split"]
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((root / "train" / cls).glob("*.jpeg"))
        rows += [f"{f},{cls},train" for f in rng.choice(files, n_train // 2, replace=False)]
        rows += [f"{f},{cls},test" for f in sorted((root / "test" / cls).glob("*.jpeg"))]
    out.write_text("\n".join(rows) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--train-images", type=int, default=400)
    args = ap.parse_args()
    root = require(SHARED_DATA / "chest_xray_kermany_224")
    work = Path(tempfile.mkdtemp(prefix="medtl-ivr-"))
    rows = []
    print(f"{'seed':>4}{'ImageNet AUC':>14}{'random AUC':>12}{'difference':>12}")
    for seed in range(args.seeds):
        m = manifest(root, args.train_images, seed, work / f"m{seed}.csv")
        auc = {}
        for w in ("imagenet", "random"):
            run = medtl.train(m, backbone="mobilenet_v2", strategy="hybrid", head="logreg",
                              weights=w, seed=seed, patient_regex=KERMANY_PATIENT_REGEX,
                              out=work / f"{w}{seed}", quiet=True)
            auc[w] = run.metrics["test"]["auc"]
        d = auc["imagenet"] - auc["random"]
        rows.append({"seed": seed, "imagenet_auc": auc["imagenet"], "random_auc": auc["random"],
                     "difference": d})
        print(f"{seed:>4}{auc['imagenet']:>14.3f}{auc['random']:>12.3f}{d:>12.3f}", flush=True)
    diffs = np.array([r["difference"] for r in rows])
    print(f"difference: mean {diffs.mean():.3f}, sd {diffs.std(ddof=1):.3f}, "
          f"min {diffs.min():.3f}, max {diffs.max():.3f}")
    save("imagenet_vs_random", {"train_images": args.train_images, "rows": rows,
                                "mean_difference": float(diffs.mean()),
                                "sd_difference": float(diffs.std(ddof=1))})


if __name__ == "__main__":
    main()
