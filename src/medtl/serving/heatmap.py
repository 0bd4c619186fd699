"""Heat maps for /v1/explain: occlusion on the ONNX model (NumPy only), or Grad-CAM with a
served run's torch model; and the overlay PNG, drawn with NumPy and Pillow.

A multi-label model is explained for one label (``target``; None: the most probable label):
occlusion follows that label's own sigmoid probability, Grad-CAM differentiates it
(medtl.explain.cam.LabelSigmoid)."""

from __future__ import annotations

import io

import numpy as np

GRID = 8  # occlusion: the image cut into GRID x GRID patches, each greyed in turn
GREY = 128
MAX_SIDE = 1024  # overlays and previews are drawn at most this large


def occlusion_map(model, image: np.ndarray, target: int | None) -> tuple[np.ndarray, int, float]:
    """How much the probability of ``target`` (None: the predicted class, or a multi-label
    model's most probable label) falls when each of
    GRID x GRID patches of ``image`` (the decoded (H, W, 3) uint8) is greyed: a (GRID, GRID)
    map in [0, 1] of that drop, the target and its probability. One graph run for the image
    and its GRID**2 occluded copies (``model``: an ExportedModel)."""
    pre = model.preprocessing
    small = pre.resize_uint8(image)
    side = small.shape[0]
    edges = np.linspace(0, side, GRID + 1).round().astype(int)
    copies = [small]
    for i in range(GRID):
        for j in range(GRID):
            occluded = small.copy()
            occluded[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] = GREY
            copies.append(occluded)
    proba = np.concatenate([model.predict_batch_ood(pre.normalise(np.stack(copies[k:k + 32])))[0]
                            for k in range(0, len(copies), 32)])
    t = int(proba[0].argmax()) if target is None else target
    drop = np.clip(proba[0, t] - proba[1:, t], 0, None).reshape(GRID, GRID)
    top = float(drop.max())
    return (drop / top if top > 0 else drop), t, float(proba[0, t])


def gradcam_map(served, image: np.ndarray, target: int | None) -> tuple[np.ndarray, int, float]:
    """Grad-CAM of the served run's torch model: (S, S) map in [0, 1], the target (None: the
    predicted class, or a multi-label model's most probable label) and its probability, as
    ``medtl explain`` computes them."""
    import torch

    pre = served.model.preprocessing
    pixels = torch.from_numpy(pre.normalise(pre.resize_uint8(image)[None]))
    with served.lock:  # hooks on one shared module: one Grad-CAM at a time
        proba = served.clf.model_.calibrate(
            served.explainer.scores(pixels).double().cpu().numpy())
        t = int(proba[0].argmax()) if target is None else target
        heat = served.explainer.maps(pixels, [t], "gradcam")[0]
    return np.clip(np.nan_to_num(heat), 0, 1), t, float(proba[0, t])


def _jet(x: np.ndarray) -> np.ndarray:
    """The jet colours of values in [0, 1], (..., 3) floats in [0, 1]."""
    return np.clip(np.stack([1.5 - np.abs(4 * x - c) for c in (3, 2, 1)], axis=-1), 0, 1)


def overlay_png(image: np.ndarray, heat: np.ndarray, strength: float = 1.0,
                alpha: float = 0.6) -> bytes:
    """``image`` (H, W, 3) uint8, at most MAX_SIDE a side, with ``heat`` (any shape, [0, 1])
    stretched over it in jet colours; opacity follows the map times ``strength`` (the target's
    probability, so that an image with little evidence for the class shows little red)."""
    from PIL import Image

    img = Image.fromarray(image)
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE))
    base = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    h, w = base.shape[:2]
    stretched = np.asarray(Image.fromarray(heat.astype(np.float32))
                           .resize((w, h), Image.BILINEAR))
    stretched = np.clip(stretched, 0, 1) * float(np.clip(strength, 0, 1))
    a = alpha * stretched[..., None]
    return png(np.round((base * (1 - a) + _jet(stretched) * a) * 255).astype(np.uint8))


def preview_png(image: np.ndarray, mode: str = "2d") -> bytes:
    """The decoded image as a PNG at most MAX_SIDE a side; for 2.5-D input the middle slice
    in grey, not three slices shown as colours."""
    from PIL import Image

    if mode == "2.5d":
        image = np.repeat(image[..., 1:2], 3, axis=2)
    img = Image.fromarray(image)
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE))
    return png(np.asarray(img))


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
