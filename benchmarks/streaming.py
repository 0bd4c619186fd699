"""Training data larger than memory (issue 18, point 2): peak memory and streaming speed.

Memory: a CSV manifest of ``--refs`` image references (Kermany's 5,216 training X-rays, each
listed many times: what counts is the number of references) is loaded as ``medtl train`` loads
it, and ``full`` fine-tuning of MobileNetV2 at 224 px starts through ``TransferClassifier.fit``
(what ``medtl train`` runs after its run-level checks) and is stopped after ``--batches``
batches. Each count runs in a process of its own; a thread samples the resident memory of that
process and of its decoding workers (the sum of their VmRSS, which counts pages they share once
per process: an upper bound) and of their proportional set sizes (Pss: a shared page counted
once in all, the resident memory the run really holds) every 100 ms; the goal is read on Pss.
Reported: the peaks, the time to load the manifest and
to the first batch, and whether the images were streamed. The large count runs with the default
``--memory-budget`` (it streams because 200,000 decoded images do not fit); the small count
runs twice: streamed (``--memory-budget 0``: the same path, the comparison asked for) and with
the default (decoded into memory: what medtl does with it).

Speed: ``--speed-images`` Kermany training images at 224 px, which fit in memory, are trained
for ``--epochs`` epochs held in memory and streamed (validation held in memory in both), in
alternation, twice each; streamed with each of ``--workers`` decoding processes (the images
decoded once into a store on disk in the first epoch, read back after).
Reported: training images/s (the time of the loop's training passes
alone, validation aside) and the ratio streamed / in memory, best of the two.

    python benchmarks/streaming.py [--refs 200000,10000] [--batches 50] [--speed-images 1024]
        [--epochs 2] [--batch 32] [--part memory|speed|both]

Writes benchmarks/results/streaming.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import SHARED_DATA, require, save

KERMANY = SHARED_DATA / "chest_xray_kermany_224"


def _files() -> list[tuple[str, str]]:
    root = require(KERMANY) / "train"
    return [(str(p), cls) for cls in ("NORMAL", "PNEUMONIA")
            for p in sorted((root / cls).iterdir())]


def write_manifest(path: Path, refs: int, n_val: int = 64) -> None:
    files = _files()
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for i in range(n_val):  # every 80th file: both classes
            p, c = files[(i * 80) % len(files)]
            w.writerow([p, c, "val"])
        for i in range(refs):
            p, c = files[(i * 7919) % len(files)]  # a stride that mixes the classes
            w.writerow([p, c, "train"])


# ------------------------------------------------------------------------------ memory (child)
def _tree_memory_kb(pid: int) -> tuple[int, int]:
    """(sum of VmRSS, sum of Pss) over ``pid`` and its descendants, in kB. Workers are forked:
    the pages they share with the training process count once per process in VmRSS and once in
    all in Pss (each process's share of a shared page)."""
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return rss, pss


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_rss_kb = self.peak_pss_kb = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            rss, pss = _tree_memory_kb(os.getpid())
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            time.sleep(0.1)


class Stop(Exception):
    pass


def memory_child(manifest: str, budget: str, batches: int, batch: int) -> dict:
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    from medtl.data import load_dataset
    from medtl.training import loop
    from medtl.training.streaming import StreamedImages
    from medtl.transfer.estimator import TransferClassifier

    ds = load_dataset(manifest)
    t_load = time.perf_counter() - t0
    seen = {"n": 0, "first": None, "streamed": None}
    real_batch = loop.ImageInputs.train_batch
    real_epochs = loop._epochs

    def epochs(state, cbs, inputs, data, *args, **kwargs):
        seen["streamed"] = isinstance(data[0], StreamedImages)
        return real_epochs(state, cbs, inputs, data, *args, **kwargs)

    def train_batch(self, xb, device, gen):
        seen["n"] += 1
        if seen["first"] is None:
            seen["first"] = time.perf_counter() - t0
        if seen["n"] > batches:
            raise Stop
        return real_batch(self, xb, device, gen)

    loop.ImageInputs.train_batch = train_batch
    loop._epochs = epochs
    clf = TransferClassifier(backbone="mobilenet_v2", strategy="full", epochs=1,
                             batch_size=batch, quiet=True, memory_budget=budget, cache=False)
    with contextlib.suppress(Stop):  # the stop after --batches batches
        clf.fit(ds.split("train"), ds.split("val"))
    sampler.running = False
    sampler.join()
    return {"refs": len(ds.split("train")), "memory_budget": budget,
            "streamed": seen["streamed"], "batches": seen["n"] - 1,
            "peak_pss_gb": round(sampler.peak_pss_kb / 2**20, 3),
            "peak_rss_sum_gb": round(sampler.peak_rss_kb / 2**20, 3),
            "load_s": round(t_load, 1), "first_batch_s": round(seen["first"], 1),
            "total_s": round(time.perf_counter() - t0, 1)}


def memory(refs: list[int], batches: int, batch: int) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(refs[0], "50%")] + [(n, b) for n in refs[1:] for b in ("0", "50%")]
        for n, budget in runs:
            manifest = Path(tmp) / f"refs-{n}.csv"
            if not manifest.exists():
                write_manifest(manifest, n)
            proc = subprocess.run([sys.executable, __file__, "--child", str(manifest),
                                   "--budget", budget, "--batches", str(batches),
                                   "--batch", str(batch)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-3000:])
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {row['refs']:>7} refs, --memory-budget {budget:>4}: "
                  f"{'streamed' if row['streamed'] else 'in memory'}, peak resident "
                  f"{row['peak_pss_gb']:.2f} GB (PSS; VmRSS summed "
                  f"{row['peak_rss_sum_gb']:.2f}), manifest {row['load_s']} s, first batch "
                  f"{row['first_batch_s']} s, {row['batches']} batches in {row['total_s']} s",
                  flush=True)
            out.append(row)
    return out


# ------------------------------------------------------------------------------ speed
def speed(n_images: int, epochs: int, batch: int, workers: list[int]) -> dict:
    import numpy as np

    from medtl.data import load_dataset
    from medtl.training import loop, streaming
    from medtl.training.streaming import decoded_bytes
    from medtl.transfer.estimator import TransferClassifier

    passes: list[float] = []
    real = loop._train_epoch

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = real(*args, **kwargs)
        passes.append(time.perf_counter() - t)
        return out

    loop._train_epoch = timed
    ds = load_dataset(require(KERMANY), patient_regex=r"(person\d+|IM-\d+)")
    train, val = ds.split("train"), ds.split("val")
    rng = np.random.default_rng(0)
    train = train.subset(np.sort(rng.choice(len(train), n_images, replace=False)))
    val = val.subset(np.arange(min(64, len(val))))
    # Streamed: a budget that holds validation but not train with it.
    streamed = str(decoded_bytes(len(val), 224))
    # (budget, decoding worker processes); None: medtl's default for this machine.
    setups = {"in memory": ("50%", None),
              **{f"streamed, {w} worker(s)": (streamed, w) for w in workers}}
    default = streaming.default_workers
    rows: dict[str, list[dict]] = {k: [] for k in setups}
    for _ in range(2):
        for name, (budget, w) in setups.items():
            streaming.default_workers = default if w is None else (lambda w=w: w)
            clf = TransferClassifier(backbone="mobilenet_v2", strategy="full", epochs=epochs,
                                     patience=epochs, batch_size=batch, quiet=True,
                                     memory_budget=budget, cache=False, augment="basic")
            passes.clear()
            t0 = time.perf_counter()
            clf.fit(train, val)
            total = time.perf_counter() - t0
            rows[name].append({"train_pass_s": list(passes), "fit_s": total,
                               "train_img_s": len(train) * len(passes) / sum(passes)})
            print(f"  {name:>22}: {rows[name][-1]['train_img_s']:.1f} img/s training, fit "
                  f"{total:.1f} s (training passes {', '.join(f'{s:.1f}' for s in passes)} s)",
                  flush=True)
    streaming.default_workers = default
    best = {k: max(r["train_img_s"] for r in v) for k, v in rows.items()}
    ratios = {k: v / best["in memory"] for k, v in best.items() if k != "in memory"}
    for k, r in ratios.items():
        print(f"  {k} / in memory: {r:.3f} (goal >= 0.90)")
    mine = f"streamed, {default()} worker(s)"
    return {"images": len(train), "epochs": epochs, "batch": batch, "runs": rows,
            "best_img_s": best, "ratios": ratios, "default_workers": default(),
            "goal_met_with_default": ratios.get(mine, 0.0) >= 0.90}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refs", default="200000,10000")
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--speed-images", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", default="0,1", help="decoding processes to compare")
    ap.add_argument("--part", choices=("memory", "speed", "both"), default="both")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--budget", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("MEDTL_OFFLINE", "1")
    if args.child:
        print(json.dumps(memory_child(args.child, args.budget, args.batches, args.batch)))
        return
    result: dict = {}
    if args.part in ("memory", "both"):
        print("memory: MobileNetV2 full fine-tuning at 224 px, stopped after "
              f"{args.batches} batches of {args.batch}")
        rows = memory([int(n) for n in args.refs.split(",")], args.batches, args.batch)
        big, small = rows[0], rows[1]
        result["memory"] = {
            "runs": rows, "goal_under_4gb": big["peak_pss_gb"] < 4.0,
            "ratio_to_small_streamed": big["peak_pss_gb"] / small["peak_pss_gb"],
            "goal_within_10pct": big["peak_pss_gb"] <= 1.10 * small["peak_pss_gb"]}
        print(f"  {big['refs']} refs / {small['refs']} refs (both streamed): "
              f"{result['memory']['ratio_to_small_streamed']:.3f}")
    if args.part in ("speed", "both"):
        print(f"speed: {args.speed_images} Kermany images at 224 px, MobileNetV2 full, "
              f"{args.epochs} epochs")
        result["speed"] = speed(args.speed_images, args.epochs, args.batch,
                                [int(w) for w in args.workers.split(",")])
    save("streaming", result)


if __name__ == "__main__":
    main()
