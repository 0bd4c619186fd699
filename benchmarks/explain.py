"""Seconds for 32 attribution maps at 224 px on this machine, per method, on real chest X-rays.

    python benchmarks/explain.py [--run RUN] [--images 32] [--sanity 8]
                                 [--methods gradcam,gradcam++,...] [--name explain]

The images are the first half NORMAL, half PNEUMONIA files of Kermany's test split at 224 px.
The model is RUN's (e.g. a Kermany run from `medtl train`), or else MobileNetV2 with its ImageNet
weights and a new two-class head (the same arithmetic as a fine-tuned run). With ``--sanity N``
each method also gets Adebayo et al.'s model randomisation check on the first N images: the
median Spearman correlation between trained and randomised-backbone maps (meaningful with a
trained RUN). Prints a table and writes benchmarks/results/explain.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import SHARED_DATA, require, save

import medtl
from medtl.data.transforms import Preprocessing
from medtl.explain import METHODS, Explainer, randomisation_check
from medtl.explain.runs import BATCH, model_input


def _images(n: int) -> list[np.ndarray]:
    from PIL import Image

    root = require(SHARED_DATA / "chest_xray_kermany_224" / "test")
    files = [p for cls in ("NORMAL", "PNEUMONIA")
             for p in sorted((root / cls).glob("*.jpeg"))[: n // 2]]
    return [np.asarray(Image.open(p).convert("RGB")) for p in files]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--sanity", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--name", default="explain", help="results file: results/NAME.json")
    args = ap.parse_args()
    if args.run:
        clf = medtl.load_run(args.run).load_model(quiet=True)
        explainer = Explainer.for_classifier(clf)
        model = f"{args.run} ({clf.backbone}, {clf.strategy})"
    else:
        backbone = medtl.create_backbone("mobilenet_v2", weights="imagenet")
        backbone.reset_classifier(2)
        explainer = Explainer.for_backbone(backbone.eval())
        preprocessing = Preprocessing.for_spec(backbone.spec, 224)
        model = "mobilenet_v2 ImageNet + new 2-class head"
    if args.run:
        preprocessing = clf.model_.preprocessing
    size = preprocessing.size
    pixels = model_input(preprocessing, _images(args.images))
    with torch.no_grad():
        targets = explainer.scores(pixels).argmax(1).tolist()
    explainer.maps(pixels[:1], targets[:1], "gradcam")  # imports and first-call set-up, untimed
    rows = []
    print(f"{len(pixels)} Kermany test images at {size} px, {model}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'method':<22}{'seconds':>9}{'maps/s':>9}{'sanity rho':>12}")
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        maps = np.concatenate([explainer.maps(pixels[s:s + BATCH], targets[s:s + BATCH], method)
                               for s in range(0, len(pixels), BATCH)])
        seconds = time.perf_counter() - t0
        row = {"method": method, "images": len(pixels), "size": size, "seconds": seconds,
               "maps_per_s": len(pixels) / seconds}
        if args.sanity:
            k = min(args.sanity, len(pixels))
            check = randomisation_check(explainer, pixels[:k], targets[:k], method,
                                        maps=maps[:k])
            row["sanity_median_spearman"] = check["median_spearman"]
            row["sanity_spearman"] = check["spearman"]
        rows.append(row)
        rho = row.get("sanity_median_spearman")
        print(f"{method:<22}{seconds:>9.1f}{row['maps_per_s']:>9.2f}"
              f"{'' if rho is None else f'{rho:>12.3f}'}", flush=True)
    save(args.name, {"model": model, "images": len(pixels), "size": size, "results": rows})


if __name__ == "__main__":
    main()
