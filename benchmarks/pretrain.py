"""Does in-domain self-supervised pretraining beat ImageNet alone when labels are few?

Issue 20, point 2. For Kermany chest X-rays (official train/test, patients from the file names)
and BreastMNIST (MedMNIST .npz, official train/test):

1. ``medtl pretrain`` on the official **train** split's images (labels unused; a random
   subset with --ssl-images) from ImageNet, with --method at --image-size px; wall time kept.
2. For each label fraction (1 %, 10 %, 100 % of the train split), a labelled subset drawn per
   class (stratified) and by patient (Kermany: whole patients, until the class's share of
   images is reached; BreastMNIST has no patients: images), seeded, with at least
   --min-per-class images per class. **Validation is carved from the drawn labels** by
   ``medtl train`` (20 %, by patient): with 1 % of the labels a user has no large labelled
   validation set either, and a validation split drawn from all the labels would choose the
   epochs and operating points with labels the low-label model is not supposed to have.
3. MobileNetV2 ``feature-extractor`` (frozen) and ``fine-tune`` (top block), each from ImageNet
   and from the SSL file, same size, seed and draw; the official test split scored once per run
   (test AUC with its 95 % CI from metrics.json).

Prints a table and writes benchmarks/results/pretrain.json (pretrain_smoke.json with --smoke).

    python benchmarks/pretrain.py [--datasets kermany,breastmnist] [--method simclr]
        [--image-size 64] [--ssl-epochs 20] [--ssl-images all] [--epochs 30]
        [--fractions 0.01,0.1,1] [--seeds 1] [--threads 2] [--work DIR] [--smoke]

--smoke: 1 SSL epoch on 256 images, 2 training epochs, 1 % labels: about a minute per dataset.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import SHARED_DATA, require, save

KERMANY = SHARED_DATA / "chest_xray_kermany_224"
BREAST = SHARED_DATA / "breastmnist_28_resaved.npz"
STRATEGIES = ("feature-extractor", "fine-tune")


def draw(labels: np.ndarray, groups: list[str], fraction: float, min_per_class: int,
         seed: int) -> list[int]:
    """Indices of a labelled subset: per class, whole groups (patients) in a seeded order until
    the class holds ``fraction`` of its images (at least ``min_per_class``)."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        by_group: dict[str, list[int]] = {}
        for i in idx:
            by_group.setdefault(groups[i], []).append(int(i))
        names = sorted(by_group)
        rng.shuffle(names)
        want = max(min_per_class, round(fraction * len(idx)))
        taken: list[int] = []
        for name in names:
            if len(taken) >= want:
                break
            taken += by_group[name]
        chosen += taken
    return sorted(chosen)


class Kermany:
    name = "kermany"

    def __init__(self, work: Path) -> None:
        from medtl.data import KERMANY_PATIENT_REGEX, load_dataset

        # Patients from the file names; the manifests written below carry them, so medtl train
        # carves validation by patient without the regex.
        self.ds = load_dataset(require(KERMANY), patient_regex=KERMANY_PATIENT_REGEX,
                               val_fraction=0.0)
        self.work = work
        self.train = [i for i, r in enumerate(self.ds.records) if r.split == "train"]
        self.test = [i for i, r in enumerate(self.ds.records) if r.split == "test"]

    def labels(self) -> np.ndarray:
        return self.ds.labels[self.train]

    def groups(self) -> list[str]:
        return [self.ds.records[i].patient_id or self.ds.records[i].path for i in self.train]

    def write(self, name: str, train_pos: list[int], with_test: bool) -> Path:
        """A manifest of train rows (positions into the train split) and, optionally, test."""
        path = self.work / f"{name}.csv"
        rows = [(self.train[p], "train") for p in train_pos]
        rows += [(i, "test") for i in self.test] if with_test else []
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "patient_id", "split"])
            for i, split in rows:
                r = self.ds.records[i]
                w.writerow([r.path, self.ds.classes[r.label], r.patient_id or "", split])
        return path


class BreastMNIST:
    name = "breastmnist"

    def __init__(self, work: Path) -> None:
        with np.load(require(BREAST)) as z:
            self.arrays = {k: z[k] for k in z.files}
        self.work = work

    def labels(self) -> np.ndarray:
        return self.arrays["train_labels"].reshape(-1)

    def groups(self) -> list[str]:
        return [str(i) for i in range(len(self.labels()))]  # no patients: each image alone

    def write(self, name: str, train_pos: list[int], with_test: bool) -> Path:
        path = self.work / f"{name}.npz"
        a = self.arrays
        parts = {"train_images": a["train_images"][train_pos],
                 "train_labels": a["train_labels"][train_pos]}
        if with_test:
            parts |= {"test_images": a["test_images"], "test_labels": a["test_labels"]}
        np.savez(path, **parts)
        return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="kermany,breastmnist")
    ap.add_argument("--method", default="simclr", choices=("simclr", "byol", "dino"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--ssl-epochs", type=int, default=20)
    ap.add_argument("--ssl-images", default="all", help="all, or a random subset's size")
    ap.add_argument("--ssl-batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30, help="most training epochs per run")
    ap.add_argument("--fractions", default="0.01,0.1,1")
    ap.add_argument("--min-per-class", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=1, help="label draws (and training seeds)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=None, help="folder for data subsets, SSL files, runs")
    ap.add_argument("--smoke", action="store_true",
                    help="1 SSL epoch on 256 images, 2 epochs, 1 %% labels")
    args = ap.parse_args()
    if args.smoke:
        args.ssl_epochs, args.ssl_images, args.epochs, args.fractions = 1, "256", 2, "0.01"
    os.environ.setdefault("MEDTL_OFFLINE", "1")
    import medtl

    work = Path(args.work or tempfile.mkdtemp(prefix="medtl-ssl-"))
    work.mkdir(parents=True, exist_ok=True)
    fractions = [float(f) for f in args.fractions.split(",")]
    common = {"backbone": "mobilenet_v2", "image_size": args.image_size, "quiet": True,
              "threads": args.threads}
    pretraining, rows = {}, []
    header = (f"{'dataset':<12}{'labels':>14}{'strategy':>19}{'weights':>10}"
              f"{'test AUC [95% CI]':>26}{'train s':>9}")
    for name in args.datasets.split(","):
        data = {"kermany": Kermany, "breastmnist": BreastMNIST}[name](work)
        labels = data.labels()
        # 1. Self-supervised pretraining on the train split's images (labels unused).
        pool = list(range(len(labels)))
        if args.ssl_images != "all":
            rng = np.random.default_rng(0)
            pool = sorted(rng.choice(pool, min(int(args.ssl_images), len(pool)),
                                     replace=False).tolist())
        ssl_data = data.write(f"{name}-ssl-images", pool, with_test=False)
        ssl_file = work / f"{name}-{args.method}.safetensors"
        t0 = time.perf_counter()
        result = medtl.pretrain(ssl_data, ssl_file, method=args.method, start="imagenet",
                                epochs=args.ssl_epochs, batch_size=args.ssl_batch_size,
                                splits="train", overwrite=True, **common)
        ssl_s = time.perf_counter() - t0
        pretraining[name] = {"images": len(pool), "epochs": args.ssl_epochs,
                             "method": args.method, "wall_s": ssl_s,
                             "loss": [r["loss"] for r in result.history],
                             "data_fingerprint": result.metadata["data_fingerprint"]}
        print(f"{name}: {args.method} pretraining on {len(pool)} train images, "
              f"{args.ssl_epochs} epochs at {args.image_size} px: {ssl_s:.0f} s, loss "
              f"{result.history[0]['loss']:.3f} -> {result.history[-1]['loss']:.3f}",
              flush=True)
        print(header, flush=True)
        # 2-3. Label fractions x strategies x starting weights, the test split scored once each.
        for seed in range(args.seeds):
            for fraction in fractions:
                pos = draw(labels, data.groups(), fraction, args.min_per_class, seed)
                subset = data.write(f"{name}-f{fraction}-s{seed}", pos, with_test=True)
                for strategy in STRATEGIES:
                    for weights, source in (("imagenet", "imagenet"), ("ssl", str(ssl_file))):
                        out = work / "runs" / f"{name}-f{fraction}-s{seed}-{strategy}-{weights}"
                        t0 = time.perf_counter()
                        run = medtl.train(subset, strategy=strategy, weights=source,
                                          epochs=args.epochs, seed=seed, out=out,
                                          overwrite=True, **common)
                        wall = time.perf_counter() - t0
                        test = run.metrics["test"]
                        counts = run.config["data"]["counts"]
                        row = {"dataset": name, "fraction": fraction, "seed": seed,
                               "labels": len(pos), "train_n": sum(counts["train"].values()),
                               "val_n": sum(counts.get("val", {}).values()),
                               "strategy": strategy, "weights": weights,
                               "test_auc": test.get("auc"), "test_auc_ci95": test.get("auc_ci95"),
                               "test_n": test.get("n"), "wall_s": wall,
                               "train_s": run.metrics.get("timing", {}).get("train_s")}
                        rows.append(row)
                        ci = row["test_auc_ci95"]
                        auc = "n/a" if row["test_auc"] is None else f"{row['test_auc']:.3f}"
                        ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
                        print(f"{name:<12}{f'{fraction:g} ({len(pos)})':>14}{strategy:>19}"
                              f"{weights:>10}{auc + ci_text:>26}{wall:>9.0f}", flush=True)
    save("pretrain_smoke" if args.smoke else "pretrain", {
        "method": args.method, "image_size": args.image_size, "ssl_epochs": args.ssl_epochs,
        "ssl_images": args.ssl_images, "epochs": args.epochs, "fractions": fractions,
        "min_per_class": args.min_per_class, "seeds": args.seeds,
        "validation": "carved by medtl train from the drawn labels (20 %, by patient)",
        "pretraining": pretraining, "rows": rows})


if __name__ == "__main__":
    main()
