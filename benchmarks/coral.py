"""Deep CORAL on Kermany's train -> test shift: AUC, sensitivity and specificity with and without.

The recipe is benchmarks/adabn.py's fine-tune: MobileNetV2, ``fine-tune`` of the top two blocks
(``--frozen-cache 4``), no flips, ``--size`` px, trained on Kermany's train split with validation
carved by patient. Three runs, the same seed:

- **none**: no alignment;
- **transductive**: ``--align coral`` toward all test images (unlabelled), which are then scored;
- **inductive**: the test patients split in two halves (seeded, by the patient in the file
  name); ``--align coral`` toward half A's images only, scored on half B.

Each run scores the test split once, when it is trained (metrics.json, predictions.csv); the
figures below are computed from those predictions at the operating points chosen on the run's
own validation split (metrics.json ``thresholds``: Youden's J, and sensitivity 0.9): AUC with
its DeLong 95 % CI, sensitivity and specificity with Wilson 95 % CIs, and DeLong's paired test
of each aligned run's AUC against the unaligned one's on the same images. Every model is shown
on all 624 test images and on half B (the inductive run's only fair comparison).

    python benchmarks/coral.py [--size 224] [--epochs 20] [--weight 1]
        [--runs /work/bench-runs/coral] [--baseline /work/bench-runs/adabn/fine-tune]
        [--models none,transductive,inductive]
    python benchmarks/coral.py --smoke        # tiny settings: 64 px, 2 epochs, a subset

Runs already in --runs are read, not trained again; ``--baseline RUN`` takes an existing run of
the same recipe (adabn.py's fine-tune) as "none". Writes benchmarks/results/coral.json
(coral-smoke.json with --smoke or --subset).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import time
from pathlib import Path

import numpy as np
from _common import SHARED_DATA, require, save

KERMANY = SHARED_DATA / "chest_xray_kermany_224"


def wilson(k: int, n: int, z: float = 1.959964) -> list[float] | None:
    """Wilson score 95 % interval of a proportion k / n."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def figures(y: np.ndarray, score: np.ndarray, thresholds: dict) -> dict:
    """AUC (DeLong CI) and, at each validation-chosen threshold, sensitivity and specificity
    (Wilson CIs); ``y`` is 1 for the positive class, ``score`` its probability."""
    from sklearn.metrics import roc_auc_score

    from medtl.evaluation.stats import auc_ci_delong, operating_point

    out = {"n": int(len(y)), "positives": int(y.sum()), "auc": float(roc_auc_score(y, score)),
           "auc_ci95": auc_ci_delong(y, score)}
    for name in ("youden", "sensitivity_target"):
        if name not in (thresholds or {}):
            continue
        op = operating_point(y, score, thresholds[name])
        out[name] = {"threshold": op["threshold"],
                     "sensitivity": op["sensitivity"],
                     "sensitivity_ci95": wilson(op["tp"], op["tp"] + op["fn"]),
                     "specificity": op["specificity"],
                     "specificity_ci95": wilson(op["tn"], op["tn"] + op["fp"])}
    return out


def test_scores(run) -> dict[str, tuple[int, float]]:
    """file name -> (1 if positive, positive-class probability) of the run's test rows."""
    positive = run.config["positive_class"]
    out = {}
    for row in run.predictions():
        if row["split"] == "test":
            out[Path(row["path"]).name] = (int(row["label"] == positive),
                                           float(row[f"prob_{positive}"]))
    return out


def patient(name: str) -> str:
    from medtl.data import KERMANY_PATIENT_REGEX

    m = re.search(KERMANY_PATIENT_REGEX, name)
    return m.group(1) if m else name


def write_manifest(path: Path, rows: list[tuple[Path, str, str]]) -> Path:
    """A CSV manifest (path, label, patient_id, split) of (file, class, split) rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "split"])
        for file, label, split in rows:
            w.writerow([str(file), label, patient(file.name), split])
    return path


def kermany_files(data: Path, split: str) -> list[tuple[Path, str, str]]:
    return [(p, p.parent.name, split) for p in sorted((data / split).glob("*/*.jpeg"))]


def subset(rows: list, per_class: int, seed: int) -> list:
    """``per_class`` rows of each class, drawn by patient (whole patients, seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for cls in sorted({r[1] for r in rows}):
        mine = [r for r in rows if r[1] == cls]
        patients = sorted({patient(r[0].name) for r in mine})
        order = {p: i for i, p in enumerate(rng.permutation(patients))}
        out += sorted(mine, key=lambda r: order[patient(r[0].name)])[:per_class]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's (20)")
    ap.add_argument("--weight", type=float, default=1.0, help="--align-weight")
    ap.add_argument("--subset", type=int, default=None,
                    help="train on this many images per class (and score as many test "
                         "images per class), whole patients, seeded")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny settings to check the script: --size 64 --epochs 2 --subset 40")
    ap.add_argument("--runs", default="/work/bench-runs/coral")
    ap.add_argument("--models", default="none,transductive,inductive",
                    help="which of none, transductive, inductive to train and score")
    ap.add_argument("--baseline", default=None,
                    help="an existing run of the same recipe to use as 'none' (adabn.py's "
                         "fine-tune)")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.epochs = 64, args.epochs or 2
        args.subset = args.subset or 40
        args.runs = args.runs if args.runs != ap.get_default("runs") else "/tmp/coral-smoke"
    os.environ.setdefault("MEDTL_OFFLINE", "1")
    import medtl
    from medtl.data import KERMANY_PATIENT_REGEX
    from medtl.evaluation.stats import delong_test
    from medtl.run import Run, is_run

    data = require(KERMANY)
    runs = Path(args.runs)
    test_rows = kermany_files(data, "test")
    source: Path = data
    if args.subset:  # a manifest of a subset of train and test, by whole patients
        test_rows = subset(test_rows, args.subset, seed=1)
        source = write_manifest(runs / "subset.csv",
                                subset(kermany_files(data, "train"), args.subset, seed=0)
                                + test_rows)
    # The test patients in two halves (seeded, by the patient in the file name).
    patients = sorted({patient(r[0].name) for r in test_rows})
    half_a = set(np.random.default_rng(0).permutation(patients)[: len(patients) // 2])
    target_all = write_manifest(runs / "target_test.csv", test_rows)
    target_a = write_manifest(runs / "target_half_a.csv",
                              [r for r in test_rows if patient(r[0].name) in half_a])
    half_b = {r[0].name for r in test_rows if patient(r[0].name) not in half_a}
    recipe = dict(backbone="mobilenet_v2", strategy="fine-tune", unfreeze=2, frozen_cache=4,
                  hflip=False, image_size=args.size, weights="imagenet",
                  patient_regex=KERMANY_PATIENT_REGEX, quiet=True,
                  **({"epochs": args.epochs} if args.epochs else {}))
    plans = {"none": {},
             "transductive": dict(align="coral", align_target=[str(target_all)],
                                  align_weight=args.weight),
             "inductive": dict(align="coral", align_target=[str(target_a)],
                               align_weight=args.weight)}
    wanted = [m for m in args.models.split(",") if m]
    unknown = sorted(set(wanted) - set(plans))
    if unknown or "none" not in wanted:
        ap.error(f"--models: {', '.join(unknown) or 'none is needed'} (none, transductive, "
                 "inductive; none is the baseline)")
    plans = {k: v for k, v in plans.items() if k in wanted}
    trained: dict[str, Run] = {}
    results: dict = {"size": args.size, "epochs": args.epochs, "weight": args.weight,
                     "subset_per_class": args.subset, "test_patients": len(patients),
                     "half_a_patients": len(half_a), "half_b_images": len(half_b),
                     "models": {}}
    for name, align in plans.items():
        out = runs / name
        if name == "none" and args.baseline:
            out = Path(args.baseline)
        t0 = time.perf_counter()
        # absolute paths in predictions.csv: a manifest's rows outside its folder would be
        # written hashed, and the halves are matched by file name
        run = Run(out) if is_run(out) else medtl.train(source, out=out, paths="absolute",
                                                       **recipe, **align)
        trained[name] = run
        results["models"][name] = {
            "run": str(out), "train_s": run.metrics["timing"]["train_s"],
            "total_s": run.metrics["timing"].get("total_s"),
            "wall_s_here": time.perf_counter() - t0, "val_auc": run.metrics["val"]["auc"],
            "align": run.config.get("align"),
            "train_coral_last": _last(run, "train_coral")}
        print(f"{name}: trained/read in {time.perf_counter() - t0:.0f} s", flush=True)
    base = test_scores(trained["none"])
    rows = []
    for name, run in trained.items():
        scores = test_scores(run)
        thresholds = run.metrics.get("thresholds") or {}
        entry = results["models"][name]
        for scored, names in (("test", sorted(scores)), ("half_b", sorted(half_b))):
            if name == "inductive" and scored == "test":
                continue  # half A was its target: only half B is a fair score
            y = np.array([scores[n][0] for n in names])
            s = np.array([scores[n][1] for n in names])
            entry[scored] = figures(y, s, thresholds)
            if name != "none":  # a = this run, b = the unaligned one, on the same images
                test = delong_test(y, s, np.array([base[n][1] for n in names]))
                entry[scored]["delong_vs_none"] = {k: test[k] for k in (
                    "auc_a", "auc_b", "difference", "z", "p_value")}
            rows.append((name, scored, entry[scored]))
    print(f"\nKermany test, MobileNetV2 fine-tune top 2 at {args.size} px, CORAL weight "
          f"{args.weight} (operating points chosen on each run's validation)")
    print(f"{'model':>13} {'scored':>7} {'n':>4} {'AUC (95% CI)':>22} "
          f"{'sens@Youden':>20} {'spec@Youden':>20} {'p vs none':>9}")
    for name, scored, f in rows:
        y = f.get("youden", {})
        p = f.get("delong_vs_none", {}).get("p_value")
        print(f"{name:>13} {scored:>7} {f['n']:>4} {f['auc']:.3f} ({_ci(f['auc_ci95'])})"
              f" {_pm(y, 'sensitivity'):>20} {_pm(y, 'specificity'):>20} "
              f"{'' if p is None else f'{p:.3f}':>9}")
    save("coral-smoke" if args.subset else "coral", results)


def _last(run, column: str) -> float | None:
    path = run.path / "history.csv"
    with open(path) as f:
        values = [row[column] for row in csv.DictReader(f) if row.get(column)]
    return float(values[-1]) if values else None


def _ci(ci) -> str:
    return "n/a" if not ci else f"{ci[0]:.3f}-{ci[1]:.3f}"


def _pm(op: dict, key: str) -> str:
    if op.get(key) is None:
        return "n/a"
    return f"{op[key]:.3f} ({_ci(op.get(f'{key}_ci95'))})"


if __name__ == "__main__":
    main()
