"""`medtl bench --jobs 2` against `--jobs 1` on one BreastMNIST grid, in one run.

    python benchmarks/bench_jobs.py [--seeds 2] [--image-size 64] [--epochs 3]

The grid: mobilenet_v2 and efficientnet_lite0 x feature-extractor, hybrid:logreg, fine-tune
(--epochs each) x seeds: 12 cells at the default 2 seeds. Each `--jobs` setting runs the same
grid from nothing (its own bench directory and its own feature cache, so neither reuses the
other's features), one after the other, and the wall time of each is printed and written to
benchmarks/results/bench_jobs.json with every cell's AUC (the two must agree: the cells are
the same runs). Since issue 14 each of N workers gets cores / N threads; before, each started
one per core, so two workers ran four threads on two cores: a third setting, ``--jobs 2
--threads <cores>``, measures that for comparison.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

from _common import SHARED_DATA, require, save

BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
STRATEGIES = ("feature-extractor", "hybrid:logreg", "fine-tune")


def run(data: Path, jobs: int, root: Path, args, threads: int | None = None) -> dict:
    from medtl.bench import bench

    name = f"jobs{jobs}" + (f"-threads{threads}" if threads else "")
    out = root / name
    os.environ["MEDTL_CACHE_DIR"] = str(out / "cache")  # no features shared between settings
    t0 = time.perf_counter()
    bench(data, backbones=BACKBONES, strategies=STRATEGIES, seeds=args.seeds, out=out,
          jobs=jobs, image_size=args.image_size, epochs=args.epochs, threads=threads,
          quiet=True)
    wall = time.perf_counter() - t0
    with open(out / "leaderboard.csv", newline="") as f:
        cells = {r["cell"]: float(r["auc"]) for r in csv.DictReader(f)}
    print(f"--jobs {jobs}{f' --threads {threads}' if threads else ''}: {len(cells)} cells in "
          f"{wall:.0f} s")
    return {"jobs": jobs, "threads": threads, "wall_s": wall, "cells": len(cells), "auc": cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    data = require(SHARED_DATA / "breastmnist_28_resaved.npz")
    root = args.out or Path(tempfile.mkdtemp(prefix="medtl-bench-jobs-"))
    results = [run(data, jobs, root, args) for jobs in (1, 2)]
    # medtl 0.1's behaviour, for comparison: each of the two workers with a thread per core.
    results.append(run(data, 2, root, args, threads=os.cpu_count() or 1))
    one, two, _ = results
    same = {c: (one["auc"][c], two["auc"].get(c)) for c in one["auc"]}
    differ = {c: v for c, v in same.items() if v[1] is None or abs(v[0] - v[1]) > 1e-9}
    print(f"speed-up of --jobs 2: {one['wall_s'] / two['wall_s']:.2f}x "
          f"(with every worker on every core, as before: "
          f"{one['wall_s'] / results[2]['wall_s']:.2f}x); "
          f"cells whose AUC differs between the settings: {len(differ)}")
    save("bench_jobs", {"grid": {"backbones": BACKBONES, "strategies": STRATEGIES,
                                 "seeds": args.seeds, "image_size": args.image_size,
                                 "epochs": args.epochs},
                        "runs": results, "speedup_jobs2": one["wall_s"] / two["wall_s"],
                        "auc_differs": differ})


if __name__ == "__main__":
    main()
