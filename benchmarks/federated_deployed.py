"""The Kermany three-site federation in Flower's deployment engine, every site a process.

A SuperLink (``flower-superlink``), three ``medtl federate-site`` SuperNodes (sites A, B, C of
``scripts/kermany_sites.py``) and ``medtl federate --superlink``, all on loopback on this
machine; then each site scores the model on its own test split (``medtl evaluate RUN DATA``), as
hospitals would. Reported: wall time of the federation and per round, and each site's test AUC
with its 95 % CI (to set beside the simulation's, benchmarks/federated.py).

    python benchmarks/federated_deployed.py [--rounds 20] [--local-epochs 5]
        [--runs /work/bench-runs/federated]

Writes benchmarks/results/federated_deployed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from _common import save
from federated import kermany_sites

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], home: Path, log: Path) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "FLWR_HOME": str(home)}
    return subprocess.Popen(cmd, env=env, stdout=open(log, "ab"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=5)
    ap.add_argument("--runs", default="/work/bench-runs/federated")
    args = ap.parse_args()
    os.environ.setdefault("MEDTL_OFFLINE", "1")
    runs = Path(args.runs)
    sites = dict(zip("abc", kermany_sites(runs), strict=True))
    work = runs / "deployed"
    work.mkdir(parents=True, exist_ok=True)
    out = work / "run"
    port = free_port()
    procs = [start([str(BIN / "flower-superlink"), "--insecure", "--port", str(port),
                    "--disable-runtime-dependency-installation"], work / "home-link",
                   work / "link.log")]
    try:
        time.sleep(2)
        for s in "abc":
            procs.append(start([sys.executable, "-m", "medtl", "federate-site",
                                str(sites[s]), "--superlink",
                                f"127.0.0.1:{port}", "--insecure", "--port", str(free_port())],
                               work / f"home-{s}", work / f"site-{s}.log"))
        time.sleep(5)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "medtl", "federate", "--superlink",
                        f"127.0.0.1:{port}", "--insecure", "--classes", "NORMAL,PNEUMONIA",
                        "--min-sites", "3", "--rounds", str(args.rounds), "--local-epochs",
                        str(args.local_epochs), "--out", str(out), "--overwrite", "--quiet"],
                       check=True)
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(60)
    rounds = json.loads((out / "federation" / "rounds.json").read_text())
    sites = {}
    for s in "abc":
        report = subprocess.run([sys.executable, "-m", "medtl", "evaluate", str(out),
                                 str(sites[s]), "--json", "--quiet"],
                                check=True, capture_output=True, text=True)
        m = json.loads(report.stdout)
        test = m.get("test", m)
        sites[f"site_{s}"] = {"test_auc": test["auc"], "test_auc_ci95": test.get("auc_ci95"),
                              "n": test["n"]}
        print(f"site_{s}: test AUC {test['auc']:.4f} {test.get('auc_ci95')}", flush=True)
    per_round = [b["seconds"] - a["seconds"] for a, b in zip(rounds, rounds[1:], strict=False)]
    result = {"rounds": args.rounds, "local_epochs": args.local_epochs, "wall_s": wall,
              "median_round_s": sorted(per_round)[len(per_round) // 2] if per_round else None,
              "sites": sites, "history": rounds}
    print(f"federation {wall:.1f} s for {args.rounds} rounds "
          f"(median round {result['median_round_s']} s)")
    save("federated_deployed", result)


if __name__ == "__main__":
    main()
