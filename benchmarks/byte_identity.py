"""Do two medtl versions write the same results? The demo and a Kermany hybrid run, byte for byte.

    python benchmarks/byte_identity.py [--base 058ef25] [--image-size 112]

Makes a git worktree of ``--base`` in a temporary folder and runs, with each source tree
(``PYTHONPATH`` pointing at it, the same interpreter, a feature cache of its own so neither
reuses the other's features): ``medtl.demo`` and ``medtl.train`` of MobileNetV2 + logistic
regression (hybrid) on the Kermany chest X-rays of ../shared/data at ``--image-size`` px, with
the patient regex. Then compares predictions.csv byte for byte and metrics.json with its
``timing`` block cut out (times differ between any two runs). The demo's images ship inside the
package, so the source tree's folder starts each of its paths: that prefix is replaced by one
placeholder in both files before comparing. Writes benchmarks/results/byte_identity.json; exits
1 when anything differs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, SHARED_DATA, require, save

TRAIN = """
import medtl.workflow as w
w.demo({out!r} + "/demo", quiet=True)
w.train({data!r}, backbone="mobilenet_v2", strategy="hybrid", head="logreg",
        image_size={size}, patient_regex=r"(person\\d+|IM-\\d+)", out={out!r} + "/kermany",
        quiet=True)
"""


def run_tree(src: Path, out: Path, data: Path, size: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(src), "MEDTL_CACHE_DIR": str(out / "cache")}
    code = TRAIN.format(out=str(out), data=str(data), size=size)
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def cut_timing(text: str) -> str:
    start = text.index('  "timing": {')
    return text[:start] + text[text.index("}", start) + 1:]


def compare(a: Path, b: Path, prefixes: tuple[str, str]) -> dict:
    pa = (a / "predictions.csv").read_bytes().replace(prefixes[0].encode(), b"SRC")
    pb = (b / "predictions.csv").read_bytes().replace(prefixes[1].encode(), b"SRC")
    ma = cut_timing((a / "metrics.json").read_text())
    mb = cut_timing((b / "metrics.json").read_text())
    return {"predictions_identical": pa == pb, "predictions_sha256": hashlib.sha256(pb).hexdigest(),
            "predictions_bytes": len(pb), "metrics_identical_outside_timing": ma == mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="058ef25", help="the revision to compare against")
    ap.add_argument("--image-size", type=int, default=112)
    args = ap.parse_args()
    data = require(SHARED_DATA / "chest_xray_kermany_224")
    tmp = Path(tempfile.mkdtemp(prefix="medtl-identity-"))
    base_tree = tmp / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree),
                    args.base], check=True, capture_output=True)
    try:
        trees = {"base": base_tree / "src", "head": ROOT / "src"}
        for name, src in trees.items():
            print(f"running {name} ({src}) ...", flush=True)
            run_tree(src, tmp / name, data, args.image_size)
        results = {run: compare(tmp / "base" / run, tmp / "head" / run,
                                (str(trees["base"]), str(trees["head"])))
                   for run in ("demo", "kermany")}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                       check=False, capture_output=True)
    for run, r in results.items():
        print(f"{run}: predictions.csv {'identical' if r['predictions_identical'] else 'DIFFER'}"
              f" ({r['predictions_bytes']} bytes), metrics.json outside timing "
              f"{'identical' if r['metrics_identical_outside_timing'] else 'DIFFER'}")
    save("byte_identity", {"base": args.base, "image_size": args.image_size, **results})
    ok = all(v for r in results.values() for k, v in r.items() if k.endswith("identical")
             or k.endswith("timing"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
