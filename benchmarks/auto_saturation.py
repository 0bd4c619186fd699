"""auto's decision rule, old against new (issue 17, point 4), on Kermany and BreastMNIST.

    python benchmarks/auto_saturation.py [--sets kermany,breastmnist] [--seeds 0]
                                         [--time-budget MINUTES] [--out DIR] [--smoke]

``old``: the rule before issue 17 (a stage kept only when validation AUC rises by more than
0.001; the frozen stage is the linear head alone). ``new``: medtl.transfer.gradual.decide (AUC,
then accuracy, then log-loss, each where it separates) and the frozen stage's hybrid heads. Each
(set, rule, seed) is one ``medtl.train`` run; the test split is scored once per run, every
choice made on validation. Rows are written to benchmarks/results/auto_saturation.json after
every run, and a rerun skips the rows already there (resume). ``--smoke``: the demo sample at
32 px, one epoch per stage, two stages, a few images: checks the script, measures nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

from _common import RESULTS, SHARED_DATA, require, run_figures, save

import medtl
from medtl.data import KERMANY_PATIENT_REGEX
from medtl.transfer import gradual, strategies

SETS = {
    "kermany": lambda: {"data": require(SHARED_DATA / "chest_xray_kermany_224"),
                        "patient_regex": KERMANY_PATIENT_REGEX, "image_size": 160,
                        "hflip": False, "epochs": 3},
    "breastmnist": lambda: {"data": require(SHARED_DATA / "breastmnist_28_resaved.npz"),
                            "image_size": 128, "epochs": 3},
}


def old_decide(new, best, min_delta=gradual.MIN_DELTA):
    """The rule before issue 17: validation AUC must rise by more than ``min_delta``."""
    if new.val_auc > best.val_auc + min_delta:
        return True, f"+{new.val_auc - best.val_auc:.4f} AUC"
    return False, f"not above {best.val_auc:.4f} by {min_delta}"


def run_one(options: dict, rule: str, out: Path) -> dict:
    patches = ([mock.patch.object(gradual, "decide", old_decide),
                mock.patch.object(strategies, "HEADS", {})] if rule == "old" else [])
    for p in patches:
        p.start()
    try:
        t0 = time.perf_counter()
        run = medtl.train(**options, strategy="auto", out=out, overwrite=True, quiet=True)
        minutes = (time.perf_counter() - t0) / 60
    finally:
        for p in patches:
            p.stop()
    chosen = [s for s in run.config["stages"] if s["accepted"]][-1]
    test = run.metrics.get("test") or {}
    return {"stage": chosen["stage"], "head": run.config["head"],
            "stages_run": len(run.config["stages"]), "val_auc": chosen["val_auc"],
            "val_accuracy": chosen.get("val_accuracy"), "test_auc": test.get("auc"),
            "test_accuracy": test.get("accuracy"), "minutes": round(minutes, 2),
            **{k: v for k, v in run_figures(run).items() if k.startswith("test_accuracy_")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="kermany,breastmnist")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--time-budget", type=float, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    name = "auto_saturation_smoke" if args.smoke else "auto_saturation"
    path = RESULTS / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    out = args.out or Path(tempfile.mkdtemp(prefix="auto_saturation-"))
    sets = {"demo": None} if args.smoke else {s: SETS[s] for s in args.sets.split(",")}
    for set_name, make in sets.items():
        if make is None:
            from medtl.data.samples import DEMO_PATIENT_REGEX, demo_data_path

            options = {"data": demo_data_path(), "patient_regex": DEMO_PATIENT_REGEX,
                       "image_size": 32, "epochs": 1, "unfreeze": 1, "augment": "none"}
        else:
            options = make()
        for seed in (int(s) for s in args.seeds.split(",")):
            for rule in ("old", "new"):
                key = {"set": set_name, "rule": rule, "seed": seed,
                       "time_budget": args.time_budget}
                if any(all(r.get(k) == v for k, v in key.items()) for r in rows):
                    print("done before:", key)
                    continue
                row = {**key, **run_one({**options, "seed": seed,
                                         "time_budget": args.time_budget},
                                        rule, out / f"{set_name}-{rule}-{seed}")}
                rows.append(row)
                print(row)
                save(name, {"rows": rows})


if __name__ == "__main__":
    main()
