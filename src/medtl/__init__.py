"""medtl: transfer learning for medical image classification.

>>> import medtl
>>> ds = medtl.load_dataset("chest_xray/", patient_regex=r"(person\\d+|IM-\\d+)")
>>> clf = medtl.TransferClassifier("mobilenet_v2", strategy="hybrid", head="logreg")
>>> clf.fit(ds.split("train"), val=ds.split("val")).predict_proba(ds.split("test"))
"""

from __future__ import annotations

import importlib
from typing import Any

from medtl.errors import DataReadError, MedtlError, WeightsError

__version__ = "0.1.0"

# The public names below are imported on first use (PEP 562), not by `import medtl`: they pull
# in torch, scikit-learn and SciPy (seconds), which `medtl --help`, `medtl.__version__` and the
# error types do not need. Each name maps to the module that defines it.
_LAZY = {
    "Run": "medtl.run",
    "Strategy": "medtl.transfer.strategies",
    "TrainOptions": "medtl.training.options",
    "TransferClassifier": "medtl.transfer.estimator",
    "create_backbone": "medtl.models",
    "demo": "medtl.workflow",
    "ensemble": "medtl.ensembles",
    "evaluate": "medtl.workflow",
    "list_specs": "medtl.models",
    "load_dataset": "medtl.data",
    "load_run": "medtl.run",
    "predict": "medtl.workflow",
    "pretrain": "medtl.training.pretrain",
    "register_strategy": "medtl.transfer.strategies",
    "save_run": "medtl.run",
    "train": "medtl.workflow",
}

__all__ = [
    "DataReadError", "MedtlError", "Run", "Strategy", "TrainOptions", "TransferClassifier",
    "WeightsError", "__version__", "create_backbone", "demo", "ensemble", "evaluate", "list_specs",
    "load_dataset", "load_run", "predict", "pretrain", "register_strategy", "save_run", "train",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medtl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
