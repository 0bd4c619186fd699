"""``fine-tune --frozen-cache K``: the frozen lower blocks run once per image, not once per
epoch.

When only the top blocks train, most of a training step is the forward pass of the frozen
blocks below them, whose output for a given input never changes (they are in eval mode: no
BatchNorm update, no dropout). So their output is computed once for every training image and
kept, and the epochs train the top blocks, pool and classifier on it.

Augmentation happens before the lower blocks, so it cannot be applied to their output; instead
K versions of each training image are kept: the plain image and K-1 augmented copies (drawn from
the seed), and epoch e trains on version (e - 1) mod K. Validation is the plain image. The
trade: epochs cost the top blocks only, but the network sees K fixed augmentations instead of
a fresh one each epoch (measured in docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn

from medtl.errors import MedtlError
from medtl.training.loop import ImageInputs, Inputs, epoch_generator
from medtl.training.streaming import index_batches, load_batches

log = logging.getLogger("medtl")

COPY_STREAM = 7  # the generator stream of the cached copies' augmentation


class TopBlocks(nn.Module):
    """The network above its lowest ``start`` blocks: its own top blocks, pool and classifier
    (the same modules, so training this trains the network)."""

    def __init__(self, network: nn.Module, start: int) -> None:
        super().__init__()
        self.top = nn.ModuleList(list(network.blocks.values())[start:])
        self.pool = network.pool
        self.classifier = network.classifier
        self.imagenet_pool = getattr(network, "imagenet_pool", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.top:
            x = block(x)
        pool = self.imagenet_pool if self.imagenet_pool is not None else self.pool
        return self.classifier(pool(x))


class CachedInputs(Inputs):
    """Batches of kept feature maps, in the channels_last layout the blocks trained in."""

    channels_last = True

    def train_batch(self, xb: torch.Tensor, device: torch.device,
                    gen: torch.Generator) -> torch.Tensor:
        return self.eval_batch(xb, device)

    def eval_batch(self, xb: torch.Tensor, device: torch.device) -> torch.Tensor:
        xb = xb.to(device).float()
        return xb.contiguous(memory_format=torch.channels_last) if xb.ndim == 4 else xb


class EpochCopies:
    """The cached outputs of K versions of each image; epoch e uses version (e - 1) mod K."""

    def __init__(self, copies: torch.Tensor) -> None:
        self.copies = copies  # (K, N, ...)
        self.shape = tuple(copies.shape[1:])
        self.dtype = copies.dtype
        self.ndim = copies.ndim - 1

    def __len__(self) -> int:
        return self.copies.shape[1]

    def for_epoch(self, epoch: int) -> torch.Tensor:
        return self.copies[(epoch - 1) % self.copies.shape[0]]

    def digest_bytes(self) -> bytes:
        return hashlib.sha256(self.copies.contiguous().numpy().tobytes()).digest()


@torch.no_grad()
def lower_outputs(network: nn.Module, start: int, x, inputs: ImageInputs, *, copies: int,
                  seed: int, batch_size: int, device: torch.device,
                  quiet: bool = True, stream: int = COPY_STREAM) -> torch.Tensor:
    """(copies, N, ...) float32 outputs of the lowest ``start`` blocks: copy 0 of the plain
    images, the others of augmented ones (``inputs.augment``, generators from the seed and
    ``stream``)."""
    network.to(device=device, memory_format=torch.channels_last).eval()
    from medtl.console import progress_bar

    out: torch.Tensor | None = None
    with progress_bar("frozen blocks, once", copies * len(x), quiet=quiet) as advance:
        for k in range(copies):
            gen = epoch_generator(seed, k, stream=stream, device=device.type)
            for idx, images in load_batches(x, index_batches(len(x), batch_size)):
                xb = inputs.eval_batch(images, device) if k == 0 else \
                    inputs.train_batch(images, device, gen)
                y = network.forward_blocks(xb, upto=start).float().cpu().contiguous()
                if out is None:
                    out = torch.empty((copies, len(x), *y.shape[1:]), dtype=torch.float32)
                out[k, idx] = y
                advance(len(idx))
    assert out is not None
    return out


def check_cache(copies: int, augment: str, mix: str, unfreeze: int, n_blocks: int) -> None:
    """The option mistakes of ``--frozen-cache``, before any data is read."""
    if copies < 0:
        raise MedtlError(f"--frozen-cache {copies}: 0 (off) or the number of versions per image")
    if copies == 0:
        return
    if augment != "none" and copies < 2:
        raise MedtlError(f"--frozen-cache {copies} with --augment {augment}: keep at least 2 "
                         "versions (the plain image and augmented copies), or --augment none")
    if augment == "none" and copies > 1:
        raise MedtlError(f"--frozen-cache {copies} with --augment none: the copies would all be "
                         "the same image; use --frozen-cache 1")
    if mix != "none":
        raise MedtlError(f"--frozen-cache with --mix {mix}: mixing happens on pixels, before the "
                         "cached blocks; use --mix none")
    if unfreeze >= n_blocks:
        raise MedtlError("--frozen-cache needs frozen blocks to cache: --unfreeze below the "
                         f"network's {n_blocks} blocks")
