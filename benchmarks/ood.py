"""The out-of-distribution guard on real data (issue 16, acceptance 6): a Kermany chest X-ray run
should flag CT and MR slices and breast ultrasound, and few of its own test X-rays.

    python benchmarks/ood.py [--run DIR] [--out DIR]

Uses ``--run`` when it holds a medtl run with a detector (model/ood.npz), else trains one:
MobileNetV2, hybrid logreg, 224 px, on the official Kermany train split (validation carved by
patient; the threshold is the 99th percentile of validation distances, chosen before any test
image is seen). Then the fraction flagged on: the 624 Kermany test X-rays, pydicom's shipped
CT_small.dcm and MR_small.dcm (../shared/data/io_samples), and the 156 BreastMNIST test images.
Writes benchmarks/results/ood.json. Nothing here is tuned on these figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import SHARED_DATA, machine, require, save

import medtl
from medtl.data import KERMANY_PATIENT_REGEX, load_dataset
from medtl.run import load_run
from medtl.transfer.ood import OOD_FILE
from medtl.workflow import predict


def kermany_run(run_dir: Path) -> Path:
    if (run_dir / "model" / OOD_FILE).is_file():
        return run_dir
    data = require(SHARED_DATA / "chest_xray_kermany_224")
    t0 = time.perf_counter()
    medtl.train(data, out=run_dir, backbone="mobilenet_v2", strategy="hybrid", head="logreg",
                weights="imagenet", image_size=224, patient_regex=KERMANY_PATIENT_REGEX,
                quiet=True, overwrite=True)
    print(f"trained {run_dir} in {time.perf_counter() - t0:.0f} s")
    return run_dir


def flagged(model, ds) -> dict:
    _, scores = model.predict_proba_ood(ds)
    flags = model.ood.flag(scores)
    return {"n": len(ds), "flagged": int(flags.sum()), "fraction": float(flags.mean()),
            "score_median": float(np.nanmedian(scores)), "score_min": float(np.nanmin(scores))}


def bundle_figures(run_dir: Path, *splits_and_files) -> dict:
    """The same images through the exported ONNX bundle (its in-graph score and threshold)."""
    from medtl.export.bundle import load_bundle
    from medtl.export.writer import export_run

    with tempfile.TemporaryDirectory() as tmp:
        exported = load_bundle(export_run(load_run(run_dir), Path(tmp) / "bundle"))
        figures = {}
        for name, data in zip(("kermany_test", "breastmnist_test", "dicom"), splits_and_files,
                              strict=True):
            ds = exported.dataset(data) if name == "dicom" else data
            _, scores = exported.predict_dataset_ood(ds)
            flags = scores > exported.ood["threshold"]
            figures[name] = {"n": len(ds), "flagged": int(flags.sum())}
    for name, f in figures.items():
        print(f"bundle {name}: {f['flagged']}/{f['n']} flagged")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/kermany-ood"))
    args = parser.parse_args()
    run_dir = kermany_run(args.run)
    clf = load_run(run_dir).load_model(quiet=True)
    model = clf.model_
    det = model.ood
    out = {"run": str(run_dir), "detector": det.record(), "n_fit": det.n_fit_,
           "machine": machine()}
    kermany = load_dataset(require(SHARED_DATA / "chest_xray_kermany_224"))
    out["kermany_test"] = flagged(model, kermany.split("test"))
    samples = require(SHARED_DATA / "io_samples")
    rows = predict(run_dir, [samples / "CT_small.dcm", samples / "MR_small.dcm"], quiet=True)
    out["dicom"] = {r["path"]: {k: r[k] for k in ("ood_score", "ood", "ood_reason",
                                                   "prediction")} for r in rows}
    breast = load_dataset(require(SHARED_DATA / "breastmnist_28_resaved.npz"))
    out["breastmnist_test"] = flagged(model, breast.split("test"))
    out["bundle"] = bundle_figures(run_dir, kermany.split("test"), breast.split("test"),
                                   [samples / "CT_small.dcm", samples / "MR_small.dcm"])
    print(f"threshold {det.threshold_:.2f} = {det.percentile:g}th percentile of "
          f"{det.n_threshold_} {det.fitted_on_} distances ({det.n_fit_} training images)")
    for name in ("kermany_test", "breastmnist_test"):
        f = out[name]
        print(f"{name}: {f['flagged']}/{f['n']} flagged ({100 * f['fraction']:.1f} %), "
              f"median distance {f['score_median']:.2f}")
    for path, r in out["dicom"].items():
        print(f"{path}: ood={r['ood']} distance {r['ood_score']:.2f} "
              f"(would predict {r['prediction']})")
    save("ood", out)


if __name__ == "__main__":
    main()
