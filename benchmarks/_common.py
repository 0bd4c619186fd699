"""Helpers shared by the benchmark scripts: where the real data is, machine description, JSON."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDTL_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "results"


def require(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"benchmark data not found: {path} (set MEDTL_SHARED_DATA)")
    return path


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version()}


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv), **payload},
                               indent=2) + "\n")
    print(f"wrote {path}")
    return path


EPS = 1e-7


def _log_loss(run, split: str, classes: list[str]) -> float | None:
    """Mean negative log-probability of the true class over ``split``'s rows."""
    total, n = 0.0, 0
    for row in run.predictions():
        if row.get("split") != split:
            continue
        p = float(row[f"prob_{row['label']}"]) if row["label"] in classes else math.nan
        total -= math.log(min(max(p, EPS), 1.0))
        n += 1
    return total / n if n else None


def run_figures(run) -> dict:
    """A run's validation and test figures: AUC (with CI), accuracy at the arg-max and at
    the operating points chosen on validation, log-loss."""
    classes = list(run.config["classes"])
    out: dict = {}
    for split in ("val", "test"):
        m = run.metrics.get(split) or {}
        out[f"{split}_auc"] = m.get("auc")
        out[f"{split}_auc_ci95"] = m.get("auc_ci95_delong") or m.get("auc_ci95")
        out[f"{split}_accuracy"] = m.get("accuracy")
        out[f"{split}_n"] = m.get("n")
        out[f"{split}_log_loss"] = _log_loss(run, split, classes)
        for name, op in (m.get("operating_points") or {}).items():
            counts = [op.get(k) for k in ("tp", "fp", "tn", "fn")]
            if None not in counts and sum(counts):
                out[f"{split}_accuracy_{name}"] = (op["tp"] + op["tn"]) / sum(counts)
                out[f"{split}_sensitivity_{name}"] = op.get("sensitivity")
                out[f"{split}_specificity_{name}"] = op.get("specificity")
                out[f"threshold_{name}"] = op.get("threshold")
    return out
