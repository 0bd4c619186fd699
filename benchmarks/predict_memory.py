"""Peak memory of `medtl predict` over 20,000 images of a trainable run (issue 15, point 7).

Makes synthetic JPEGs of varied size and content in a temporary folder, trains a small
trainable run (fine-tune, MobileNetV2, random weights, 1 epoch, the run's default 224 px input)
on 64 labelled images, then runs

    python -m medtl.cli predict RUN FOLDER --output predictions.csv --quiet

in a child process and reads that child's peak resident memory from ``os.wait4`` (ru_maxrss).
The target is a peak under 2 GB.

"Before" is the same code with streaming turned off (``PREDICT_CHUNK`` above the number of
images, so the whole input is decoded at once, as medtl did before issue 15), measured on fewer
images (``--before``) and extrapolated linearly to ``--n``: at 20,000 images it would need more
memory than a laptop has.

    python benchmarks/predict_memory.py [--n 20000] [--before 1000 3000] [--image-size 224]
                                        [--name predict_memory]

Writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import save
from PIL import Image

TARGET_MB = 2048
NO_STREAMING = ("import sys; import medtl.transfer.fitted as f; f.PREDICT_CHUNK = 10**9; "
                "from medtl.cli import main; main(sys.argv[1:])")


def synthetic_image(rng: np.random.Generator) -> Image.Image:
    """Noise of random size (64-192 px), grey or colour, with a bright disc or bar."""
    h, w = (int(v) for v in rng.integers(64, 193, 2))
    img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    if rng.random() < 0.5:
        img[:] = img[..., :1]
    cy, cx = int(rng.integers(8, h - 8)), int(rng.integers(8, w - 8))
    yy, xx = np.mgrid[:h, :w]
    if rng.random() < 0.5:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < int(rng.integers(16, 200))] = 230
    else:
        img[max(0, cy - 3):cy + 3, 4:w - 4] = 230
    return Image.fromarray(img)


def write_images(folder: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        synthetic_image(rng).save(folder / f"img{i:05d}.jpg", quality=90)
    return folder


def write_labelled(root: Path, n_per_class: int = 16) -> Path:
    """train/ and test/ folders of two classes the model can tell apart (disc vs bar)."""
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for cls in ("disc", "bar"):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                img = rng.integers(0, 60, (96, 96), dtype=np.uint8)
                cy, cx = rng.integers(16, 80, 2)
                yy, xx = np.mgrid[:96, :96]
                if cls == "disc":
                    img[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 230
                else:
                    img[cy - 3:cy + 3, 8:88] = 230
                Image.fromarray(img).save(d / f"p{i:03d}_{split}.png")
    return root


def run_child(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one child process, which must succeed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all children)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return usage.ru_maxrss / 1024, wall  # Linux reports KiB


def predict(run: Path, folder: Path, out: Path, n: int, *, streaming: bool) -> dict:
    args = ["predict", str(run), str(folder), "--output", str(out), "--quiet"]
    cmd = ([sys.executable, "-m", "medtl.cli", *args] if streaming
           else [sys.executable, "-c", NO_STREAMING, *args])
    peak, wall = run_child(cmd)
    with open(out, newline="") as f:
        rows = sum(1 for _ in csv.DictReader(f))
    if rows != n:
        sys.exit(f"{out}: {rows} rows for {n} images")
    print(f"  {'streaming' if streaming else 'whole input'}: {n} images, peak RSS {peak:.0f} MB,"
          f" {wall:.0f} s ({n / wall:.0f} images/s)", flush=True)
    return {"n": n, "peak_rss_mb": round(peak, 1), "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--before", type=int, nargs="*", default=[1000, 3000],
                    help="image counts for the whole-input (pre-streaming) measurement")
    ap.add_argument("--image-size", type=int, default=None,
                    help="model input side (default: the run's, 224 for MobileNetV2)")
    ap.add_argument("--name", default="predict_memory", help="results file name")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="medtl-predict-memory-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        folder = write_images(tmp / "predict", a.n, seed=0)
        print(f"wrote {a.n} images in {time.perf_counter() - t0:.0f} s", flush=True)
        run = tmp / "run"
        train = [sys.executable, "-m", "medtl.cli", "train", str(write_labelled(tmp / "data")),
                 "--strategy", "fine-tune", "--weights", "random", "--epochs", "1",
                 "--out", str(run), "--quiet"]
        if a.image_size:
            train += ["--image-size", str(a.image_size)]
        train_peak, train_wall = run_child(train)
        print(f"trained in {train_wall:.0f} s (peak {train_peak:.0f} MB)", flush=True)
        after = predict(run, folder, tmp / "after.csv", a.n, streaming=True)
        before = []
        for n in a.before:
            sub = tmp / f"before-{n}"
            sub.mkdir()
            for i in range(n):  # the first n images, linked, not copied
                os.link(folder / f"img{i:05d}.jpg", sub / f"img{i:05d}.jpg")
            before.append(predict(run, sub, tmp / f"before-{n}.csv", n, streaming=False))
    payload = {"n": a.n, "image_size": a.image_size or 224, "target_mb": TARGET_MB,
               "streaming": after, "under_target": after["peak_rss_mb"] < TARGET_MB,
               "whole_input": before}
    if len(before) >= 2:
        slope, intercept = np.polyfit([b["n"] for b in before],
                                      [b["peak_rss_mb"] for b in before], 1)
        payload["whole_input_mb_per_image"] = round(float(slope), 4)
        payload["whole_input_extrapolated_mb"] = round(float(intercept + slope * a.n))
        print(f"whole input, extrapolated to {a.n} images: "
              f"{payload['whole_input_extrapolated_mb']} MB ({slope * 1024:.0f} KB per image)")
    print(f"streaming peak {after['peak_rss_mb']:.0f} MB for {a.n} images: "
          f"{'under' if payload['under_target'] else 'OVER'} the {TARGET_MB} MB target")
    save(a.name, payload)


if __name__ == "__main__":
    main()
