"""Explanations of a run's predictions: ``medtl explain``, the report's gallery, and the model
randomisation check that tells whether a run's maps depend on what it learned.

A multi-label run is explained one label at a time (medtl.explain.cam: that label's sigmoid):
``--target LABEL`` maps one label for every image; by default each image is mapped for its
most probable label (one map per image, as for a single-label run's predicted class)."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medtl.errors import DataReadError, MedtlError, check_choice
from medtl.explain.cam import CAM_METHODS, METHODS, Explainer, overlay, positive_part, spearman
from medtl.transfer.ensemble import EnsembleModel

if TYPE_CHECKING:
    from medtl.data.dataset import Record

log = logging.getLogger("medtl")

BATCH = 8
SANITY_IMAGES = 16
# Adebayo et al. (2018) call a method's maps independent of the model when they survive the
# model's randomisation; below this rank correlation we say they depend on the learned weights.
SANITY_THRESHOLD = 0.5


def display_map(raw: np.ndarray, method: str, probability: float = 1.0) -> np.ndarray:
    """The map drawn on an overlay: CAMs as they are, pixel attributions' positive part, both
    times the target class's probability.

    Every map is scaled to its own maximum, so without the probability an image with almost no
    evidence for the class (a true negative mapped for the positive class) would show its
    faintest speck in full red.
    """
    shown = np.clip(raw, 0, 1) if method in CAM_METHODS else positive_part(raw)
    return shown * float(np.clip(probability, 0, 1))


def display_image(image: np.ndarray, mode: str = "2d") -> np.ndarray:
    """What a clinician should see under the map: for 2.5-D input the middle slice in grey,
    not three neighbouring slices shown as colours."""
    if mode == "2.5d":
        return np.repeat(image[..., 1:2], 3, axis=2)
    return image


def model_input(preprocessing, images: Sequence[np.ndarray],
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Decoded images as the normalised (N, C, S, S) batch the model takes."""
    pre = preprocessing
    batch = pre.normalise(np.stack([pre.resize_uint8(im) for im in images]))
    return torch.from_numpy(batch).to(device)


def _device(explainer: Explainer) -> torch.device:
    return next(explainer.model.parameters()).device


def _target_index(target: str, classes: Sequence[str], multilabel: bool = False) -> int | None:
    """None for 'predicted', else the class's index; an unknown class is the user's error."""
    if target == "predicted":
        return None
    if target not in classes:
        what, default = (("a label", "predicted (each image's most probable label)")
                         if multilabel else ("a class", "predicted"))
        raise MedtlError(f"--target {target}: not {what} of this run; choose {default} or one "
                         f"of: {', '.join(classes)}")
    return list(classes).index(target)


def _file_stem(record: Record, taken: set[str], shown: str | None = None) -> str:
    """A readable, unique file name for an input (volume slices and npz rows included), from
    its path as ``--paths`` shows it (``shown``): a hashed run names its files by pseudonym."""
    name = Path(shown if shown is not None else record.path).name
    for ext in (".nii.gz", ".nii", ".npz", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff",
                ".bmp"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    if record.slice is not None:
        name = f"{name}_slice{record.slice}"
    elif record.key is not None:
        name = f"{name}_{record.key}_{record.index}"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"
    unique, k = stem, 1
    while unique in taken:
        k += 1
        unique = f"{stem}-{k}"
    taken.add(unique)
    return unique


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def explain_images(clf, inputs: Sequence[str | Path], *, out: str | Path,
                   view: dict[str, str] | None = None, method: str = "gradcam",
                   target: str = "predicted", sanity_check: bool = False,
                   skip_bad: bool = False, quiet: bool = False,
                   paths: str = "relative",
                   member_names: Sequence[str] | None = None,
                   thresholds: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write an overlay PNG and the raw map (.npy) per input image to ``out``, for a fitted or
    loaded classifier (``view``: how its run reads DICOM and volumes).

    For an ensemble (``clf.model_`` an EnsembleModel; ``member_names`` name its members) the
    map is the mean of its members' maps (:class:`_EnsembleMaps`), the probability the
    ensemble's, and the result's ``ensemble`` (also ``out/ensemble_maps.json``) says how.

    ``paths``: how explanations.csv, the file names and the log name the inputs: relative to
    the folder given (a file by its name), hashed, or absolute (medtl.data.privacy).

    A multi-label model (``clf.model_.multilabel``): ``target`` is a label, or ``predicted``
    for each image's most probable label; each map is of that label's sigmoid. With the run's
    ``thresholds`` (metrics.json's, one per label) a row's ``prediction`` lists the labels
    present at them (``|``-separated, empty for none); without, the most probable label.

    Returns ``{"method": the method used, "rows": one dict per image, "sanity": the model
    randomisation check or None}`` and writes ``out/explanations.csv``.
    """
    from medtl.console import run_logging
    from medtl.data import dataset_from_files
    from medtl.data.privacy import PathDisplay
    from medtl.data.sources import make_view

    check_choice("method", method, METHODS)
    display = PathDisplay.for_inputs(paths, inputs, aliases={out: Path(out).name})
    classes = list(clf.classes_)
    multilabel = bool(getattr(clf.model_, "multilabel", False))
    fixed = _target_index(target, classes, multilabel)
    view = make_view(**(view or {}))
    ds = dataset_from_files(inputs, classes=classes, view=view)
    ensemble = isinstance(clf.model_, EnsembleModel)
    if ensemble and sanity_check:
        raise MedtlError("--sanity-check is not supported for an ensemble: run it on a "
                         "member (members/NAME)")
    with run_logging(Path(out), quiet, append=True, rewrite=display.scrub):
        mapper = (_EnsembleMaps(clf.model_, method, member_names) if ensemble
                  else _RunMaps(clf, Explainer.for_classifier(clf), method))
        return _explain(clf, ds, mapper, Path(out), method=method, fixed=fixed,
                        mode=view.mode, sanity_check=sanity_check, skip_bad=skip_bad,
                        quiet=quiet, show=display.show,
                        thresholds=thresholds if multilabel else None,
                        multilabel=multilabel)


class _RunMaps:
    """One run's model: the probabilities of a batch of decoded images (and the pixels they
    were computed from), then their maps for chosen classes, with the method ``used``."""

    def __init__(self, clf, explainer: Explainer, method: str) -> None:
        self.clf, self.explainer = clf, explainer
        self.used = explainer.method_for(method)
        if self.used != method:
            log.warning("--method %s: %s, so occlusion explains it instead", method,
                        explainer.why_not_differentiable)

    def proba(self, images: list[np.ndarray]) -> tuple[np.ndarray, torch.Tensor]:
        pixels = model_input(self.clf.model_.preprocessing, images, _device(self.explainer))
        return self.clf.model_.calibrate(self.explainer.scores(pixels).double().cpu().numpy()), \
            pixels

    def maps(self, pixels: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
        return self.explainer.maps(pixels, targets, self.used)


class _EnsembleMaps:
    """An ensemble run's model (medtl.transfer.ensemble.EnsembleModel): its combined
    probabilities, and as its map the mean of its members' maps for the same target class,
    each member's own (its method, or occlusion where its head has no gradient, at its own
    input size), resized bilinearly to the largest member's input size before averaging.

    When the members' methods differ (a Grad-CAM map in [0, 1] and a signed occlusion map are
    not on one scale), each map is first put on its display scale in [0, 1] (CAM clipped,
    other methods' positive part), and ``used`` is ``mixed``."""

    def __init__(self, model, method: str, names: Sequence[str] | None = None) -> None:
        from medtl.transfer.ensemble import combine

        self.model, self.combine = model, combine
        self.members = [_RunMaps(m, Explainer.for_classifier(m), method)
                        for m in model.members]
        self.names = list(names) if names else [f"member{i}" for i in
                                                range(1, len(self.members) + 1)]
        self.size = max(m.clf.model_.preprocessing.size for m in self.members)
        methods = {m.used for m in self.members}
        self.scaled = len(methods) > 1
        self.used = "mixed" if self.scaled else methods.pop()

    def record(self) -> dict[str, Any]:
        """How the maps were made (the result's and ensemble_maps.json's ``ensemble``)."""
        return {"maps": f"mean of the members' maps, each resized (bilinear) to {self.size} x "
                        f"{self.size} px (the largest member input) before averaging"
                        + ("; each scaled to [0, 1] first, since their methods differ"
                           if self.scaled else ""),
                "size": self.size, "scaled": self.scaled, "combiner": self.model.method,
                "members": [{"name": n, "method": m.used,
                             "size": m.clf.model_.preprocessing.size}
                            for n, m in zip(self.names, self.members, strict=True)]}

    def proba(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[torch.Tensor]]:
        outs = [m.proba(images) for m in self.members]
        return (self.combine([p for p, _ in outs], self.model.method, self.model.params),
                [pixels for _, pixels in outs])

    def maps(self, pixels: list[torch.Tensor], targets: Sequence[int]) -> np.ndarray:
        out = []
        for member, px in zip(self.members, pixels, strict=True):
            maps = resize_maps(member.maps(px, targets), self.size)
            if self.scaled:
                maps = np.stack([display_map(m, member.used) for m in maps])
            out.append(maps)
        return np.mean(out, axis=0).astype(np.float32)


def resize_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """(N, s, s) maps to (N, size, size), bilinear (as an overlay stretches a map)."""
    from PIL import Image

    if maps.shape[1:] == (size, size):
        return maps.astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(m.astype(np.float32)).resize(
        (size, size), Image.BILINEAR)) for m in maps])


def _explain(clf, ds, mapper: _RunMaps | _EnsembleMaps, out: Path, *, method: str,
             fixed: int | None, mode: str, sanity_check: bool, skip_bad: bool, quiet: bool,
             show: Callable[[str], str] = str, thresholds: dict[str, Any] | None = None,
             multilabel: bool = False) -> dict[str, Any]:
    from medtl.console import progress_bar
    from medtl.files import atomic_open, atomic_write, write_csv, write_json

    used = mapper.used
    classes = list(clf.classes_)
    rows: list[dict[str, Any]] = []
    kept_pixels, kept_targets, kept_maps = [], [], []
    taken: set[str] = set()
    with progress_bar(f"explain ({used})", len(ds), quiet=quiet) as advance:
        for start in range(0, len(ds), BATCH):
            batch = range(start, min(start + BATCH, len(ds)))
            images, indices = _read_batch(ds, batch, skip_bad, used, rows, show)
            if not images:
                advance(len(batch))
                continue
            proba, pixels = mapper.proba(images)
            # Multi-label: the most probable label (each label's own sigmoid)
            predicted = proba.argmax(1)
            targets = predicted if fixed is None else np.full(len(images), fixed)
            maps = mapper.maps(pixels, targets)
            for j, i in enumerate(indices):
                record = ds.records[i]
                stem = _file_stem(record, taken, show(record.path))
                with atomic_open(out / f"{stem}.npy") as f:
                    np.save(f, maps[j])
                heat = display_map(maps[j], used, proba[j, targets[j]])
                picture = overlay(display_image(images[j], mode), heat)
                atomic_write(out / f"{stem}.png", _png(picture))
                rows.append({"path": show(record.path), **record.location(), "method": used,
                             "target": classes[targets[j]],
                             "prediction": (_present(proba[j], classes, thresholds)
                                            if multilabel and thresholds
                                            else classes[predicted[j]]),
                             "probability_target": float(proba[j, targets[j]]),
                             "overlay": f"{stem}.png", "map": f"{stem}.npy"})
            if sanity_check and sum(len(p) for p in kept_pixels) < SANITY_IMAGES:
                kept_pixels.append(pixels)
                kept_targets.extend(int(t) for t in targets)
                kept_maps.append(maps)
            advance(len(batch))
    write_csv(out / "explanations.csv", rows)
    sanity = None
    if sanity_check and kept_pixels and isinstance(mapper, _RunMaps):
        pixels = torch.cat(kept_pixels)[:SANITY_IMAGES]
        sanity = randomisation_check(mapper.explainer, pixels, kept_targets[:SANITY_IMAGES], used,
                                     maps=np.concatenate(kept_maps)[:SANITY_IMAGES])
        write_json(out / "sanity_check.json", sanity)
    log.info("%d explanations (%s) written to %s", sum("overlay" in r for r in rows), used, out)
    result = {"method": used, "rows": rows, "sanity": sanity}
    if isinstance(mapper, _EnsembleMaps):
        result["ensemble"] = mapper.record()
        write_json(out / "ensemble_maps.json", result["ensemble"])
        log.info("ensemble: %s", result["ensemble"]["maps"])
    return result


def _present(proba: np.ndarray, labels: Sequence[str], thresholds: dict[str, Any]) -> str:
    """The labels whose probability is at least their threshold, ``|``-separated (as
    ChestX-ray14's Finding Labels); empty when none is."""
    return "|".join(label for label, p in zip(labels, proba, strict=True)
                    if p >= float(thresholds[label]))


def _read_batch(ds, batch: range, skip_bad: bool, used: str, rows: list[dict[str, Any]],
                show: Callable[[str], str] = str) -> tuple[list[np.ndarray], list[int]]:
    """The readable images of ``batch`` and their indices; an unreadable one is a row saying
    so (with ``skip_bad``) or the error."""
    images, indices = [], []
    for i in batch:
        try:
            images.append(ds.read(i))
            indices.append(i)
        except DataReadError as exc:
            if not skip_bad:
                raise
            log.warning("skipped unreadable image %s: %s", exc.path, exc.reason)
            rows.append({"path": show(exc.path), "method": used, "target": "",
                         "prediction": "UNREADABLE"})
    return images, indices


def _multilabel_gallery(clf, explainer: Explainer, used: str, data, proba: np.ndarray,
                        ok: np.ndarray, labels: np.ndarray, classes: Sequence[str], *,
                        size: int, mode: str, method: str) -> dict[str, Any]:
    """:func:`gallery` of a multi-label split (see there); unknown targets are never chosen."""
    from PIL import Image

    burned = np.array([r.burned_in for r in data.records], dtype=bool)
    chosen: list[tuple[str, int, int]] = []  # (kind, image, label)
    for k, name in enumerate(classes):
        for value, word in ((1.0, "present"), (0.0, "absent")):
            idx = np.flatnonzero((labels[:, k] == value) & ok & ~burned)
            idx = idx[np.argsort(-proba[idx, k], kind="stable")][:1]
            chosen.extend((f"{name} {word}", int(i), k) for i in idx)
    entries, picked, images = [], [], []
    for kind, i, k in chosen:
        try:
            images.append(data.read(i))
            picked.append((kind, i, k))
        except DataReadError:
            continue
    if images:
        pixels = model_input(clf.model_.preprocessing, images, _device(explainer))
        targets = [k for _, _, k in picked]
        maps = np.concatenate([explainer.maps(pixels[s:s + BATCH], targets[s:s + BATCH], used)
                               for s in range(0, len(picked), BATCH)])
        for (kind, i, k), image, raw in zip(picked, images, maps, strict=True):
            thumb = Image.fromarray(display_image(image, mode))
            thumb.thumbnail((size, size))
            small = np.asarray(thumb.convert("RGB"))
            p = float(proba[i, k])
            entries.append({
                "kind": kind, "path": data.records[i].path, "label": kind,
                "prediction": classes[k], "target": classes[k], "probability": p,
                "image": _png(small), "overlay": _png(overlay(small, display_map(raw, used, p)))})
    return {"method": used, "entries": entries, "multilabel": True,
            "note": explainer.why_not_differentiable if used != method else None,
            "withheld": int(burned.sum())}


def randomisation_check(explainer: Explainer, pixels: torch.Tensor, targets: Sequence[int],
                        method: str = "gradcam", *, maps: np.ndarray | None = None,
                        seed: int = 0) -> dict[str, Any]:
    """Adebayo et al.'s model randomisation test: rank correlation (Spearman) between each
    image's map from the trained model and from the same model with its backbone re-initialised.

    A method that explains the model gives unrelated maps (low correlation); one that mostly
    reflects the image (an edge detector) does not.
    """
    method = explainer.method_for(method)
    trained = explainer.maps(pixels, targets, method) if maps is None else maps
    randomised = explainer.randomised(seed).maps(pixels, targets, method)
    rhos = [spearman(a, b) for a, b in zip(trained, randomised, strict=True)]
    # A randomised model often has no positive evidence at all: its Grad-CAM map is empty and
    # ranks nothing (correlation 0). Said apart, so a reader can discount those images.
    empty = [bool(np.ptp(m) == 0) for m in randomised]
    informative = [r for r, e in zip(rhos, empty, strict=True) if not e]
    result = {"method": method, "n": len(rhos), "spearman": rhos,
              "median_spearman": float(np.median(rhos)), "mean_spearman": float(np.mean(rhos)),
              "empty_randomised_maps": sum(empty),
              "median_spearman_nonempty": float(np.median(informative)) if informative
              else None,
              "threshold": SANITY_THRESHOLD,
              "passed": bool(np.median(rhos) < SANITY_THRESHOLD)}
    log.info("model randomisation check (%s, %d images): median Spearman %.3f between trained "
             "and randomised maps (%s)", method, len(rhos), result["median_spearman"],
             "they depend on the learned weights" if result["passed"]
             else "they do NOT depend enough on the learned weights")
    return result


def gallery(clf, data, proba: np.ndarray, classes: Sequence[str], positive: int | None, *,
            per_kind: int = 2, size: int = 192, method: str = "gradcam",
            mode: str = "2d") -> dict[str, Any]:
    """Maps for the most confident true and false positives and negatives of ``data``.

    Binary: every map is for the positive class, so the four kinds show where the model sees
    (or fails to see) the finding. Multi-class: correct and wrong predictions, each mapped for
    its predicted class. Multi-label (``data.labels`` (n, K)): per label, the image labelled
    present and the one labelled absent with that label's highest probability, each mapped for
    that label (kind ``"<label> present"`` / ``"<label> absent"``, ``target`` the label).
    """
    from PIL import Image

    explainer = Explainer.for_classifier(clf)
    used = explainer.method_for(method)
    proba = np.asarray(proba)
    ok = np.isfinite(proba).all(axis=1)
    pred = np.where(ok, np.nan_to_num(proba).argmax(axis=1), -1)
    labels = np.asarray(data.labels)
    if labels.ndim == 2:
        return _multilabel_gallery(clf, explainer, used, data, proba, ok, labels, classes,
                                   size=size, mode=mode, method=method)
    if positive is not None:
        is_pos, said_pos = labels == positive, pred == positive
        kinds = {"true positive": is_pos & said_pos, "false positive": ~is_pos & said_pos,
                 "false negative": is_pos & ~said_pos, "true negative": ~is_pos & ~said_pos}
    else:
        kinds = {"correct": pred == labels, "wrong": pred != labels}
        per_kind *= 2
    # A DICOM saying BurnedInAnnotation YES may show a name in its pixels: never drawn here.
    burned = np.array([r.burned_in for r in data.records], dtype=bool)
    chosen: list[tuple[str, int]] = []
    for kind, mask in kinds.items():
        idx = np.flatnonzero(mask & ok & ~burned)
        idx = idx[np.argsort(-proba[idx, pred[idx]], kind="stable")][:per_kind]
        chosen.extend((kind, int(i)) for i in idx)
    entries, images, picked = [], [], []
    for kind, i in chosen:
        try:
            images.append(data.read(i))
            picked.append((kind, i))
        except DataReadError:
            continue
    if images:
        dev = _device(explainer)
        pixels = model_input(clf.model_.preprocessing, images, dev)
        targets = [positive if positive is not None else pred[i] for _, i in picked]
        maps = np.concatenate([explainer.maps(pixels[s:s + BATCH], targets[s:s + BATCH], used)
                               for s in range(0, len(picked), BATCH)])
        for k, ((kind, i), image, raw) in enumerate(zip(picked, images, maps, strict=True)):
            shown = display_image(image, mode)
            thumb = Image.fromarray(shown)
            thumb.thumbnail((size, size))
            small = np.asarray(thumb.convert("RGB"))
            p = float(proba[i, targets[k]])
            entries.append({
                "kind": kind, "path": data.records[i].path, "label": classes[int(labels[i])],
                "prediction": classes[int(pred[i])], "target": classes[int(targets[k])],
                "probability": p,
                "image": _png(small), "overlay": _png(overlay(small, display_map(raw, used, p)))})
    return {"method": used, "entries": entries,
            "note": explainer.why_not_differentiable if used != method else None,
            "withheld": int(burned.sum())}
