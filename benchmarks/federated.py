"""Federated against centralised and each site alone: Kermany split into three hospitals.

``scripts/kermany_sites.py`` splits Kermany by patient into sites A, B, C with 80 / 50 / 20 %
pneumonia (train, val and test; the pooled test set is the official 624 images). For each seed,
``medtl federate --baselines`` trains, by one recipe (MobileNetV2 ImageNet features, a linear
head, ``--rounds`` rounds of ``--local-epochs`` local epochs): the federated model (FedAvg in
Flower's simulation engine), each site alone and the pooled data (centralised). Then FedProx,
and DP-SGD at epsilon 8 (Opacus) for the privacy cost, over three draws of its noise.
Everything is chosen on validation;
each model's test split is scored once. Reported: pooled test AUC with its 95 % CI, DeLong's
paired test of the federated model against each baseline, each site's own test AUC, and the
wall time of the federation (simulation on this machine: the rounds, not the features).

    python benchmarks/federated.py [--seeds 0,1,2] [--rounds 20] [--local-epochs 5]
        [--dp-repeats 3] [--runs /work/bench-runs/federated]
    python benchmarks/federated.py --fine-tune 128 --rounds 5 --local-epochs 1 --seeds 0

``--fine-tune SIZE``: the same comparison with ``--strategy fine-tune`` (the top block and the
classifier, their BatchNorm statistics averaged too) at SIZE px, writing
results/federated_finetune.json instead.

Runs already in --runs are read, not trained again. Writes benchmarks/results/federated.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import ROOT, SHARED_DATA, require, save

KERMANY = SHARED_DATA / "chest_xray_kermany_224"


def test_scores(run) -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 = PNEUMONIA) and P(PNEUMONIA) of the run's test rows, in file order."""
    rows = sorted((r for r in run.predictions() if r["split"] == "test"),
                  key=lambda r: r["path"])
    y = np.array([r["label"] == "PNEUMONIA" for r in rows], dtype=int)
    return y, np.array([float(r["prob_PNEUMONIA"]) for r in rows])


def figures(run) -> dict:
    m = run.metrics
    return {"test_auc": m["test"]["auc"], "test_auc_ci95": m["test"]["auc_ci95"],
            "val_auc": m["val"]["auc"], "test_accuracy": m["test"]["accuracy"],
            "sites_test_auc": {k: v["test"]["auc"] for k, v in m.get("sites", {}).items()}}


def federation(sites: list[Path], out: Path, seed: int, args, **extra):
    from medtl.federated import federate
    from medtl.run import Run, is_run

    if is_run(out):
        return Run(out), None
    t0 = time.perf_counter()
    recipe = ({"strategy": "fine-tune", "image_size": args.fine_tune, "hflip": False}
              if args.fine_tune else {"strategy": "feature-extractor"})
    run = federate([str(s) for s in sites], rounds=args.rounds, local_epochs=args.local_epochs,
                   out=out, seed=seed, quiet=True, backbone="mobilenet_v2",
                   weights="imagenet", **recipe, **extra)
    return run, time.perf_counter() - t0


def kermany_sites(runs: Path) -> list[Path]:
    """The three sites' manifests, made by scripts/kermany_sites.py into RUNS/sites once."""
    require(KERMANY)
    site_dir = runs / "sites"
    if not (site_dir / "sites.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "kermany_sites.py"), "--data",
                        str(KERMANY), "--out", str(site_dir)], check=True)
    return [site_dir / f"site_{s}.csv" for s in "abc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=5)
    ap.add_argument("--dp-repeats", type=int, default=3)
    ap.add_argument("--fine-tune", type=int, default=0, metavar="SIZE")
    ap.add_argument("--runs", default="/work/bench-runs/federated")
    args = ap.parse_args()
    os.environ.setdefault("MEDTL_OFFLINE", "1")
    from medtl.evaluation.stats import delong_test
    from medtl.run import Run

    runs = Path(args.runs)
    sites = kermany_sites(runs)
    results: dict = {"rounds": args.rounds, "local_epochs": args.local_epochs, "seeds": {}}
    prefix = f"finetune{args.fine_tune}-" if args.fine_tune else ""
    for seed in [int(s) for s in args.seeds.split(",")]:
        run, seconds = federation(sites, runs / f"{prefix}fedavg-seed{seed}", seed, args,
                                  baselines=True)
        fed = run.config["federation"]
        entry = {"federated": {**figures(run), "federation_wall_s": fed["wall_s"],
                               "command_wall_s": seconds}}
        y, fed_score = test_scores(run)
        for base in sorted((Path(run.path) / "baselines").iterdir()):
            b = Run(base)
            yb, score = test_scores(b)
            assert (yb == y).all()
            test = delong_test(y, fed_score, score)
            entry[base.name] = {**figures(b), "wall_s": b.config["federation"]["wall_s"],
                                "delong_federated_minus_this": test["difference"],
                                "delong_p": test["p_value"]}
        results["seeds"][seed] = entry
        print(f"seed {seed}: " + ", ".join(f"{k} {v['test_auc']:.4f}" for k, v in entry.items()),
              flush=True)
    seed0 = int(args.seeds.split(",")[0])
    if args.fine_tune:  # the comparison only: FedProx and DP were measured on the head
        save("federated_finetune", results)
        return
    y, fed_score = test_scores(Run(runs / f"fedavg-seed{seed0}"))
    # DP-SGD's noise is drawn from a secret seed at each site (not repeatable by design):
    # --dp-repeats draws of it, each against the same FedAvg model.
    jobs = [("fedprox", {"algorithm": "fedprox", "mu": 0.01}, f"fedprox-seed{seed0}")]
    jobs += [(f"dp_eps8_draw{k}", {"dp_epsilon": 8.0}, f"dp_eps8-seed{seed0}" + (f"-r{k}" if k
             else "")) for k in range(args.dp_repeats)]
    for name, extra, folder in jobs:
        run, seconds = federation(sites, runs / folder, seed0, args, **extra)
        _, score = test_scores(run)
        test = delong_test(y, score, fed_score)
        results[name] = {**figures(run), "federation_wall_s": run.config["federation"]["wall_s"],
                         "privacy": run.config["federation"].get("privacy"),
                         "minus_fedavg": test["difference"], "delong_p": test["p_value"]}
        print(f"{name}: test AUC {results[name]['test_auc']:.4f} "
              f"({test['difference']:+.4f} against FedAvg, DeLong p {test['p_value']:.3f})",
              flush=True)
    draws = [results[f"dp_eps8_draw{k}"]["minus_fedavg"] for k in range(args.dp_repeats)]
    results["dp_eps8_cost"] = {"draws": draws, "mean": statistics.mean(draws),
                               "sd": statistics.stdev(draws) if len(draws) > 1 else 0.0}
    print(f"DP epsilon 8: test AUC change {results['dp_eps8_cost']['mean']:+.4f} +- "
          f"{results['dp_eps8_cost']['sd']:.4f} over {len(draws)} draws of the noise")
    summary = {}
    for model in results["seeds"][seed0]:
        aucs = [e[model]["test_auc"] for e in results["seeds"].values()]
        summary[model] = {"mean": statistics.mean(aucs),
                          "sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0}
    results["summary_test_auc"] = summary
    fed = [e["federated"]["test_auc"] for e in results["seeds"].values()]
    pooled = [e["pooled"]["test_auc"] for e in results["seeds"].values()]
    results["acceptance"] = {
        "max_abs_federated_minus_pooled": max(abs(a - b) for a, b in zip(fed, pooled,
                                                                          strict=True)),
        "federated_above_every_site_alone_in_every_seed": all(
            e["federated"]["test_auc"] > e[s]["test_auc"] for e in results["seeds"].values()
            for s in ("site_a", "site_b", "site_c")),
    }
    for model, s in summary.items():
        print(f"{model:>10}: test AUC {s['mean']:.4f} +- {s['sd']:.4f}")
    print(results["acceptance"])
    save("federated", results)


if __name__ == "__main__":
    main()
