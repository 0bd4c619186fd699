"""CPU training speed (channels_last, bf16 autocast, torch.compile) and int8 frozen features.

Training part (issue 18, point 4): for each backbone and input size, full fine-tuning (every
block trains, discriminative learning rates, AdamW, basic augmentation, cross-entropy) runs
through medtl's own training step, ``medtl.training.loop._train_epoch``, in these
configurations, all in one process:

- ``today``: what medtl does now: channels_last model and batches, float32;
- ``nchw``: float32 with the model and batches in the default NCHW layout (reference);
- ``bf16``: ``today`` with the forward pass under ``torch.autocast("cpu", torch.bfloat16)``
  (the loop's ``_autocast`` hook patched, which is the change a ``precision`` option would make);
- ``bf16_dwfp32``: ``bf16`` with the depthwise convolutions kept in float32 (their bf16
  backward is slower than float32's in oneDNN, while the 1x1 convolutions gain);
- ``compile``, ``compile_bf16``, ``compile_bf16_dwfp32``: those with the model
  ``torch.compile``d; compilation happens in the warm-up steps and is reported apart (warm-up
  minus the eager twin's), never in img/s;
- not run by default (``--configs``): ``bf16_fused`` (``bf16`` with AdamW(fused=True)) and
  ``bf16_math`` (float32 with oneDNN's ``fp32_precision = "bf16"`` for convolutions).

Each configuration has its own copy of the same starting weights and sees the same batches in
the same order (same seed). After warm-up steps, ``--repeats`` chunks of ``--steps`` timed steps
run with the configurations interleaved (their order rotated each repeat), so machine drift hits
all of them alike. Reported per configuration: images/s of the whole loop step (median and best
of the repeats), images/s of the model step alone (augmentation and normalisation subtracted,
timed inside the step), the ratio to ``today`` (median of the per-repeat ratios), the mean
training loss of each chunk and, afterwards, float32 loss and accuracy on held-out images, so a
reader sees whether bf16 training learns as float32 does. The images are real Kermany chest
X-rays when ../shared/data has them (``--data random`` for random uint8; speed does not depend
on content, the loss check does). Writes benchmarks/results/train_speed.json after every
(backbone, size).

int8 part (``--int8``): MobileNetV2 (ImageNet weights) at 224 px exported to ONNX as medtl's
frozen-feature engine does (``export_onnx``), quantised statically with ONNX Runtime
(per-channel s8 weights, u8 activations, calibrated on 100 training images of each dataset).
The format (QOperator or QDQ; ``dynamic`` on request, or when both static formats fail) is the
fastest on a probe of test images; each accuracy recipe (``--int8-recipes``: the calibration
method, MinMax, Percentile or Entropy, and ``+floatstem`` to keep the first convolution float)
is then scored. On Kermany (validation carved by patient) and BreastMNIST (official split),
float and int8 features of every image are computed in the same pass (per batch, the engines'
order rotated) and timed, and medtl's hybrid logistic-regression head (``SklearnHead``:
standardised features, class_weight balanced, C chosen on validation, never on test) is fitted
on each: test AUC float vs int8, DeLong's paired test and 95 % CI of the change. Writes
benchmarks/results/train_speed_int8.json.

    python benchmarks/train_speed.py [--backbones mobilenet_v2,efficientnet_lite0]
        [--sizes 160,224] [--batch 32] [--steps 8] [--repeats 3] [--warmup 2]
        [--configs today,nchw,...] [--threads N] [--data kermany|random] [--profile]
    python benchmarks/train_speed.py --int8 --no-train [--int8-train N]
        [--int8-datasets kermany,breastmnist] [--int8-recipes minmax,percentile,...]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _common import SHARED_DATA, require, save

from medtl.data import KERMANY_PATIENT_REGEX, load_dataset
from medtl.data.augment import make_augment
from medtl.data.transforms import Preprocessing
from medtl.models import create_backbone
from medtl.training import loop
from medtl.training.loop import ImageInputs, TrainConfig, seeded, torch_threads
from medtl.transfer.freezing import param_groups, set_trainable, train_mode_hook

KERMANY = SHARED_DATA / "chest_xray_kermany_224"
BREASTMNIST = SHARED_DATA / "breastmnist_28_resaved.npz"
# The `full` strategy's defaults (medtl.training.options.TrainOptions).
LR, LR_DECAY = 1e-3, 0.5
GOAL = 1.5


@dataclass(frozen=True)
class Setup:
    channels_last: bool = True
    bf16: bool = False
    compile: bool = False
    fused: bool = False
    # oneDNN's implicit reduced precision for float32 convolutions and matmuls
    # (torch.backends.mkldnn.*.fp32_precision = "bf16"): bf16 (AMX) kernels without autocast's
    # casts; weights, activations between layers and the optimizer stay float32.
    bf16_math: bool = False
    # Under bf16 autocast, depthwise convolutions kept in float32: oneDNN's bf16 depthwise
    # backward is slower than its float32 one on this CPU, while 1x1 convolutions gain ~2x.
    dw_fp32: bool = False

    def describe(self) -> str:
        parts = ["channels_last" if self.channels_last else "NCHW",
                 "bf16 autocast" if self.bf16 else "fp32"]
        parts += ["torch.compile"] if self.compile else []
        parts += ["fused AdamW"] if self.fused else []
        parts += ["oneDNN fp32_precision bf16"] if self.bf16_math else []
        parts += ["depthwise fp32"] if self.dw_fp32 else []
        return " + ".join(parts)


CONFIGS = {
    "today": Setup(),
    "nchw": Setup(channels_last=False),
    "bf16": Setup(bf16=True),
    "compile": Setup(compile=True),
    "compile_bf16": Setup(bf16=True, compile=True),
    "bf16_fused": Setup(bf16=True, fused=True),
    "bf16_math": Setup(bf16_math=True),
    "bf16_dwfp32": Setup(bf16=True, dw_fp32=True),
    "compile_bf16_dwfp32": Setup(bf16=True, dw_fp32=True, compile=True),
}
DEFAULT_CONFIGS = ("today", "nchw", "bf16", "bf16_dwfp32", "compile", "compile_bf16",
                   "compile_bf16_dwfp32")
# A compiled configuration's compile time: its warm-up minus that of its eager twin.
EAGER_TWIN = {"compile": "today", "compile_bf16": "bf16", "compile_bf16_dwfp32": "bf16_dwfp32"}


# ------------------------------------------------------------------------------ training part
@contextmanager
def cpu_autocast(bf16: bool) -> Iterator[None]:
    """The loop's autocast hook returning bf16 autocast on CPU while the block runs (on CPU it
    is a nullcontext today); the loop looks the hook up at each step, so patching it is enough."""
    if not bf16:
        yield
        return
    old = loop._autocast
    loop._autocast = lambda device, *_, **__: torch.autocast(device.type, dtype=torch.bfloat16)
    try:
        yield
    finally:
        loop._autocast = old


def depthwise_in_fp32(net: torch.nn.Module) -> int:
    """Make each depthwise convolution of ``net`` run in float32 even under autocast."""
    def fp32_forward(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return type(conv).forward(conv, x.float())  # Conv2dSame pads in its forward

    n = 0
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            m.forward = fp32_forward.__get__(m)
            n += 1
    return n


@contextmanager
def onednn_bf16(enabled: bool) -> Iterator[None]:
    """oneDNN convolutions and matmuls of float32 tensors computed in bf16 inside the block."""
    if not enabled:
        yield
        return
    mk = torch.backends.mkldnn
    old = (mk.conv.fp32_precision, mk.matmul.fp32_precision)
    mk.conv.fp32_precision = mk.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        mk.conv.fp32_precision, mk.matmul.fp32_precision = old


@dataclass
class TimedInputs(ImageInputs):
    """The loop's image inputs, timing their own work (to separate it from the model's), and
    optionally handing the model NCHW batches."""

    nchw: bool = False
    seconds: float = 0.0

    def train_batch(self, xb, device, gen):
        t0 = time.perf_counter()
        out = super().train_batch(xb, device, gen)
        self.seconds += time.perf_counter() - t0
        return out

    def _normalise(self, xb, device):
        out = super()._normalise(xb, device)
        return out.contiguous() if self.nchw else out


class Runner:
    """One configuration: its own network, optimizer and schedule, built as the loop builds
    them (``loop._start``) for the ``full`` strategy."""

    def __init__(self, name: str, setup: Setup, base: torch.nn.Module, pre: Preprocessing,
                 y: torch.Tensor, batch: int, epochs: int) -> None:
        self.name, self.setup = name, setup
        net = copy.deepcopy(base)
        set_trainable(net)
        groups = param_groups(net, LR, LR_DECAY)
        self.config = TrainConfig(epochs=epochs, batch_size=batch, seed=0,
                                  mean=pre.model_mean, std=pre.model_std)
        self.device = torch.device("cpu")
        net.to(device=self.device, memory_format=torch.channels_last if setup.channels_last
               else torch.contiguous_format)
        self.state, self.criterion = loop._start(net, groups, y, y, self.config, self.device)
        if setup.fused:
            opt = torch.optim.AdamW([{**g, "params": list(g["params"])} for g in groups],
                                    weight_decay=self.config.weight_decay, fused=True)
            self.state.optimizer = opt
            self.state.scheduler = torch.optim.lr_scheduler.LambdaLR(
                opt, loop._schedule(self.config, max(1, len(y) // batch)))
        if setup.dw_fp32:
            depthwise_in_fp32(net)
        self.net = net
        self.train_mode = train_mode_hook(net)
        if setup.compile:
            # Every compiled copy of the network recompiles the same block code (guards on the
            # module): past dynamo's default limit of 8 it silently runs eager instead.
            from torch import _dynamo

            for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit"):
                if hasattr(_dynamo.config, name):
                    setattr(_dynamo.config, name, max(256, getattr(_dynamo.config, name)))
        self.forward = torch.compile(net) if setup.compile else net
        # The loop's step takes the module to call as ``forward`` (DDP's wrapper, or here the
        # compiled one) in the current loop.py; before that it called ``state.model``.
        self.step_kwargs = {}
        if "forward" in inspect.signature(loop._train_epoch).parameters:
            self.step_kwargs["forward"] = self.forward
        else:
            self.state.model = self.forward
        self.inputs = TimedInputs(pre.model_mean, pre.model_std,
                                  make_augment("basic", hflip=False), nchw=not setup.channels_last)

    def epoch(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict:
        """``len(x) / batch`` steps of the loop; seconds in all, seconds of the inputs, loss."""
        self.train_mode(self.net)
        self.state.epoch = epoch
        self.inputs.seconds = 0.0
        torch.manual_seed(1000 + epoch)  # dropout masks: the same for every configuration
        with cpu_autocast(self.setup.bf16), onednn_bf16(self.setup.bf16_math):
            t0 = time.perf_counter()
            loss, _ = loop._train_epoch(self.state, self.inputs, x, y, self.criterion,
                                        self.device, **self.step_kwargs)
            seconds = time.perf_counter() - t0
        return {"seconds": seconds, "input_seconds": self.inputs.seconds, "loss": loss}

    def profile(self, x: torch.Tensor, y: torch.Tensor, top: int = 12) -> list[dict]:
        """The operators taking most of one chunk's time (self CPU), one untimed chunk."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.epoch(x, y, 0)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count}
                for e in events[:top]]

    def held_out(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """float32 loss and accuracy on images never trained on (the eager network)."""
        proba, loss = loop._evaluate(self.net, ImageInputs(self.config.mean, self.config.std),
                                     x, y, self.config.batch_size, self.device)
        return {"loss": loss, "accuracy": float((proba.argmax(1) == y.numpy()).mean())}


def training_images(kind: str, n: int, size: int, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` uint8 (N, size, size, 3) images and labels: Kermany train images or random."""
    if kind == "kermany" and KERMANY.exists():
        data = load_dataset(KERMANY / "train", val_fraction=0.0)
        idx = np.random.default_rng(seed).choice(len(data), size=n, replace=False)
        pre = Preprocessing(size=size, mean=(0.5,) * 3, std=(0.5,) * 3)
        x = np.stack([pre.resize_uint8(data.read(int(i))) for i in idx])
        return torch.from_numpy(x), torch.from_numpy(data.labels[idx].astype(np.int64)), \
            f"Kermany train ({n} images, seed {seed})"
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, 2, (n,), generator=g), "random uint8"


def bench_training(args: argparse.Namespace, name: str, size: int, x_all: torch.Tensor,
                   y_all: torch.Tensor) -> dict:
    b = args.batch
    n_timed, n_warm = args.steps * b, args.warmup * b
    x, y = x_all[:n_timed], y_all[:n_timed]
    xw, yw = x_all[n_timed:n_timed + n_warm], y_all[n_timed:n_timed + n_warm]
    xh, yh = x_all[n_timed + n_warm:], y_all[n_timed + n_warm:]
    with seeded(0):  # the new classifier: the same starting weights for every configuration
        base = create_backbone(name, weights="imagenet")
        base.reset_classifier(2)
    pre = Preprocessing.for_spec(base.spec, size)
    runners = [Runner(c, CONFIGS[c], base, pre, y, b, args.repeats + 1) for c in args.configs]
    warm: dict[str, float] = {}
    failed: dict[str, str] = {}
    for r in list(runners):  # epoch 0: warm-up (and compilation), not timed into img/s
        t0 = time.perf_counter()
        try:
            r.epoch(xw, yw, 0)
        except Exception as exc:  # a configuration this machine cannot run: said, not fatal
            failed[r.name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            runners.remove(r)
            print(f"  {name} {size}px {r.name:<20} FAILED: {failed[r.name]}", flush=True)
            continue
        warm[r.name] = time.perf_counter() - t0
        print(f"  {name} {size}px {r.name:<20} warm-up {args.warmup} steps {warm[r.name]:7.1f} s",
              flush=True)
    chunks: dict[str, list[dict]] = {r.name: [] for r in runners}
    for rep in range(args.repeats):
        k = rep % len(runners)
        for r in runners[k:] + runners[:k]:
            chunks[r.name].append(r.epoch(x, y, rep + 1))
    rows = []
    for r in runners:
        c = chunks[r.name]
        rates = [n_timed / e["seconds"] for e in c]
        model_rates = [n_timed / (e["seconds"] - e["input_seconds"]) for e in c]
        today = chunks.get("today")
        # Paired per repeat (drift cancels); best over best as well (sporadic disturbance).
        ratios = ([t["seconds"] / e["seconds"] for e, t in zip(c, today, strict=True)]
                  if today else None)
        row = {"backbone": name, "size": size, "config": r.name,
               "setup": r.setup.describe(), "img_s": rates,
               "img_s_median": statistics.median(rates), "img_s_best": max(rates),
               "model_img_s_median": statistics.median(model_rates),
               "input_share": statistics.median(e["input_seconds"] / e["seconds"] for e in c),
               "ratio_to_today": statistics.median(ratios) if ratios else None,
               "ratio_best_to_best": (max(rates) / max(n_timed / t["seconds"] for t in today)
                                      if today else None),
               "warmup_s": warm[r.name],
               "compile_s": (warm[r.name] - warm[EAGER_TWIN[r.name]]
                             if EAGER_TWIN.get(r.name) in warm else None),
               "train_loss_per_chunk": [e["loss"] for e in c],
               "held_out": r.held_out(xh, yh) if len(yh) else None,
               "profile": r.profile(x, y) if args.profile else None}
        rows.append(row)
    return {"backbone": name, "size": size, "rows": rows, "failed": failed, **_verdict(rows)}


def _verdict(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["ratio_to_today"] is not None and r["config"] != "today"]
    if not scored:
        return {"best": None, "best_ratio": None, "goal_met": None}
    best = max(scored, key=lambda r: r["ratio_to_today"])
    return {"best": best["config"], "best_ratio": best["ratio_to_today"],
            "goal_met": best["ratio_to_today"] >= GOAL}


def print_block(block: dict) -> None:
    print(f"\n{block['backbone']} {block['size']} px")
    cw = max(len(r["config"]) for r in block["rows"]) + 2
    sw = max(len(r["setup"]) for r in block["rows"]) + 2
    print(f"  {'config':<{cw}}{'setup':<{sw}}{'img/s':>7}{'best':>7}{'model':>7}{'x today':>9}"
          f"{'best/best':>10}"
          f"{'compile s':>10}{'loss first..last':>19}{'held-out loss/acc':>19}")
    for r in block["rows"]:
        ratio = "" if r["ratio_to_today"] is None else f"{r['ratio_to_today']:.2f}"
        bb = "" if r["ratio_best_to_best"] is None else f"{r['ratio_best_to_best']:.2f}"
        comp = "" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
        losses = r["train_loss_per_chunk"]
        ho = r["held_out"]
        held = "" if ho is None else f"{ho['loss']:.3f}/{ho['accuracy']:.2f}"
        print(f"  {r['config']:<{cw}}{r['setup']:<{sw}}{r['img_s_median']:>7.1f}"
              f"{r['img_s_best']:>7.1f}{r['model_img_s_median']:>7.1f}{ratio:>9}{bb:>10}{comp:>10}"
              f"{losses[0]:>10.3f}..{losses[-1]:<7.3f}{held:>19}")
    for r in block["rows"]:
        if r.get("profile"):
            print(f"  {r['config']} profile: " + ", ".join(
                f"{p['op'].removeprefix('aten::')} {100 * p['share']:.0f}%"
                for p in r["profile"][:8]))
    if block["best"] is not None:
        print(f"  best: {block['best']} at {block['best_ratio']:.2f}x today "
              f"(goal {GOAL}x: {'met' if block['goal_met'] else 'not met'})")


def training_part(args: argparse.Namespace) -> None:
    blocks = []
    n_held = 64
    for size in args.sizes:
        n = (args.steps + args.warmup) * args.batch + n_held
        x_all, y_all, what = training_images(args.data, n, size)
        for name in args.backbones:
            with torch_threads(args.threads):
                blocks.append(bench_training(args, name, size, x_all, y_all))
            print_block(blocks[-1])
            save(args.name, {
                "what": "full fine-tuning, images/s of medtl's training step per configuration",
                "images": what, "batch": args.batch, "steps": args.steps,
                "warmup_steps": args.warmup, "repeats": args.repeats,
                "threads": args.threads or os.cpu_count(), "augment": "basic (hflip off)",
                "held_out_images": n_held, "goal_ratio": GOAL,
                "configs": {c: CONFIGS[c].describe() for c in args.configs},
                "blocks": blocks})


# ------------------------------------------------------------------------------ int8 part
# Accuracy recipes: the calibration method, and "+floatstem" to keep the first convolution
# (3 input channels: little to gain in int8, and its input is the least quantisable) in float.
CALIBRATIONS = ("minmax", "percentile", "entropy")


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda pixels: sess.run(None, {name: pixels})[0]


def _prepared(fp32: Path) -> Path:
    """ORT's advice before quantising: shape inference and graph optimisation (once)."""
    from onnxruntime.quantization import quant_pre_process

    prepped = fp32.with_name(fp32.stem + "-pre.onnx")
    if not prepped.exists():
        try:
            quant_pre_process(str(fp32), str(prepped))
        except Exception as exc:
            print(f"  quant_pre_process failed ({type(exc).__name__}: {exc}); quantising the "
                  "plain export")
            return fp32
    return prepped


def quantise(fp32: Path, out: Path, fmt: str, recipe: str,
             calibration: list[np.ndarray]) -> Path:
    """The float export quantised to int8 by ONNX Runtime: ``fmt`` ``qdq``/``qoperator``
    (static: per-channel s8 weights, u8 activations calibrated on ``calibration`` by the
    recipe's method) or ``dynamic`` (weights only; activations quantised per batch)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    prepped = _prepared(fp32)
    method, *flags = recipe.split("+")
    exclude = []
    if "floatstem" in flags:
        exclude = [next(n.name for n in onnx.load(str(prepped)).graph.node
                        if n.op_type == "Conv")]
    if fmt == "dynamic":
        quantize_dynamic(str(prepped), str(out), weight_type=QuantType.QUInt8,
                         nodes_to_exclude=exclude)
        return out

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self):
            batch = next(self.items, None)
            return None if batch is None else {"pixels": batch}

    quantize_static(str(prepped), str(out), Reader(),
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    calibrate_method={"minmax": CalibrationMethod.MinMax,
                                      "percentile": CalibrationMethod.Percentile,
                                      "entropy": CalibrationMethod.Entropy}[method])
    return out


def _pixels(data, idx, pre: Preprocessing) -> np.ndarray:
    return pre.normalise(np.stack([pre.resize_uint8(data.read(int(i))) for i in idx]))


def _calibration(data, pre: Preprocessing, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` images of the training split (fixed seed), in batches of 20."""
    tr = data.split("train")
    idx = np.random.default_rng(seed).choice(len(tr), size=min(n, len(tr)), replace=False)
    return [_pixels(tr, idx[i:i + 20], pre) for i in range(0, len(idx), 20)]


def _rate(run, batches: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    for b in batches:
        run(b)
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def choose_format(fp32: Path, formats: list[str], recipe: str, calibration: list[np.ndarray],
                  probe: list[np.ndarray], workdir: Path, threads: int
                  ) -> tuple[str, list[dict]]:
    """Quantise in each format, time it against float on ``probe`` (interleaved, best of 3)
    and compare its features; the fastest whose features stay close to float's wins. Static
    formats that all fail bring in ``dynamic``."""
    float_run = _session(fp32, threads)
    float_run(probe[0])
    ref = np.concatenate([float_run(b) for b in probe])
    rows, tried = [], list(formats)
    for fmt in tried:
        try:
            path = quantise(fp32, workdir / f"probe-{fmt}.onnx", fmt, recipe, calibration)
            run = _session(path, threads)
            run(probe[0])
        except Exception as exc:
            print(f"  int8 {fmt}: failed ({type(exc).__name__}: {exc})")
            rows.append({"format": fmt, "error": f"{type(exc).__name__}: {exc}"})
            if fmt == tried[-1] and "dynamic" not in tried \
                    and all("error" in r for r in rows):
                tried.append("dynamic")
            continue
        f_rate = q_rate = 0.0
        for _ in range(3):  # interleaved so drift hits both
            f_rate = max(f_rate, _rate(float_run, probe))
            q_rate = max(q_rate, _rate(run, probe))
        got = np.concatenate([run(b) for b in probe])
        rows.append({"format": fmt, "recipe": recipe, "float_img_s": f_rate,
                     "int8_img_s": q_rate, "ratio": q_rate / f_rate,
                     **_agreement(ref, got), "size_mb": path.stat().st_size / 1e6})
        print(f"  int8 {fmt:<10} float {f_rate:6.1f} img/s, int8 {q_rate:6.1f} img/s "
              f"({q_rate / f_rate:.2f}x), feature cosine {rows[-1]['cosine_mean']:.4f}",
              flush=True)
    ok = [r for r in rows if "error" not in r and r["cosine_mean"] > 0.8]
    if not ok:
        raise SystemExit("no int8 format ran with features close to float's")
    return max(ok, key=lambda r: r["int8_img_s"])["format"], rows


def _agreement(a: np.ndarray, b: np.ndarray) -> dict:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    rel = np.abs(a - b).mean() / (np.abs(a).mean() + 1e-12)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "relative_mean_abs_error": float(rel)}


def extract_all(data, pre: Preprocessing, runs: dict, batch: int = 64) -> dict:
    """Features of every image of ``data`` from each engine in ``runs`` (float and the int8
    models), each batch through all of them (their order rotated per batch), with each
    engine's seconds; decoding is timed apart."""
    n, names = len(data), list(runs)
    out: dict[str, list] = {k: [] for k in names}
    secs = dict.fromkeys(names, 0.0)
    dec_s = 0.0
    for k, start in enumerate(range(0, n, batch)):
        t0 = time.perf_counter()
        px = _pixels(data, range(start, min(start + batch, n)), pre)
        dec_s += time.perf_counter() - t0
        j = k % len(names)
        for name in names[j:] + names[:j]:
            t0 = time.perf_counter()
            out[name].append(runs[name](px))
            secs[name] += time.perf_counter() - t0
    return {"features": {k: np.concatenate(v) for k, v in out.items()}, "seconds": secs,
            "decode_s": dec_s, "n": n}


def head_scores(feats: dict[str, dict], ys: dict[str, np.ndarray], which: str) -> dict:
    """medtl's hybrid logreg on ``which`` features: fit on train, C on val, test scores."""
    from medtl.transfer.heads import SklearnHead

    f = {s: feats[s]["features"][which] for s in feats}
    head = SklearnHead("logreg", seed=0, class_weight="balanced").fit(
        f["train"], ys["train"], f["val"], ys["val"])
    return {"C": head.params_["C"], "val_auc": max(r["val_score"] for r in head.search_),
            "test_score": head.predict_proba(f["test"])[:, 1]}


def int8_dataset(label: str, data, pre: Preprocessing, fp32: Path, fmt: str,
                 workdir: Path, args: argparse.Namespace) -> dict:
    from medtl.evaluation.stats import auc_ci_delong, delong_test

    threads = args.threads or os.cpu_count() or 1
    calib = _calibration(data, pre, args.calibration)
    runs = {"float": _session(fp32, threads)}
    quant_s = {}
    for recipe in args.int8_recipes:
        t0 = time.perf_counter()
        path = quantise(fp32, workdir / f"{label}-{fmt}-{recipe}.onnx", fmt, recipe, calib)
        quant_s[recipe] = time.perf_counter() - t0
        runs[recipe] = _session(path, threads)
    for run in runs.values():
        run(calib[0])
    feats, ys = {}, {}
    for split in ("train", "val", "test"):
        part = data.split(split)
        if split == "train" and args.int8_train and len(part) > args.int8_train:
            idx = np.sort(np.random.default_rng(0).choice(len(part), args.int8_train,
                                                          replace=False))
            part = part.subset(idx)
        t0 = time.perf_counter()
        feats[split] = extract_all(part, pre, runs)
        ys[split] = part.labels.astype(np.int64)
        print(f"  {label} {split}: {len(part)} images, {time.perf_counter() - t0:.0f} s",
              flush=True)
    n = sum(f["n"] for f in feats.values())
    secs = {k: sum(f["seconds"][k] for f in feats.values()) for k in runs}
    yt = ys["test"]
    fl = head_scores(feats, ys, "float")
    row = {"dataset": label, "format": fmt, "counts": {s: len(ys[s]) for s in ys},
           "train_subsampled_to": args.int8_train or None,
           "decode_s": sum(f["decode_s"] for f in feats.values()),
           "float": {"img_s": n / secs["float"], "C": fl["C"], "val_auc": fl["val_auc"],
                     "test_auc_ci95": auc_ci_delong(yt, fl["test_score"])},
           "int8": {}}
    for recipe in args.int8_recipes:
        q8 = head_scores(feats, ys, recipe)
        test = delong_test(yt, q8["test_score"], fl["test_score"])  # a: int8, b: float
        row["float"]["test_auc"] = test["auc_b"]
        half = 1.959964 * test["variance"] ** 0.5
        agree = _agreement(*(np.concatenate([feats[s]["features"][k] for s in feats])
                             for k in ("float", recipe)))
        row["int8"][recipe] = {
            "img_s": n / secs[recipe], "ratio_to_float": secs["float"] / secs[recipe],
            "quantise_s": quant_s[recipe], "feature_agreement": agree,
            "C": q8["C"], "val_auc": q8["val_auc"], "test_auc": test["auc_a"],
            "test_auc_ci95": auc_ci_delong(yt, q8["test_score"]),
            "auc_change": test["difference"],
            "auc_change_ci95": [test["difference"] - half, test["difference"] + half],
            "delong_p": test["p_value"]}
    return row


def print_int8(row: dict) -> None:
    f = row["float"]
    print(f"\n{row['dataset']} ({row['counts']}), int8 format {row['format']}")
    print(f"  {'features':<28}{'img/s':>8}{'x float':>9}{'cosine':>8}{'C':>7}{'val AUC':>9}"
          f"{'test AUC':>10}{'change [95% CI]':>28}{'DeLong p':>10}")
    print(f"  {'float':<28}{f['img_s']:>8.1f}{1:>9.2f}{1:>8.3f}{f['C']:>7g}{f['val_auc']:>9.4f}"
          f"{f['test_auc']:>10.4f}")
    for recipe, q in row["int8"].items():
        lo, hi = q["auc_change_ci95"]
        change = f"{q['auc_change']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        print(f"  {'int8 ' + recipe:<28}{q['img_s']:>8.1f}{q['ratio_to_float']:>9.2f}"
              f"{q['feature_agreement']['cosine_mean']:>8.3f}{q['C']:>7g}{q['val_auc']:>9.4f}"
              f"{q['test_auc']:>10.4f}{change:>28}{q['delong_p']:>10.3f}")


def int8_part(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="medtl-int8-") as tmp:
        _int8_part(args, Path(tmp))


def _int8_part(args: argparse.Namespace, workdir: Path) -> None:
    from medtl.training.features import export_onnx

    threads = args.threads or os.cpu_count() or 1
    bb = create_backbone(args.int8_backbone, weights="imagenet")
    bb.reset_classifier(0)
    bb.eval()
    pre = Preprocessing.for_spec(bb.spec, args.int8_size)
    t0 = time.perf_counter()
    fp32 = export_onnx(bb, args.int8_size, workdir / "float.onnx")
    print(f"int8: {args.int8_backbone} {args.int8_size}px exported in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    loaders = {
        "kermany": lambda: load_dataset(require(KERMANY), patient_regex=KERMANY_PATIENT_REGEX),
        "breastmnist": lambda: load_dataset(require(BREASTMNIST)),
    }
    datasets = {name: loaders[name]() for name in args.int8_datasets}
    first = datasets[args.int8_datasets[0]]
    test = first.split("test")
    probe_idx = np.random.default_rng(1).choice(len(test), size=min(128, len(test)),
                                                replace=False)
    probe = [_pixels(test, probe_idx[i:i + 64], pre) for i in range(0, len(probe_idx), 64)]
    fmt, formats = choose_format(fp32, args.int8_formats, args.int8_recipes[0],
                                 _calibration(first, pre, args.calibration), probe, workdir,
                                 threads)
    print(f"int8: format {fmt}", flush=True)
    rows = []
    for name, data in datasets.items():
        rows.append(int8_dataset(name, data, pre, fp32, fmt, workdir, args))
        print_int8(rows[-1])
        save(args.name + "_int8", {
            "what": "frozen features through ONNX Runtime, float vs int8 (static, per-channel "
                    "s8 weights, u8 activations), medtl's hybrid logreg head (class_weight "
                    "balanced, C on val); AUC change is int8 minus float (DeLong, paired)",
            "backbone": args.int8_backbone, "size": args.int8_size,
            "calibration_images": args.calibration, "threads": threads,
            "format_probe": formats, "format": fmt, "recipes": args.int8_recipes,
            "datasets": rows})


# ------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="mobilenet_v2,efficientnet_lite0")
    ap.add_argument("--sizes", default="160,224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (and compilation)")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one chunk per configuration: top operators by CPU time")
    ap.add_argument("--data", choices=("kermany", "random"), default="kermany")
    ap.add_argument("--no-train", action="store_true", help="skip the training part")
    ap.add_argument("--int8", action="store_true", help="run the int8 feature part")
    ap.add_argument("--int8-backbone", default="mobilenet_v2")
    ap.add_argument("--int8-size", type=int, default=224)
    ap.add_argument("--int8-datasets", default="kermany,breastmnist")
    ap.add_argument("--int8-formats", default="qoperator,qdq",
                    help="ONNX Runtime int8 formats to try (qoperator, qdq, dynamic); the "
                         "fastest is used")
    ap.add_argument("--int8-recipes", default="minmax,percentile,percentile+floatstem",
                    help="calibration (minmax, percentile, entropy), +floatstem keeps the "
                         "first convolution in float; each is scored")
    ap.add_argument("--int8-train", type=int, default=0,
                    help="subsample each train split to this many images (0: all)")
    ap.add_argument("--calibration", type=int, default=100)
    ap.add_argument("--name", default="train_speed", help="results file name (no .json)")
    args = ap.parse_args()
    args.backbones = args.backbones.split(",")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.configs = args.configs.split(",")
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs {unknown}: choose from {list(CONFIGS)}")
    if "today" in args.configs:  # first, so the warm-up order starts from the baseline
        args.configs = ["today"] + [c for c in args.configs if c != "today"]
    args.int8_datasets = args.int8_datasets.split(",")
    args.int8_formats = args.int8_formats.split(",")
    args.int8_recipes = args.int8_recipes.split(",")
    for r in args.int8_recipes:
        method, *flags = r.split("+")
        if method not in CALIBRATIONS or any(f != "floatstem" for f in flags):
            ap.error(f"--int8-recipes {r}: a calibration of {CALIBRATIONS}, optionally "
                     "+floatstem")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_train:
        training_part(args)
    if args.int8:
        int8_part(args)


if __name__ == "__main__":
    main()
