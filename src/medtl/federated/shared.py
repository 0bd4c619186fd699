"""What crosses the network in a federation: named parameter arrays and counts, nothing else.

Each message between a site and the server holds one ``ArrayRecord`` of the model's shared
tensors (their names and shapes fixed by the recipe before any data is read) and one
``MetricRecord`` of counts. :func:`check_reply` is the rule, applied by every site to what it
is about to send (``medtl.federated.apps``' guard) and by the server to what it receives, so a
changed client that tried to send anything else (features, labels, patient IDs, a loss) is
refused on both ends. A site receiving arrays checks them the same way before loading them
(:func:`load_shared`): a crafted server cannot make a site load tensors of other shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medtl.errors import MedtlError

# The counts a site may send: ``num-examples`` (the images it trained on, or validated on),
# and the confusion matrix of the global model it received on its validation split
# ("c<true>_<predicted>"), which gives the federation's per-round accuracy and sensitivity.
EVAL_COUNT_PREFIX = "c"


class FederationError(MedtlError):
    """A message or a federation that breaks medtl's rules (shapes, contents, sites)."""


def shared_names(module: nn.Module) -> list[str]:
    """The tensors a federation averages: every trainable parameter, and the floating buffers
    (BatchNorm running statistics) of the modules that own a trainable parameter. Frozen
    blocks are the same ImageNet weights at every site, so they never travel."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    owners = {n.rsplit(".", 1)[0] if "." in n else "" for n in names}
    for name, buf in module.named_buffers():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if owner in owners and buf.is_floating_point():
            names.append(name)
    return names


def get_shared(module: nn.Module, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named tensors as float32 numpy arrays, in ``names``' order."""
    state = module.state_dict()
    return {n: state[n].detach().cpu().float().numpy().copy() for n in names}


def check_arrays(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                 *, source: str) -> None:
    """Exactly the expected names, each a finite float array of the expected shape."""
    got = set(arrays)
    if got != set(expected):
        missing, extra = sorted(set(expected) - got), sorted(got - set(expected))
        raise FederationError(f"{source}: arrays {_list(extra)} not expected, {_list(missing)} "
                              "missing: only the model's shared parameters may be exchanged")
    for name, shape in expected.items():
        a = arrays[name]
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
            raise FederationError(f"{source}: {name} is not a floating-point array")
        if tuple(a.shape) != tuple(shape):
            raise FederationError(f"{source}: {name} has shape {tuple(a.shape)}, the model's "
                                  f"is {tuple(shape)}")
        if not np.isfinite(a).all():
            raise FederationError(f"{source}: {name} holds NaN or infinite values")


def load_shared(module: nn.Module, arrays: Mapping[str, np.ndarray], names: Sequence[str], *,
                source: str) -> None:
    """Load the shared tensors into ``module`` after :func:`check_arrays`."""
    state = module.state_dict()
    check_arrays(arrays, {n: tuple(state[n].shape) for n in names}, source=source)
    with torch.no_grad():
        for n in names:
            state[n].copy_(torch.from_numpy(np.asarray(arrays[n])).to(state[n].dtype))


def check_counts(metrics: Mapping[str, Any], *, num_classes: int, source: str) -> None:
    """A site's MetricRecord: counts only, of the names the rule allows."""
    allowed = {"num-examples", *(f"{EVAL_COUNT_PREFIX}{t}_{p}" for t in range(num_classes)
                                 for p in range(num_classes))}
    extra = sorted(set(metrics) - allowed)
    if extra:
        raise FederationError(f"{source}: {_list(extra)} are not counts this federation sends")
    if "num-examples" not in metrics:
        raise FederationError(f"{source}: no num-examples")
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise FederationError(f"{source}: {k} is not a count ({v!r})")


def check_reply(content: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], *,
                train: bool, num_classes: int, source: str) -> None:
    """One reply's RecordDict: ``arrays`` (training only) and ``metrics``, nothing more."""
    from flwr.app import ArrayRecord, MetricRecord

    keys = set(content.keys())
    want = {"arrays", "metrics"} if train else {"metrics"}
    if keys != want:
        raise FederationError(f"{source}: records {_list(sorted(keys))}; a site sends only "
                              f"{_list(sorted(want))}")
    if train:
        record = content["arrays"]
        if not isinstance(record, ArrayRecord):
            raise FederationError(f"{source}: 'arrays' is not an ArrayRecord")
        check_arrays({k: v.numpy() for k, v in record.items()}, expected, source=source)
    metrics = content["metrics"]
    if not isinstance(metrics, MetricRecord):
        raise FederationError(f"{source}: 'metrics' is not a MetricRecord")
    check_counts(dict(metrics), num_classes=num_classes, source=source)


def _list(items: Sequence[str]) -> str:
    return "[" + ", ".join(items) + "]" if items else "none"
