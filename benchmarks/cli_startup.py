"""``medtl --help`` wall time: a base revision against this working tree, in one run.

The base revision (default 058ef25, the last commit before issue 14) is checked out with
``git worktree`` into a temporary folder, removed at the end. Both source trees are timed with
this same interpreter (so with the same installed libraries), each call a fresh process:

    python -c "import sys; sys.path.insert(0, SRC); from medtl.cli import main; main(['--help'])"

alternating base and this tree so that a drift in the machine's speed hits both, after one
untimed warm-up each (bytecode compiled, files in the page cache). Wall time is measured around
the whole process, as a user waits for it. Each call also reports which of torch, scikit-learn,
matplotlib and SciPy it loaded, and which medtl it ran. Prints median and min per tree and writes
benchmarks/results/cli_startup.json.

    python benchmarks/cli_startup.py [--base 058ef25] [--repeat 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, save

HEAVY = ("torch", "sklearn", "matplotlib", "scipy")
PROBE = """import sys
sys.path.insert(0, {src!r})
from medtl.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
import json, medtl
print(json.dumps({{"medtl": medtl.__file__, "loaded": [m for m in {heavy!r} if m in sys.modules]}}),
      file=sys.stderr)
"""


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def time_help(src: Path) -> tuple[float, dict]:
    """Seconds for one ``medtl --help`` from source tree ``src``, and what it loaded."""
    code = PROBE.format(src=str(src), heavy=HEAVY)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or "Usage" not in proc.stdout:
        sys.exit(f"medtl --help failed from {src}:\n{proc.stderr}")
    info = json.loads(proc.stderr.strip().splitlines()[-1])
    if not info["medtl"].startswith(str(src)):
        sys.exit(f"expected medtl from {src}, ran {info['medtl']}")
    return seconds, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="058ef25", help="git revision to compare against")
    ap.add_argument("--repeat", type=int, default=10, help="timed calls per source tree")
    args = ap.parse_args()

    base_rev = _git("rev-parse", args.base)
    head_rev = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "src"))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="medtl-base-") as tmp:
        base_tree = Path(tmp) / "tree"
        _git("worktree", "add", "--detach", str(base_tree), base_rev)
        try:
            trees = {"base": base_tree / "src", "this tree": ROOT / "src"}
            info = {name: time_help(src)[1] for name, src in trees.items()}  # warm-up
            samples: dict[str, list[float]] = {name: [] for name in trees}
            for _ in range(args.repeat):
                for name, src in trees.items():
                    samples[name].append(time_help(src)[0])
        finally:
            _git("worktree", "remove", "--force", str(base_tree))

    results = {}
    for name, s in samples.items():
        results[name] = {"median_s": statistics.median(s), "min_s": min(s),
                         "samples_s": [round(x, 4) for x in s],
                         "heavy_modules_loaded": info[name]["loaded"]}
        print(f"{name:>10}: median {results[name]['median_s']:.3f} s, min "
              f"{results[name]['min_s']:.3f} s over {len(s)} calls; loads "
              f"{', '.join(info[name]['loaded']) or 'none of ' + ', '.join(HEAVY)}")
    ratio = results["base"]["median_s"] / results["this tree"]["median_s"]
    print(f"medtl --help is {ratio:.1f}x faster (median) than at {args.base}")
    save("cli_startup", {
        "what": "wall time of `medtl --help` in a fresh process, same interpreter, "
                "base revision against this tree, calls alternated after one warm-up each",
        "base": {"rev": base_rev, **results["base"]},
        "this_tree": {"rev": head_rev, "uncommitted_changes_in_src": dirty,
                      **results["this tree"]},
        "repeat": args.repeat,
        # Other processes slow both trees alike (calls alternate), not the ratio.
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "speedup_median": ratio,
    })


if __name__ == "__main__":
    main()
