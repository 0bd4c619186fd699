"""Images decoded on the fly for training sets larger than memory.

A trainable strategy decodes its splits once into one uint8 tensor when that fits the memory
budget (``--memory-budget``, default half the machine's RAM): no epoch decodes a JPEG again.
When it does not fit (224k chest X-rays at 224 px are 33 GB), the split becomes a
:class:`StreamedImages`: DataLoader worker processes read and resize each batch's images while
the previous batch trains, and nothing but the batches in flight is held.

The loop asks either kind for the same batches (the indices of its epoch order), and
augmentation runs on the decoded uint8 batch in the training process as it does for a tensor,
so a streamed run trains on the same pixels, bit for bit, as one held in memory.

Decoding a JPEG costs about as much CPU as a training step's share of an image on a small
machine, so each image is decoded once: when a folder is given (the run's checkpoint folder),
its resized uint8 pixels are written to a file there the first time and read back with
``pread`` from then on (sharded by nothing but offset: image i at i x its size). Reads go
through the page cache, which the kernel evicts under pressure, never into the process's own
memory. The file lives as long as the run's checkpoints; without the disk space for it every
epoch decodes again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from medtl.errors import DataReadError

log = logging.getLogger("medtl")

# Batches each worker keeps decoded ahead of the one training.
PREFETCH = 4


def default_workers() -> int:
    """Decoding processes: half this process's share of the cores, up to 8 (the other half
    trains); none with 2 cores or fewer, where a worker only takes a core from training
    (measured: docs/benchmarks.md "Data larger than memory") and the training process reads
    the images itself."""
    from medtl.training import distributed

    group = distributed.current()
    share = (os.cpu_count() or 1) // (group.local_world_size if group is not None else 1)
    return 0 if share <= 2 else min(8, share // 2)


class StreamedImages:
    """A split's images as uint8 (N, S, S, 3), read from disk batch by batch.

    ``store``: a folder for the decoded images (module docstring), ``"temp"`` for a temporary
    one, None to decode every epoch. ``skipped``: where each unreadable image is reported
    (``--skip-bad``, training only: an unreadable image leaves its batch, as it would have left
    the decoded tensor). Without
    ``skip_bad`` an unreadable image stops training with its path and the reason.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, data, preprocessing, *, workers: int | None = None,
                 skip_bad: bool = False, skipped: list[str] | None = None,
                 store: str | os.PathLike[str] | None = None) -> None:
        self.data = data
        self.preprocessing = preprocessing
        self.workers = default_workers() if workers is None else workers
        self.skip_bad = skip_bad
        self.skipped = skipped if skipped is not None else []
        self._dropped: set[int] = set()
        size = preprocessing.size
        self.shape = (len(data), size, size, 3)
        self.store: DecodedStore | None = None
        if store == "temp":  # a folder of its own, removed with this object
            import shutil
            import tempfile
            import weakref

            store = tempfile.mkdtemp(prefix="medtl-decoded-")
            weakref.finalize(self, shutil.rmtree, store, True)
        if store is not None:
            self.store = DecodedStore.open(Path(store), self.digest_bytes().hex()[:16],
                                           len(data), size)

    def __len__(self) -> int:
        return len(self.data)

    def digest_bytes(self) -> bytes:
        """What identifies the streamed images for a checkpoint: each record and the pixel
        pipeline (the files themselves are fingerprinted by the run's request)."""
        h = hashlib.sha256(self.preprocessing.key().encode())
        for uid, label in zip(self.data.uids, self.data.labels.tolist(), strict=True):
            h.update(f"{uid}\0{label}\n".encode())
        return h.digest()

    def batches(self, index_batches: Sequence[torch.Tensor]
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(indices, images)`` for each batch of indices, in order; indices of images that
        could not be read are left out (with ``skip_bad``)."""
        from torch.utils.data import DataLoader

        plan = [b.tolist() for b in index_batches]
        if not plan:
            return
        workers = min(self.workers, len(plan))
        loader = DataLoader(_Reader(self.data, self.preprocessing, self.store),
                            batch_sampler=plan,
                            num_workers=workers, collate_fn=_collate,
                            prefetch_factor=PREFETCH if workers else None,
                            # Its workers' seeds from a generator of its own: drawn from torch's
                            # global one they would shift the dropout masks of training.
                            generator=torch.Generator().manual_seed(0))
        for kept, images, failed in loader:
            for i, reason in failed:
                path = self.data.records[i].uid
                if not self.skip_bad:
                    raise DataReadError(path, reason)
                if i not in self._dropped:  # once per image, not once per epoch
                    self._dropped.add(i)
                    log.warning("skipped unreadable image %s: %s", path, reason)
                    self.skipped.append(f"{path}: {reason}")
            yield kept, images


class DecodedStore:
    """Resized uint8 images in one file, image i at offset i x its size, and one byte per image
    saying whether it is there (written after the pixels). Read and written with pread/pwrite,
    so worker processes share it through the page cache."""

    def __init__(self, pixels: Path, done: Path, n: int, size: int) -> None:
        self.pixels, self.done, self.n, self.size = pixels, done, n, size
        self.nbytes = size * size * 3
        self._fds: tuple[int, int] | None = None

    @classmethod
    def open(cls, folder: Path, key: str, n: int, size: int) -> DecodedStore | None:
        """The store for these images in ``folder`` (kept from an interrupted run with the
        same images); None, said in the log, when the disk cannot hold it."""
        import shutil

        folder.mkdir(parents=True, exist_ok=True)
        pixels, done = folder / f"decoded-{key}.u8", folder / f"decoded-{key}.done"
        need = n * size * size * 3
        have = pixels.stat().st_blocks * 512 if pixels.exists() else 0
        free = shutil.disk_usage(folder).free
        if need - have > free * 0.9:
            log.warning("the decoded images would take %s in %s, which has %s free: every "
                        "epoch decodes them again", describe(need), folder, describe(free))
            return None
        for path, length in ((pixels, need), (done, n)):
            with open(path, "ab") as f:  # sparse: blocks are taken as images are written
                if f.tell() != length:
                    f.truncate(length)
        return cls(pixels, done, n, size)

    def _open(self) -> tuple[int, int]:
        if self._fds is None:  # per process: a forked worker opens its own
            self._fds = (os.open(self.pixels, os.O_RDWR), os.open(self.done, os.O_RDWR))
        return self._fds

    def __getstate__(self):
        return {**self.__dict__, "_fds": None}

    def get(self, i: int) -> np.ndarray | None:
        pixels, done = self._open()
        if os.pread(done, 1, i) != b"\x01":
            return None
        buf = os.pread(pixels, self.nbytes, i * self.nbytes)
        return np.frombuffer(buf, dtype=np.uint8).reshape(self.size, self.size, 3)

    def put(self, i: int, image: np.ndarray) -> None:
        pixels, done = self._open()
        os.pwrite(pixels, np.ascontiguousarray(image, dtype=np.uint8).tobytes(),
                  i * self.nbytes)
        os.pwrite(done, b"\x01", i)


class _Reader:
    """What each worker process runs: one image read and resized (or taken from the store of
    decoded images), or why it could not be."""

    def __init__(self, data, preprocessing, store: DecodedStore | None = None) -> None:
        self.data, self.preprocessing, self.store = data, preprocessing, store

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        if self.store is not None and (image := self.store.get(i)) is not None:
            return i, image, None
        try:
            image = self.preprocessing.resize_uint8(self.data.read(i))
        except DataReadError as exc:
            return i, None, exc.reason
        if self.store is not None:
            self.store.put(i, image)
        return i, image, None


def _collate(items) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    ok = [(i, img) for i, img, _ in items if img is not None]
    failed = [(i, why) for i, img, why in items if img is None]
    if not ok:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.uint8), failed
    kept = torch.as_tensor([i for i, _ in ok], dtype=torch.int64)
    return kept, torch.from_numpy(np.stack([img for _, img in ok])), failed


def index_batches(n: int, batch_size: int) -> list[torch.Tensor]:
    """``0..n-1`` in consecutive batches (evaluation order)."""
    return [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def load_batches(x, index_batches: Sequence[torch.Tensor]
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(indices, uint8 images)`` per batch, from a decoded tensor or a :class:`StreamedImages`."""
    if isinstance(x, StreamedImages):
        yield from x.batches(index_batches)
    else:
        for idx in index_batches:
            yield idx, x[idx]


def decoded_bytes(n: int, size: int) -> int:
    """Bytes of ``n`` decoded uint8 RGB images of side ``size``."""
    return n * size * size * 3


def describe(n_bytes: float) -> str:
    if n_bytes >= 1 << 30:
        return f"{n_bytes / (1 << 30):.1f} GB"
    return f"{n_bytes / (1 << 20):.0f} MB"
