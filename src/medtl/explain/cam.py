"""Attribution maps for every kind of medtl model: where a prediction's evidence lies.

The CAM family (Grad-CAM, Grad-CAM++, Score-CAM) comes from pytorch-grad-cam, occlusion and
integrated gradients from captum; medtl only builds the model each method needs:

- fine-tuned, full, scratch and truncated runs: the trained network itself;
- feature-extractor runs: the frozen backbone followed by the linear head;
- hybrid runs with logistic regression: the backbone followed by the scikit-learn pipeline
  rewritten as one ``nn.Linear`` (scaler folded in), so gradients exist and probabilities are
  those of scikit-learn;
- hybrid runs with SVM, random forest or kNN: no gradient exists, so every method falls back to
  occlusion on the head's probabilities, and the caller is told.

A map is an (S, S) array on the model's input grid: CAM methods give pytorch-grad-cam's
rectified map scaled to [0, 1]; occlusion and integrated gradients give the signed attribution
summed over colour channels (positive: evidence for the target class).

A multi-label model (``model.multilabel``) is explained one label at a time: the target is a
label index and the output explained is that label's own sigmoid, never a softmax over the
labels, which would make one label's evidence count against the others'.
"""

from __future__ import annotations

import copy
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medtl.errors import MedtlError, check_choice
from medtl.transfer.heads import logreg_as_linear  # noqa: F401  (tests and users import it here)

METHODS = ("gradcam", "gradcam++", "scorecam", "occlusion", "integrated-gradients")
CAM_METHODS = ("gradcam", "gradcam++", "scorecam")
GRADIENT_METHODS = ("gradcam", "gradcam++", "integrated-gradients")


def _require(module: str, package: str):
    """Import an explanation library lazily, with the install line when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MedtlError(f"explanations need the {package} package: pip install {package}"
                         ) from exc


class _FeaturesThenProba(nn.Module):
    """A frozen backbone and a head with no gradient (a scikit-learn classifier) as one black
    box: pixels to probabilities, for occlusion."""

    def __init__(self, backbone: nn.Module, head) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(x).double().cpu().numpy()
        return torch.from_numpy(self.head.predict_proba(features)).to(x.device, x.dtype)


def _vit_tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """(N, 1 + h*w, D) tokens to an (N, D, h, w) map: the class token dropped."""
    patches = tokens[:, 1:, :]
    side = int(round(patches.shape[1] ** 0.5))
    return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)


def _cam_layer(model: nn.Module, backbone: nn.Module) -> tuple[nn.Module, str]:
    """The registry's Grad-CAM layer; for a truncated backbone, the top of what it kept."""
    spec = backbone.spec
    try:
        return backbone.get_submodule(spec.cam_layer), spec.cam_layer
    except AttributeError:
        top = list(backbone.blocks)[-1]
        block = backbone.blocks[top]
        if spec.family == "vit" and hasattr(block, "norm1"):
            return block.norm1, f"blocks.{top}.norm1"
        return block, f"blocks.{top}"


class LabelSigmoid:
    """A pytorch-grad-cam target for a multi-label model: the sigmoid of one label's logit
    (in float64, so that a confident label's gradient does not round to zero as soon)."""

    def __init__(self, label: int) -> None:
        self.label = int(label)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        logit = output[self.label] if output.ndim == 1 else output[:, self.label]
        return torch.sigmoid(logit.double())


class _Sigmoid(nn.Module):
    """A multi-label network's logits as per-label sigmoids (for captum's attributions)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))


@dataclass
class Explainer:
    """A model that maps normalised pixels to class scores, and how to explain it.

    ``model`` returns logits when ``differentiable``, else probabilities. ``note`` says why a
    method was replaced, for the caller to show. ``multilabel``: the logits are per-label
    (probabilities are their sigmoids, and a target is one label).
    """

    model: nn.Module
    backbone: nn.Module
    target_layer: nn.Module | None
    target_layer_name: str | None
    differentiable: bool
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None
    why_not_differentiable: str | None = None
    multilabel: bool = False

    # ---------------------------------------------------------------- construction
    @classmethod
    def for_backbone(cls, backbone: nn.Module) -> Explainer:
        """A Backbone (or TruncatedBackbone) with its classifier: the network is the model."""
        layer, name = _cam_layer(backbone, backbone)
        reshape = _vit_tokens_to_map if backbone.spec.family == "vit" else None
        return cls(backbone, backbone, layer, name, True, reshape)

    @classmethod
    def for_model(cls, model) -> Explainer:
        """The module behind a fitted model (``medtl.transfer.fitted``): its ``torch_module``
        (pixels to logits), or a black box when it has none."""
        backbone = model.backbone
        module = model.torch_module()
        multilabel = bool(getattr(model, "multilabel", False))
        if module is None:
            return cls(_FeaturesThenProba(backbone, model.head), backbone, None, None, False, None,
                       why_not_differentiable=f"the {model.options.head} head of this hybrid "
                                              "run has no gradient", multilabel=multilabel)
        layer, name = _cam_layer(backbone, backbone)
        reshape = _vit_tokens_to_map if backbone.spec.family == "vit" else None
        return cls(module, backbone, layer, name, True, reshape, multilabel=multilabel)

    @classmethod
    def for_classifier(cls, clf) -> Explainer:
        """The model behind a fitted or loaded :class:`TransferClassifier`."""
        return cls.for_model(clf.model_)

    # ---------------------------------------------------------------- methods
    def method_for(self, method: str) -> str:
        """``method``, or occlusion when the model has no gradient (``why_not_differentiable``
        says why, for the caller to tell the user)."""
        check_choice("method", method, METHODS)
        if not self.differentiable and method != "occlusion":
            return "occlusion"
        return method

    @torch.no_grad()
    def scores(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class probabilities, (N, n_classes), from the model being explained (multi-label:
        each label's sigmoid)."""
        self.model.eval()
        return self._probabilities(self.model(pixels))

    def _probabilities(self, out: torch.Tensor) -> torch.Tensor:
        if not self.differentiable:
            return out
        return torch.sigmoid(out) if self.multilabel else torch.softmax(out, 1)

    def _target(self, index: int):
        """What a CAM method differentiates for class (or label) ``index``: the class's logit,
        or a multi-label model's label's own sigmoid."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        return LabelSigmoid(index) if self.multilabel else ClassifierOutputTarget(index)

    def maps(self, pixels: torch.Tensor, targets: Sequence[int], method: str = "gradcam",
             ) -> np.ndarray:
        """(N, S, S) float32 maps of ``pixels`` (N, C, S, S) for class indices ``targets``."""
        method = self.method_for(method)
        self.model.eval()
        targets = [int(t) for t in targets]
        if len(targets) != len(pixels):
            raise ValueError(f"{len(targets)} targets for {len(pixels)} images")
        if method in CAM_METHODS:
            return self._cam(pixels, targets, method)
        if method == "occlusion":
            return self._occlusion(pixels, targets)
        return self._integrated_gradients(pixels, targets)

    def _cam(self, pixels, targets, method) -> np.ndarray:
        lib = _require("pytorch_grad_cam", "grad-cam")
        kind = {"gradcam": lib.GradCAM, "gradcam++": lib.GradCAMPlusPlus,
                "scorecam": lib.ScoreCAM}[method]
        # Gradients must reach the target layer even when every weight is frozen.
        pixels = pixels.detach().clone().requires_grad_(True)
        with _quiet_tqdm(), kind(self.model, [self.target_layer],
                                 reshape_transform=self.reshape) as cam:
            if method != "scorecam":
                out = cam(pixels, targets=[self._target(t) for t in targets])
                return np.asarray(out, dtype=np.float32)
            cam.batch_size = 32  # masked copies per forward pass (the library's default: 16)
            # Score-CAM builds one masked copy of the input per channel (1,280 for MobileNetV2,
            # 770 MB at 224 px) for every image it is given: one image at a time bounds memory.
            return np.concatenate([np.asarray(
                cam(pixels[i:i + 1], targets=[self._target(targets[i])]),
                dtype=np.float32) for i in range(len(pixels))])

    def _occlusion(self, pixels, targets) -> np.ndarray:
        captum = _require("captum.attr", "captum")
        n, c, size, _ = pixels.shape
        # An eighth of the side, sliding by half of that: a 15 x 15 grid whatever the size.
        window = max(1, size // 8)
        stride = max(1, window // 2)

        def proba(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self._probabilities(self.model(x))

        occlusion = captum.Occlusion(proba)
        out = occlusion.attribute(pixels.detach(), sliding_window_shapes=(c, window, window),
                                  strides=(c, stride, stride), baselines=0.0,
                                  target=targets, perturbations_per_eval=32)
        return out.sum(1).detach().float().cpu().numpy()

    def _integrated_gradients(self, pixels, targets) -> np.ndarray:
        captum = _require("captum.attr", "captum")
        # A multi-label model: each label's sigmoid, as Grad-CAM explains it
        ig = captum.IntegratedGradients(_Sigmoid(self.model) if self.multilabel else self.model)
        out = ig.attribute(pixels.detach(), baselines=0.0, target=targets, n_steps=32,
                           internal_batch_size=32)
        return out.sum(1).detach().float().cpu().numpy()

    # ---------------------------------------------------------------- sanity check
    def randomised(self, seed: int = 0) -> Explainer:
        """A copy whose backbone weights are re-initialised and whose head is kept: the model
        randomisation test of Adebayo et al. (2018)."""
        twin = copy.deepcopy(self)
        backbone = twin.backbone
        # Seeded for this copy only: the caller's global generator is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in backbone.blocks.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                if hasattr(module, "reset_running_stats"):
                    module.reset_running_stats()
            initialised = {id(p) for m in backbone.blocks.modules()
                           if hasattr(m, "reset_parameters") for p in m.parameters(recurse=False)}
            with torch.no_grad():
                for p in backbone.blocks.parameters():
                    if id(p) not in initialised:  # ViT's class token and position embedding
                        p.normal_(0.0, 0.02)
        if twin.target_layer_name is not None:
            twin.target_layer = backbone.get_submodule(twin.target_layer_name)
        return twin


@contextmanager
def _quiet_tqdm() -> Iterator[None]:
    """Score-CAM draws a tqdm bar per image; medtl draws its own, so the library's is muted."""
    module = sys.modules.get("pytorch_grad_cam.score_cam")
    if module is None:
        yield
        return
    saved = module.tqdm
    module.tqdm = types.SimpleNamespace(tqdm=lambda iterable, *a, **k: iterable)
    try:
        yield
    finally:
        module.tqdm = saved


def positive_part(raw: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """A map for display: the evidence for the target scaled to [0, 1] (robust to outliers,
    which pixel-level methods such as integrated gradients produce)."""
    pos = np.clip(np.nan_to_num(raw.astype(np.float32)), 0, None)
    top = float(np.percentile(pos, percentile)) if pos.any() else 0.0
    if top <= 0:
        top = float(pos.max())
    return np.clip(pos / top, 0, 1) if top > 0 else pos


def overlay(image: np.ndarray, heat: np.ndarray, *, max_side: int = 1024,
            alpha: float = 0.6) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with ``heat`` (S, S) in [0, 1] drawn on it in the jet colours.

    Opacity follows the map, so regions the model ignores keep the plain image a clinician
    needs to see. The map is stretched back to the image's own shape: preprocessing resizes the
    whole image without cropping, so this inverts it exactly.
    """
    import matplotlib
    from PIL import Image

    img = Image.fromarray(image)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    base = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    h, w = base.shape[:2]
    stretched = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F")
                           .resize((w, h), Image.BILINEAR))
    stretched = np.clip(stretched, 0, 1)
    colours = matplotlib.colormaps["jet"](stretched)[..., :3]
    a = alpha * stretched[..., None]
    return np.round((base * (1 - a) + colours * a) * 255).astype(np.uint8)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two maps; 0 when either is constant (it ranks nothing)."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)
