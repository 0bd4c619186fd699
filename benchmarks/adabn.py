"""AdaBN on Kermany's train -> test shift: AUC, sensitivity and specificity before and after.

Kermany's test split differs from its training split in prevalence and acquisition (the
validation-chosen models of docs/benchmarks.md lose specificity on it). Three MobileNetV2
runs trained on Kermany's train split (validation carved by patient): ``fine-tune`` of the top
two blocks (``--frozen-cache 4``), the frozen ``feature-extractor``, and ``full`` fine-tuning
of every block (every BatchNorm layer trained on Kermany) at ``--full-size`` px. Each is
scored on the 624 test images at the operating points chosen on validation (Youden's J,
and sensitivity 0.9):

- **before**: as trained;
- **transductive AdaBN**: BatchNorm statistics re-estimated on all 624 test images, which are
  then scored (``medtl evaluate --adapt-bn``);
- **inductive AdaBN**: the test patients split in two halves; each half is scored by the model
  adapted on the other half only, and the two halves' predictions are pooled;
- **every layer** (transductive): what AdaBN does when the frozen blocks' ImageNet statistics
  are re-estimated too (medtl adapts only the layers that trained; a frozen feature extractor
  has none, so medtl refuses it).

    python benchmarks/adabn.py [--size 224] [--full-size 128] [--full-epochs 8]
        [--runs /work/bench-runs/adabn]

Runs already in --runs are read, not trained again. Writes benchmarks/results/adabn.json.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
from _common import SHARED_DATA, require, save

KERMANY = SHARED_DATA / "chest_xray_kermany_224"


def figures(m: dict) -> dict:
    ops = m.get("operating_points", {})
    return {"auc": m["auc"], "auc_ci95": m.get("auc_ci95"),
            **{f"{name}_{k}": ops[name][k] for name in ops
               for k in ("sensitivity", "specificity")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--full-size", type=int, default=128)
    ap.add_argument("--full-epochs", type=int, default=8)
    ap.add_argument("--runs", default="/work/bench-runs/adabn")
    args = ap.parse_args()
    os.environ.setdefault("MEDTL_OFFLINE", "1")
    import medtl
    from medtl.data import KERMANY_PATIENT_REGEX, load_dataset
    from medtl.errors import MedtlError
    from medtl.evaluation.summary import split_summary
    from medtl.run import Run, is_run
    from medtl.workflow import evaluate

    data = require(KERMANY)
    runs = Path(args.runs)
    recipes = {
        "fine-tune": dict(strategy="fine-tune", unfreeze=2, frozen_cache=4, hflip=False,
                          image_size=args.size),
        "feature-extractor": dict(strategy="feature-extractor", image_size=args.size),
        # every BatchNorm layer trained on Kermany: the case AdaBN was designed for; at a
        # smaller size and fewer epochs so it fits a CPU session
        f"full-{args.full_size}px": dict(strategy="full", hflip=False,
                                         image_size=args.full_size, epochs=args.full_epochs),
    }
    # The test patients in two halves (by patient, seeded), each a manifest of its own.
    test = load_dataset(data, patient_regex=KERMANY_PATIENT_REGEX).split("test")
    patients = sorted({p for p in test.patients})
    rng = np.random.default_rng(0)
    half_a = set(rng.permutation(patients)[: len(patients) // 2])
    halves = {}
    for name, keep in (("a", True), ("b", False)):
        path = runs / f"test_half_{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "patient_id", "split"])
            for r, p in zip(test.records, test.patients, strict=True):
                if (p in half_a) == keep:
                    w.writerow([r.path, test.classes[r.label], p, "test"])
        halves[name] = path
    results: dict = {"size": args.size, "models": {}}
    for name, recipe in recipes.items():
        out = runs / name
        run = Run(out) if is_run(out) else medtl.train(
            data, weights="imagenet", patient_regex=KERMANY_PATIENT_REGEX, out=out,
            quiet=True, **recipe)
        classes = run.config["classes"]
        positive = classes.index(run.config["positive_class"])
        thresholds = run.metrics.get("thresholds")
        entry = {"val_auc": run.metrics["val"]["auc"],
                 "before": figures(evaluate(run, data, quiet=True)["metrics"])}
        try:
            entry["adabn_transductive"] = figures(evaluate(
                run, data, quiet=True, adapt_bn=[str(data / "test")])["metrics"])
            # inductive: each half scored by the model adapted on the other half
            ys, ps = [], []
            for scored, adapted_on in (("a", "b"), ("b", "a")):
                rows = evaluate(run, halves[scored], quiet=True,
                                adapt_bn=[str(p) for p in _paths(halves[adapted_on])])["rows"]
                ys += [classes.index(r["label"]) for r in rows]
                ps += [[float(r[f"prob_{c}"]) for c in classes] for r in rows]
            entry["adabn_inductive_halves"] = figures(split_summary(
                np.array(ys), np.array(ps), classes=classes, positive=positive,
                thresholds=thresholds))
        except MedtlError as exc:
            entry["adabn_refused"] = str(exc)
        entry["every_layer_transductive"] = figures(every_layer(run, test, classes, positive,
                                                                thresholds))
        results["models"][name] = entry
        for label, m in entry.items():
            if isinstance(m, dict):
                print(f"{name:>18} {label:>24}: AUC {m['auc']:.4f} "
                      f"spec@youden {m.get('youden_specificity')} "
                      f"sens@youden {m.get('youden_sensitivity')}", flush=True)
    save("adabn", results)


def every_layer(run, test, classes, positive, thresholds) -> dict:
    """AdaBN of every BatchNorm layer, frozen ImageNet ones included, on the test images,
    which are then scored: the variant medtl does not offer, measured."""
    from medtl.evaluation.summary import split_summary
    from medtl.training.loop import ImageInputs
    from medtl.transfer.adapt import adapt_batchnorm
    from medtl.transfer.fitted import iter_decoded

    model = run.load_model(quiet=True).model_
    pre = model.preprocessing
    inputs = ImageInputs(pre.model_mean, pre.model_std)
    adapt_batchnorm(model.backbone, (inputs.eval_batch(x, "cpu") for x, keep, _ in
                                     iter_decoded(test, pre, 64, skip_bad=False) if len(keep)))
    model.adapted()
    proba = model.predict_proba(test)
    return split_summary(test.labels, proba, classes=classes, positive=positive,
                         thresholds=thresholds)


def _paths(manifest: Path) -> list[str]:
    with open(manifest) as f:
        return [row["path"] for row in csv.DictReader(f)]


if __name__ == "__main__":
    main()
