"""``fine-tune --frozen-cache K`` against plain fine-tuning: wall time and accuracy.

BreastMNIST (official split), MobileNetV2 ImageNet weights, ``fine-tune --unfreeze 2`` (the
top two blocks at discriminative rates, the reviews' recipe), ``--augment basic``, 20 epochs with
early stopping on validation, at ``--size`` px, over ``--seeds``: plain (the frozen blocks run
every step, fresh augmentation every epoch) against ``--frozen-cache K`` (the frozen blocks run
once for K versions of each image). Each is a complete ``medtl train`` run (what is chosen is
chosen on validation); reported: training seconds, validation AUC, test AUC with its 95 % CI.

    python benchmarks/frozen_cache.py [--seeds 0,1,2] [--copies 4] [--size 128]
        [--runs /work/bench-runs/frozen_cache]

Runs already in --runs are read, not trained again. Writes benchmarks/results/frozen_cache.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from _common import SHARED_DATA, require, save

BREAST = SHARED_DATA / "breastmnist_28_resaved.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--runs", default="/work/bench-runs/frozen_cache")
    args = ap.parse_args()
    os.environ.setdefault("MEDTL_OFFLINE", "1")
    from medtl.run import Run, is_run
    from medtl.workflow import train

    data = require(BREAST)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, cache in (("plain", 0), (f"frozen-cache {args.copies}", args.copies)):
            out = Path(args.runs) / f"seed{seed}-{'plain' if not cache else f'cache{cache}'}"
            if not (is_run(out) and (out / "config.json").is_file()):
                t0 = time.perf_counter()
                train(data, strategy="fine-tune", unfreeze=2, augment="basic", epochs=20,
                      image_size=args.size, seed=seed, frozen_cache=cache, quiet=True,
                      out=out, overwrite=True)
                print(f"  trained {out.name} in {time.perf_counter() - t0:.0f} s", flush=True)
            run = Run(out)
            m = run.metrics
            row = {"recipe": name, "seed": seed, "train_s": m["timing"]["train_s"],
                   "feature_s": m["timing"].get("feature_s"), "val_auc": m["val"]["auc"],
                   "test_auc": m["test"]["auc"], "test_auc_ci95": m["test"]["auc_ci95"],
                   "epochs": len((out / "history.csv").read_text().splitlines()) - 1}
            rows.append(row)
            print(f"  seed {seed} {name:>16}: train {row['train_s']:.0f} s, val AUC "
                  f"{row['val_auc']:.3f}, test AUC {row['test_auc']:.3f} "
                  f"({row['test_auc_ci95'][0]:.3f}-{row['test_auc_ci95'][1]:.3f})", flush=True)
    summary = {}
    for name in dict.fromkeys(r["recipe"] for r in rows):
        sel = [r for r in rows if r["recipe"] == name]
        summary[name] = {k: (statistics.mean(r[k] for r in sel),
                             statistics.pstdev(r[k] for r in sel))
                         for k in ("train_s", "val_auc", "test_auc")}
        s = summary[name]
        print(f"{name:>16}: train {s['train_s'][0]:.0f} s, val AUC {s['val_auc'][0]:.3f} ± "
              f"{s['val_auc'][1]:.3f}, test AUC {s['test_auc'][0]:.3f} ± {s['test_auc'][1]:.3f}")
    names = list(summary)
    speedup = summary[names[0]]["train_s"][0] / summary[names[1]]["train_s"][0]
    print(f"speed-up of the training time: {speedup:.2f}x")
    save("frozen_cache", {"size": args.size, "copies": args.copies, "runs": rows,
                          "summary": summary, "speedup": speedup})


if __name__ == "__main__":
    main()
