"""Would the tests catch a wiring mistake? Apply each one-line mutation of issue 14 to a clean
copy of the code and check that the suite's tests fail, without ../shared/data.

    python scripts/check_mutations.py [--rev HEAD] [--only NAME]

Makes a git worktree of ``--rev`` in a temporary folder (nothing beside it is named ``shared``,
so every test that needs the real data skips, as in a user's fresh clone), then for each
mutation: applies it (an exact text replacement that must match once), runs the test files
listed for it with this interpreter and ``PYTHONPATH`` on the worktree, records how many tests
failed, and restores the file. Prints one line per mutation and exits 1 when a mutation
survives (no test failed). The unmutated code is run first and must pass.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("linear head without standardisation", "src/medtl/transfer/heads.py",
             "        head.standardise_like(xt)\n", "        pass\n",
             ("tests/core/test_heads.py",)),
    Mutation("frozen blocks not kept in eval mode", "src/medtl/transfer/freezing.py",
             "                block.eval()\n", "                pass\n",
             ("tests/core/test_backbone_state.py",)),
    Mutation("hybrid head fitted on train + validation", "src/medtl/transfer/heads.py",
             "            est = clone(est).fit(x, y)\n",
             "            est = clone(est).fit(np.concatenate([x, x_val]), "
             "np.concatenate([y, y_val]))\n",
             ("tests/core/test_heads.py",)),
    Mutation("ONNX features multiplied by 2", "src/medtl/training/features.py",
             "            return session.run(None, {input_name: pixels})[0]\n",
             "            return session.run(None, {input_name: pixels})[0] * 2\n",
             ("tests/core/test_onnx_features.py",)),
    Mutation("no fallback to PyTorch after a failed export", "src/medtl/training/features.py",
             "                if self.engine == \"onnx\":\n                    raise\n",
             "                raise\n",
             ("tests/core/test_onnx_features.py",)),
    Mutation("thresholds chosen on test", "src/medtl/workflow.py",
             "        if split == \"val\":\n            # Operating points are chosen here",
             "        if split == \"test\":\n            # Operating points are chosen here",
             ("tests/core/test_run_files.py",)),
    Mutation("first class taken as positive", "src/medtl/workflow.py",
             "    positive = len(ds.classes) - 1 if len(ds.classes) == 2 else None\n",
             "    positive = 0 if len(ds.classes) == 2 else None\n",
             ("tests/core/test_run_files.py",)),
    Mutation("linear probe folded without the scale", "src/medtl/transfer/heads.py",
             "            weight = self.fc.weight / self.std\n",
             "            weight = self.fc.weight * 1.0\n",
             ("tests/core/test_heads.py",)),
    # Federated learning (issue 19): what crosses the network, and how sites train.
    Mutation("a site's reply may carry any record", "src/medtl/federated/shared.py",
             "    if keys != want:\n", "    if not want <= keys:\n",
             ("tests/federated/test_shared.py",)),
    Mutation("any number passes as a count", "src/medtl/federated/shared.py",
             "    extra = sorted(set(metrics) - allowed)\n", "    extra = []\n",
             ("tests/federated/test_shared.py",)),
    Mutation("the site's guard lets its reply through unchecked", "src/medtl/federated/apps.py",
             "    if reply.has_error():\n        return reply\n    plan = _plan_of(msg)\n",
             "    if True:\n        return reply\n    plan = _plan_of(msg)\n",
             ("tests/federated/test_shared.py",)),
    Mutation("the head's standardisation travels", "src/medtl/federated/local.py",
             "        return [n for n, p in model.named_parameters() if p.requires_grad]\n",
             "        return shared_names(model) + [\"mean\", \"std\"]\n",
             ("tests/federated/test_shared.py",)),
    Mutation("frozen blocks travel", "src/medtl/federated/shared.py",
             "    names = [n for n, p in module.named_parameters() if p.requires_grad]\n",
             "    names = [n for n, p in module.named_parameters()]\n",
             ("tests/federated/test_shared.py",)),
    Mutation("FedProx pushes away from the global model", "src/medtl/federated/local.py",
             "        return grad + mu * (p.detach() - anchor)\n",
             "        return grad - mu * (p.detach() - anchor)\n",
             ("tests/federated/test_local.py",)),
    Mutation("DP noise drawn from the plan's seed", "src/medtl/federated/local.py",
             "secrets.randbits(63) if private else seed", "seed",
             ("tests/federated/test_local.py",)),
    Mutation("a round goes on below --min-sites", "src/medtl/federated/apps.py",
             "        if train and len(good) < plan.min_sites:\n",
             "        if False:\n",
             ("tests/federated/test_shared.py",)),
    # AdaBN (issue 20): the target's statistics, and only those.
    Mutation("AdaBN leaves BatchNorm in eval mode", "src/medtl/transfer/adapt.py",
             "        m.momentum = None  # a cumulative average: every target image counts the "
             "same\n        m.train()\n",
             "        m.momentum = None  # a cumulative average: every target image counts the "
             "same\n        m.eval()\n",
             ("tests/transfer/test_adapt.py", "tests/test_adapt_run.py")),
    Mutation("AdaBN keeps BatchNorm's momentum", "src/medtl/transfer/adapt.py",
             "        m.momentum = None  # a cumulative average",
             "        pass  # a cumulative average",
             ("tests/transfer/test_adapt.py",)),
    # Learning curves (issue 20): budgets by patient, test never drawn from.
    Mutation("curve validation carved without patients", "src/medtl/curve.py",
             "carve_validation(y[chosen], sub_patients,",
             "carve_validation(y[chosen], None,",
             ("tests/test_curve.py",)),
    Mutation("curve budgets drawn from the test split too", "src/medtl/curve.py",
             'if r.split in ("train", "val")]',
             'if r.split in ("train", "val", "test")]',
             ("tests/test_curve.py",)),
    Mutation("prototype head without standardisation", "src/medtl/transfer/heads.py",
             "make_pipeline(StandardScaler(), PrototypeClassifier())",
             "make_pipeline(PrototypeClassifier())",
             ("tests/transfer/test_prototype.py",)),
    # issue 21: multi-label
    Mutation("multi-label loss reads unknown targets as absent", "src/medtl/training/loop.py",
             "    return torch.where(known, each, torch.zeros_like(each)).sum(), known.sum()\n",
             "    return each.sum(), torch.tensor(each.numel())\n",
             ("tests/transfer/test_multilabel_training.py",)),
    Mutation("multi-label one-vs-rest head fitted on unknown targets as absent",
             "src/medtl/transfer/heads.py",
             "            known = ~np.isnan(y[:, k])\n            t = y[known, k]",
             "            known = np.ones(len(y), dtype=bool)\n"
             "            t = np.nan_to_num(y[known, k])",
             ("tests/transfer/test_multilabel_training.py",)),
    Mutation("multi-label thresholds chosen on test", "src/medtl/workflow.py",
             "        if split == \"val\":\n            # Operating points are chosen here",
             "        if split == \"test\":\n            # Operating points are chosen here",
             ("tests/test_multilabel_run.py",)),
    Mutation("multi-label uncertain labels read as absent under --uncertain ones",
             "src/medtl/data/sources.py",
             '_UNCERTAIN_VALUE = {"ignore": math.nan, "zeros": 0.0, "ones": 1.0}',
             '_UNCERTAIN_VALUE = {"ignore": math.nan, "zeros": 0.0, "ones": 0.0}',
             ("tests/data/test_multilabel_data.py",)),
    Mutation("multi-label bundle exported with a softmax over labels",
             "src/medtl/export/writer.py",
             "            return torch.sigmoid(self.module(x))\n",
             "            return torch.softmax(self.module(x), dim=1)\n",
             ("tests/export/test_multilabel_export.py",)),
)


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[int, int, float]:
    """(failed, passed, seconds) of pytest on ``tests`` in ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *tests], cwd=tree, env=env, capture_output=True, text=True)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    count = {k: int(n) for n, k in re.findall(r"(\d+) (failed|passed|error)", tail)}
    return count.get("failed", 0) + count.get("error", 0), count.get("passed", 0), \
        time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--only", default=None, help="run only the mutations whose name has this")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medtl-mutations-"))
    tree = tmp / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.rev],
                   check=True, capture_output=True)
    survived = []
    try:
        chosen = [m for m in MUTATIONS if not args.only or args.only in m.name]
        baseline = sorted({t for m in chosen for t in m.tests})
        failed, passed, secs = run_tests(tree, tuple(baseline))
        print(f"unmutated: {passed} passed, {failed} failed ({secs:.0f} s)", flush=True)
        if failed:
            sys.exit("the unmutated code fails its tests: fix that first")
        for m in chosen:
            path = tree / m.file
            original = path.read_text()
            if original.count(m.old) != 1:
                sys.exit(f"{m.name}: the line to mutate is not found once in {m.file}")
            path.write_text(original.replace(m.old, m.new))
            try:
                failed, passed, secs = run_tests(tree, m.tests)
            finally:
                path.write_text(original)
            verdict = "caught" if failed else "SURVIVED"
            if not failed:
                survived.append(m.name)
            print(f"{m.name}: {verdict} ({failed} failed, {passed} passed in "
                  f"{', '.join(m.tests)}; {secs:.0f} s)", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       check=False, capture_output=True)
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
