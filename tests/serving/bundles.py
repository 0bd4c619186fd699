"""A tiny exported bundle built by hand (no training): an ONNX graph from normalised pixels to
probabilities, with an ``ood_score`` output, so the server is tested on its own, fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIZE = 32
CLASSES = ["NORMAL", "PNEUMONIA"]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
WEIGHTS = np.array([[3.0, -3.0], [-2.0, 4.0], [1.0, -1.5]], dtype=np.float32)
BIAS = np.array([0.3, -0.2], dtype=np.float32)
# OOD score: the squared norm of the per-channel means of the normalised image; a mid-grey
# image scores 0, a black or white one 12 (3 channels x (0.5 / 0.25)**2): above 10.
OOD_THRESHOLD = 10.0


def model_bytes(ood: bool = True) -> bytes:
    """image (N, 3, S, S) -> channel means -> linear -> softmax; and the OOD score."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W"], ["logits0"]),
             helper.make_node("Add", ["logits0", "b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])]
    if ood:
        nodes += [helper.make_node("Mul", ["flat", "flat"], ["squares"]),
                  helper.make_node("ReduceSum", ["squares", "axes"], ["ood_score"],
                                   keepdims=0)]
        outputs.append(helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["N"]))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        outputs,
        [onnx.numpy_helper.from_array(WEIGHTS, "W"), onnx.numpy_helper.from_array(BIAS, "b"),
         onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def preprocessing(ood: bool = True) -> dict:
    return {"format": 1, "size": SIZE, "resize": "squash", "interpolation": "bilinear",
            "mean": MEAN, "std": STD, "channels": 3,
            "view": {"window": "auto", "slices": "middle", "mode": "2d"},
            "classes": CLASSES, "positive_class": "PNEUMONIA",
            "operating_points": {"youden": 0.5, "sensitivity_0.9": 0.2}, "temperature": None,
            "input": {"name": "image", "layout": "NCHW", "dtype": "float32",
                      "scale": "pixels / 255 then (x - mean) / std"},
            "output": {"name": "probabilities"}, "medtl_version": "test", "run": {},
            "ood": ({"method": "mahalanobis", "threshold": OOD_THRESHOLD,
                     "modalities": ["CR", "DX"], "body_parts": ["CHEST"]} if ood else None)}


def write_bundle(root: Path, ood: bool = True) -> Path:
    from medtl.export.bundle import write_manifest

    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(model_bytes(ood))
    (root / "preprocessing.json").write_text(json.dumps(preprocessing(ood)))
    (root / "model-card.json").write_text(json.dumps({"model_details": {"name": "tiny"}}))
    write_manifest(root)
    return root


def reference(image: np.ndarray) -> np.ndarray:
    """The graph's probabilities in NumPy for an image already SIZE x SIZE (H, W, 3) uint8."""
    x = (image.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    logits = x.mean(axis=(0, 1)) @ WEIGHTS + BIAS
    e = np.exp(logits - logits.max())
    return e / e.sum()
