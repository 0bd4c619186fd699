"""Issue 17's recipes, each against its own baseline, on BreastMNIST (3 seeds: every run here
takes under 15 minutes on this CPU).

    python benchmarks/recipes.py [--set breastmnist|kermany] [--seeds 0,1,2] [--recipes a,b]
                                 [--out DIR] [--smoke]

Trained recipes (MobileNetV2, every layer trained, 128 px, up to 30 epochs, patience 8):
``baseline`` (``--augment basic``), ``label-smoothing`` (0.1), ``ema`` (0.99 per step: the
546-image training split gives ~17 steps an epoch, so 0.999 would average over 60 epochs, more
than a run lasts), ``strong`` (``--augment strong --mix none``), ``strong-mix`` (``--augment
strong --mix both``: mixup/CutMix). Frozen-feature resolution: EfficientNet-Lite0 features with
the logistic-regression head at 128, 224 (native) and 320 px.

TTA is measured separately (``--tta-of RUNS_DIR``, a benchmarks/accuracy.py row folder or this
script's ``--out``): each trained model re-scored on validation and test with every TTA setting
it allows (``none``, ``flip`` where flips are allowed, ``standard``).

Every run's validation and test figures are recorded (test read by nothing); the summary gives
mean ± sd over seeds. Rows go to benchmarks/results/recipes_<set>.json after every run; a rerun
skips the (recipe, seed) pairs already there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _common import RESULTS, SHARED_DATA, require, save

import medtl
from medtl.data import KERMANY_PATIENT_REGEX

_TRAINED = {"backbone": "mobilenet_v2", "strategy": "full", "image_size": 128, "epochs": 30,
            "patience": 8, "batch_size": 32}
_FROZEN = {"backbone": "efficientnet_lite0", "strategy": "hybrid", "head": "logreg"}
RECIPES = {
    "baseline": {**_TRAINED, "augment": "basic"},
    "label-smoothing": {**_TRAINED, "augment": "basic", "label_smoothing": 0.1},
    "ema": {**_TRAINED, "augment": "basic", "ema": 0.99},
    "strong": {**_TRAINED, "augment": "strong", "mix": "none"},
    "strong-mix": {**_TRAINED, "augment": "strong", "mix": "both"},
    "frozen-128": {**_FROZEN, "image_size": 128},
    "frozen-224": {**_FROZEN, "image_size": 224},
    "frozen-320": {**_FROZEN, "image_size": 320},
}
SETS = {
    "breastmnist": lambda: {"data": require(SHARED_DATA / "breastmnist_28_resaved.npz")},
    "kermany": lambda: {"data": require(SHARED_DATA / "chest_xray_kermany_224"),
                        "patient_regex": KERMANY_PATIENT_REGEX, "hflip": False},
}


def _split(run: medtl.Run, split: str) -> dict:
    m = run.metrics.get(split) or {}
    return {f"{split}_auc": m.get("auc"), f"{split}_accuracy": m.get("accuracy")}


def _epochs_run(run: medtl.Run) -> int | None:
    history = run.path / "history.csv"
    return max(len(history.read_text().splitlines()) - 1, 0) if history.is_file() else None


def _tta_rows(runs_dir: Path) -> list[dict]:
    """Every single run under ``runs_dir`` scored with each TTA setting it allows.

    The setting the run recorded is read from its metrics; the others come from ``evaluate``
    with ``tta=`` overridden, so one trained model is compared with itself. Both splits are
    scored, so a default can be chosen on validation and its test effect read alongside.
    """
    from medtl.data.tta import TTA_CHOICES, flips_allowed

    rows = []
    configs = sorted({*runs_dir.glob("*/config.json"), *runs_dir.glob("seed*/*/config.json")})
    for cfg in configs:
        run = medtl.load_run(cfg.parent)
        if run.config.get("kind") != "single":
            continue
        options = run.config["options"]
        recorded = options.get("tta") or "none"
        flips = flips_allowed(options["augment"], options["hflip"])
        row = {"run": str(cfg.parent.relative_to(runs_dir)), "tta_recorded": recorded}
        for tta in TTA_CHOICES:
            if tta == "flip" and not flips:
                continue
            for split in ("val", "test"):
                metrics = (run.metrics[split] if tta == recorded else
                           medtl.evaluate(run, split=split, tta=tta, quiet=True)["metrics"])
                row[f"{split}_auc_{tta}"] = metrics["auc"]
                row[f"{split}_accuracy_{tta}"] = metrics["accuracy"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        entry = {"seeds": len(mine)}
        for key in ("val_auc", "val_accuracy", "test_auc", "test_accuracy", "minutes"):
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                entry[key] = [round(statistics.fmean(values), 4),
                              round(statistics.stdev(values), 4) if len(values) > 1 else None]
        out[recipe] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="breastmnist", choices=sorted(SETS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--tta-of", type=Path, default=None,
                    help="a folder of runs (an accuracy.py row, recipes.py --out): measure TTA")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.tta_of is not None:
        save(f"tta_{args.tta_of.name}", {"rows": _tta_rows(args.tta_of)})
        return
    name = f"recipes_{args.set}" + ("_smoke" if args.smoke else "")
    path = RESULTS / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    if args.smoke:
        from medtl.data.samples import DEMO_PATIENT_REGEX, demo_data_path

        base = {"data": demo_data_path(), "patient_regex": DEMO_PATIENT_REGEX}
    else:
        base = SETS[args.set]()
    out = args.out or Path(tempfile.mkdtemp(prefix="recipes-"))
    for seed in (int(s) for s in args.seeds.split(",")):
        for recipe in args.recipes.split(","):
            if any(r["recipe"] == recipe and r["seed"] == seed for r in rows):
                continue
            options = {**base, **RECIPES[recipe], "seed": seed}
            if args.smoke:
                options.update(image_size=32, epochs=1)
            t0 = time.perf_counter()
            run = medtl.train(**options, out=out / f"{recipe}-{seed}", overwrite=True,
                              quiet=True)
            row = {"recipe": recipe, "seed": seed,
                   "minutes": round((time.perf_counter() - t0) / 60, 2),
                   "epochs_run": _epochs_run(run),
                   **_split(run, "val"), **_split(run, "test")}
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(name, {"rows": rows, "summary": summary(rows)})


if __name__ == "__main__":
    main()
