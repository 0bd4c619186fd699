"""medtl: transfer learning for medical image classification.

>>> import medtl
>>> ds = medtl.load_dataset("chest_xray/", patient_regex=r"(person\\d+|IM-\\d+)")
>>> clf = medtl.TransferClassifier("mobilenet_v2", strategy="hybrid", head="logreg")
>>> clf.fit(ds.split("train"), val=ds.split("val")).predict_proba(ds.split("test"))
"""

from __future__ import annotations

__version__ = "0.1.0"

from medtl.data import load_dataset
from medtl.errors import DataReadError, MedtlError, WeightsError
from medtl.models import create_backbone, list_specs
from medtl.run import Run, load_run
from medtl.transfer.strategies import TransferClassifier
from medtl.workflow import demo, evaluate, predict, train

__all__ = [
    "DataReadError", "MedtlError", "Run", "TransferClassifier", "WeightsError", "__version__",
    "create_backbone", "demo", "evaluate", "list_specs", "load_dataset", "load_run", "predict",
    "train",
]
