"""Frozen feature extraction speed: medtl's pipeline against a plain PyTorch loop.

For each backbone (random weights: speed does not depend on their values), at 224 px on this
machine's CPU, on real Kermany chest X-rays:
- plain loop: torchvision ImageFolder + DataLoader(batch 64) + the eager NCHW model under
  torch.no_grad(), the loop most tutorials write;
- medtl: FeatureExtractor (ONNX Runtime on CPU, cache off), after its one-off export.
Prints img/s, achieved GFLOP/s against this machine's measured float32 matmul peak, and the
ratio medtl / plain. Writes benchmarks/results/feature_extraction.json.

    python benchmarks/feature_extraction.py [--images 256] [--backbones a,b]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _common import SHARED_DATA, require, save
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms

from medtl.data import load_dataset
from medtl.data.transforms import Preprocessing
from medtl.models import create_backbone
from medtl.training.features import FeatureExtractor

DEFAULT = "mobilenet_v2,efficientnet_lite0,resnet18,resnet50,densenet121"


def _best_rate(fn, flops: float, seconds: float) -> float:
    fn()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def matmul_peak_gflops(n: int = 2048, seconds: float = 2.0) -> dict[str, float]:
    """Best float32 GEMM rate of three libraries: the machine's practical peak is the best one.

    On AMD CPUs MKL (torch) may not take its AVX-512 path, so torch alone can understate the
    peak that ONNX Runtime's own kernels (MLAS) reach.
    """
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    flops = 2.0 * n**3
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "mm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return {
        "torch": _best_rate(lambda: torch.mm(a, b), flops, seconds),
        "numpy": _best_rate(lambda: np.matmul(an, bn), flops, seconds),
        "onnxruntime": _best_rate(lambda: sess.run(None, {"A": an, "B": bn}), flops, seconds),
    }


def gflop_per_image(model: torch.nn.Module, size: int = 224) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


class Features(torch.nn.Module):
    def __init__(self, bb):
        super().__init__()
        self.bb = bb

    def forward(self, x):
        return self.bb.forward_features(x)


def plain_loop(model, root, n_images, mean, std) -> float:
    tf = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(),
                             transforms.Normalize(mean, std)])
    ds = datasets.ImageFolder(str(root), transform=tf)
    ds = Subset(ds, range(0, len(ds), max(1, len(ds) // n_images))[:n_images])
    loader = DataLoader(ds, batch_size=64, shuffle=False, num_workers=0)
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    return len(ds) / (time.perf_counter() - t0)


def medtl_pipeline(bb, data, cache_dir) -> tuple[float, float, str]:
    ext = FeatureExtractor(bb, Preprocessing.for_spec(bb.spec, 224), cache=False,
                           cache_dir=cache_dir, quiet=True, batch_size=64)
    t0 = time.perf_counter()
    ext._runner()  # one-off export and check, timed apart
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    ext.transform(data)
    return len(data) / (time.perf_counter() - t0), setup, ext.engine_used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--backbones", default=DEFAULT)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = require(SHARED_DATA / "chest_xray_kermany_224" / "test")
    data = load_dataset(root)
    data = data.subset(range(0, len(data), max(1, len(data) // args.images))[:args.images])
    import tempfile

    cache_dir = tempfile.mkdtemp(prefix="medtl-bench-")
    peaks = matmul_peak_gflops()
    peak = max(peaks.values())
    print("float32 matmul, best GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
          + f"; peak used: {peak:.0f} ({os.cpu_count()} cores, torch {torch.__version__})")
    print(f"{'backbone':<20}{'GFLOP/img':>10}{'plain img/s':>13}{'medtl img/s':>13}"
          f"{'ratio':>7}{'medtl GFLOP/s':>15}{'% peak':>8}  engine")
    rows = []
    for name in args.backbones.split(","):
        torch.manual_seed(0)
        bb = create_backbone(name, weights="random").eval()
        model = Features(bb)
        gflop = gflop_per_image(model)
        plain = plain_loop(model, root, args.images, bb.spec.mean, bb.spec.std)
        fast, setup, engine = medtl_pipeline(bb, data, cache_dir)
        row = {"backbone": name, "gflop_per_image": gflop, "plain_img_s": plain,
               "medtl_img_s": fast, "ratio": fast / plain, "medtl_gflop_s": fast * gflop,
               "percent_of_peak": 100 * fast * gflop / peak,
               "plain_percent_of_peak": 100 * plain * gflop / peak,
               "export_and_check_s": setup, "engine": engine, "images": len(data)}
        rows.append(row)
        print(f"{name:<20}{gflop:>10.2f}{plain:>13.1f}{fast:>13.1f}{fast / plain:>7.1f}"
              f"{fast * gflop:>15.0f}{row['percent_of_peak']:>8.0f}  {engine}", flush=True)
    save("feature_extraction", {"matmul_peak_gflop_s": peak, "matmul_gflop_s": peaks,
                                "image_size": 224,
                                "batch_size": 64, "rows": rows})


if __name__ == "__main__":
    main()
