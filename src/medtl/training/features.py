"""Frozen feature extraction and its on-disk cache.

On CPU the frozen backbone runs through ONNX Runtime: measured here it is 5.3x faster than an
eager NCHW PyTorch loop on MobileNetV2 (docs/benchmarks.md). The ONNX file is exported once per
(backbone, weights, input size) and checked against PyTorch before it is trusted; when export or
the check fails, PyTorch channels_last takes over, which is also the path on GPU.

Features are cached per image content, so a second run on the same data (another head, another
seed) never runs the backbone again, and an interrupted extraction keeps every finished batch.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medtl.console import progress_bar
from medtl.data import readers
from medtl.data.transforms import Preprocessing
from medtl.errors import DataReadError, MedtlError, check_choice
from medtl.files import atomic_path, atomic_write, cache_root
from medtl.training.loop import torch_threads
from medtl.training.options import ENGINES

log = logging.getLogger("medtl")

ONNX_TOLERANCE = 1e-4


def weights_key(backbone: nn.Module) -> str:
    """Identity of the weights a frozen backbone computes features with: a hash of the tensors
    themselves (the classifier aside, which features do not pass through).

    Never a claimed identity such as a run's recorded sha256: a run from elsewhere could claim
    ImageNet's and fill the shared cache with its own features under ImageNet's key (issue 15).
    The same tensors give the same key whether they were just resolved or loaded from a run.
    """
    h = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        if name.startswith("classifier."):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return "state-" + h.hexdigest()[:16]


class PooledFeatures(nn.Module):
    """What is exported: pixels to pooled features, nothing else."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)


INDEX_NAME = "index.log"
QUARANTINE_DIR = "quarantine"
_CHUNK_NAME = re.compile(r"[0-9a-f]{20}\.npz")


class FeatureStore:
    """Feature vectors keyed by image content hash: one folder per cache key, shared by every
    process that extracts with that key.

    - Each finished batch is one immutable ``.npz`` chunk (its keys and features), written
      atomically and fsynced (temp file + rename), so a run killed mid-way leaves whole chunks.
    - ``index.log`` says which chunk holds which key, one ``key chunk`` line each, appended
      under an exclusive ``flock`` once the chunk is in place. A process reads the index once,
      then only what was appended since, and a lookup opens only the chunks holding the keys
      asked for: the cost of a call follows the request, not the size of the cache.
    - A chunk that cannot be read (truncated, foreign) is moved into ``quarantine/`` with one
      warning and its keys count as missing, so they are computed and written again.
    - Two processes writing the same key at once are safe: a chunk's name is the hash of its
      keys, so a repeated batch replaces a chunk with an equal one, and a key listed twice in
      the index is simply listed twice (the last line wins).
    """

    def __init__(self, directory: Path, dim: int | None = None) -> None:
        self.directory = Path(directory)
        self.dim = dim
        self._where: dict[str, str] = {}  # content key -> chunk file name
        self._offset = 0  # bytes of the index read so far
        self._refresh()

    def __contains__(self, key: str) -> bool:
        if key not in self._where:
            self._refresh()
        return key in self._where

    def __getitem__(self, key: str) -> np.ndarray:
        found = self.get_many([key])
        if key not in found:
            raise KeyError(key)
        return found[key]

    def __len__(self) -> int:
        return len(self._where)

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Features of those ``keys`` the cache holds, each chunk read once."""
        if any(k not in self._where for k in keys):
            self._refresh()  # what other processes have added since
        chunks = dict.fromkeys(self._where[k] for k in keys if k in self._where)
        found: dict[str, np.ndarray] = {}
        for name in chunks:
            found.update(self._read_chunk(name))
        wanted = set(keys)
        return {k: v for k, v in found.items() if k in wanted}

    def add(self, keys: Sequence[str], features: np.ndarray) -> None:
        if any(not k or k.split() != [k] for k in keys):
            raise ValueError("feature-cache keys must be non-empty and without white space")
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20] + ".npz"
        buf = io.BytesIO()
        np.savez(buf, keys=np.asarray(keys), features=features.astype(np.float32))
        atomic_write(self.directory / name, buf.getvalue())
        self._append_index("".join(f"{k} {name}\n" for k in keys).encode())
        self._where.update(dict.fromkeys(keys, name))

    # -- internals ----------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Read the index lines appended since the last read (all of them the first time)."""
        try:
            with open(self.directory / INDEX_NAME, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        whole = data.rfind(b"\n") + 1  # a line still being written is read next time
        self._offset += whole
        for line in data[:whole].decode("ascii", "replace").splitlines():
            parts = line.split()
            # A line cut short by a crash fails this test (its newline is added by the next
            # writer) and is ignored: its chunk, if whole, is found again when recomputed.
            if len(parts) == 2 and _CHUNK_NAME.fullmatch(parts[1]):
                self._where[parts[0]] = parts[1]

    def _append_index(self, lines: bytes) -> None:
        fd = os.open(self.directory / INDEX_NAME, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            _lock(fd)  # one writer at a time: lines of two processes never interleave
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                lines = b"\n" + lines  # a crash cut the last line: end it, never extend it
            view = memoryview(lines)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock

    def _read_chunk(self, name: str) -> dict[str, np.ndarray]:
        path = self.directory / name
        try:
            with np.load(path, allow_pickle=False) as z:
                keys, feats = z["keys"], z["features"]
                if (keys.ndim != 1 or feats.ndim != 2 or len(keys) != len(feats)
                        or feats.dtype != np.float32
                        or (self.dim is not None and feats.shape[1] != self.dim)):
                    raise ValueError(f"keys {keys.shape} and features {feats.dtype} "
                                     f"{feats.shape} are not a chunk of this store")
                return {str(k): v for k, v in zip(keys, feats, strict=True)}
        except FileNotFoundError:
            pass  # quarantined or removed by another process: computed again
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            self._quarantine(path, exc)
        self._where = {k: c for k, c in self._where.items() if c != name}
        return {}

    def _quarantine(self, path: Path, exc: Exception) -> None:
        """Move a damaged chunk aside, for a look, and out of every later lookup: never read
        again, never deleted unseen. Its keys are computed again and land in a new chunk."""
        dest = self.directory / QUARANTINE_DIR / path.name
        try:
            dest.parent.mkdir(exist_ok=True)
            os.replace(path, dest)
        except FileNotFoundError:
            return  # another process moved it first and warned
        log.warning("feature-cache chunk %s is damaged (%s: %s); moved to %s, its features are "
                    "computed again", path, type(exc).__name__, exc, dest)


def _lock(fd: int) -> None:
    """Block until this process holds ``fd``'s exclusive flock (POSIX; elsewhere a no-op)."""
    try:
        import fcntl
    except ImportError:  # Windows: appends are still whole lines, only not serialised
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


class FrozenFeatures:
    """Pooled features of a frozen backbone for every image of a Dataset, cached on disk.

    ``n_computed`` counts the images that went through the backbone (not those served from the
    cache), which is how the tests prove the cache is used.
    """

    def __init__(
        self,
        backbone: nn.Module,
        preprocessing: Preprocessing,
        *,
        engine: str = "auto",
        device: str = "cpu",
        batch_size: int = 64,
        cache: bool = True,
        cache_dir: Path | None = None,
        quiet: bool = False,
        threads: int | None = None,
    ) -> None:
        self.backbone = backbone.eval()
        self.preprocessing = preprocessing
        self.engine = check_choice("engine", engine, ENGINES)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache = cache
        # False: read the cache, never add to it (a model loaded from a run: Run.load_model).
        self.cache_writes = True
        self.cache_dir = Path(cache_dir) if cache_dir else cache_root()
        self.quiet = quiet
        self.threads = threads or os.cpu_count() or 1
        self.n_computed = 0
        self.engine_used: str | None = None
        self._run_batch: Callable[[np.ndarray], np.ndarray] | None = None
        self._store: FeatureStore | None = None
        self._key: str | None = None
        self.bad_: dict[int, str] = {}

    # -- identity -----------------------------------------------------------------------------
    @property
    def key(self) -> str:
        if self._key is None:  # hashing the tensors costs ~0.1 s a 100 MB backbone: once
            name = self.backbone.spec.name
            # The pixel pipeline's version: features of pixels decoded by older code are stale.
            self._key = (f"{name}-{weights_key(self.backbone)}-{self.preprocessing.key()}"
                         f"-px{readers.PIXEL_PIPELINE_VERSION}")
        return self._key

    def _in_cache(self, *parts: str) -> Path:
        """A path under the cache root, resolved and refused if it leaves the root: the key is
        built from hashes and a registry name today, and this keeps any later part of it (or a
        link planted in the cache) from steering a write elsewhere."""
        root = self.cache_dir.resolve()
        path = root.joinpath(*parts).resolve()
        if path == root or not path.is_relative_to(root):
            raise MedtlError(f"feature cache: {'/'.join(parts)!r} leads outside {root}")
        return path

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = FeatureStore(self._in_cache("features", self.key),
                                       dim=self.backbone.num_features)
        return self._store

    # -- public -------------------------------------------------------------------------------
    def transform(self, dataset, *, skip_bad: bool = False, use_cache: bool = True,
                  progress: bool = True) -> np.ndarray:
        """(len(dataset), feature_dim) float32 features, in the dataset's order.

        ``use_cache=False`` neither reads nor writes the cache for this call (timing probes);
        with ``cache_writes`` off it is read and not written.

        An unreadable image raises DataReadError unless ``skip_bad``; then its row is NaN and
        ``self.bad_`` maps its index to the reason, for the caller to drop and report.
        """
        n = len(dataset)
        keys = [dataset.content_key(i) for i in range(n)]
        out = np.full((n, self.backbone.num_features), np.nan, dtype=np.float32)
        cached = self.store.get_many(keys) if self.cache and use_cache else {}
        todo: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            if k in cached:
                out[i] = cached[k]
            else:
                todo.setdefault(k, []).append(i)
        del cached
        self.bad_ = {}
        if todo:
            self._compute(dataset, todo, out, skip_bad,
                          self.cache and use_cache and self.cache_writes,
                          quiet=self.quiet or not progress)
        return out

    # -- internals ----------------------------------------------------------------------------
    def _compute(self, dataset, todo: dict[str, list[int]], out: np.ndarray, skip_bad: bool,
                 write_cache: bool, quiet: bool) -> None:
        run = self._runner()
        unique = list(todo.items())
        batches = [unique[i:i + self.batch_size] for i in range(0, len(unique), self.batch_size)]
        with progress_bar(f"features {self.backbone.spec.name}", len(unique),
                          quiet=quiet) as advance:
            for batch, pixels, bad in self._prefetch(dataset, batches, skip_bad):
                good = [item for item in batch if item[0] not in bad]
                for k, reason in bad.items():
                    self.bad_.update(dict.fromkeys(todo[k], reason))
                if good:
                    feats = run(pixels)
                    self.n_computed += len(good)
                    for (_, idx), f in zip(good, feats, strict=True):
                        out[idx] = f
                    if write_cache:
                        self.store.add([k for k, _ in good], feats)
                advance(len(batch))

    def _prefetch(self, dataset, batches, skip_bad) -> Iterator:
        """Decode the next batch in a thread while the backbone runs on this one."""
        def load(batch):
            images, bad = [], {}
            for k, idx in batch:
                try:
                    images.append(self.preprocessing.resize_uint8(dataset.read(idx[0])))
                except DataReadError as exc:
                    if not skip_bad:
                        raise
                    bad[k] = f"{exc.path}: {exc.reason}"
            pixels = self.preprocessing.normalise(np.stack(images)) if images else None
            return batch, pixels, bad

        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(load, batches[0]) if batches else None
            for nxt in batches[1:] + [None]:
                result = future.result()
                future = pool.submit(load, nxt) if nxt is not None else None
                yield result

    def _runner(self) -> Callable[[np.ndarray], np.ndarray]:
        if self._run_batch is not None:
            return self._run_batch
        want_onnx = self.engine == "onnx" or (self.engine == "auto" and self.device.type == "cpu")
        if want_onnx:
            try:
                self._run_batch = self._onnx_runner()
                self.engine_used = "onnxruntime"
            except Exception as exc:  # any export/runtime failure: fall back, never fail the run
                if self.engine == "onnx":
                    raise
                log.warning("ONNX Runtime unavailable for %s (%s); using PyTorch",
                            self.backbone.spec.name, exc)
        if self._run_batch is None:
            self._run_batch = self._torch_runner()
            self.engine_used = f"torch-{self.device.type}-channels_last"
        return self._run_batch

    def _torch_runner(self) -> Callable[[np.ndarray], np.ndarray]:
        model = PooledFeatures(self.backbone).to(self.device).eval()
        model = model.to(memory_format=torch.channels_last)

        @torch.inference_mode()
        def run(pixels: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(pixels).to(self.device).contiguous(
                memory_format=torch.channels_last)
            with torch_threads(self.threads):
                return model(x).float().cpu().numpy()

        return run

    def _onnx_runner(self) -> Callable[[np.ndarray], np.ndarray]:
        import onnxruntime as ort

        path = export_onnx(self.backbone, self.preprocessing.size,
                           self._in_cache("onnx", f"{self.key}.onnx"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(pixels: np.ndarray) -> np.ndarray:
            return session.run(None, {input_name: pixels})[0]

        _check_against_torch(self.backbone, run, self.preprocessing.size, path)
        return run


def export_onnx(backbone: nn.Module, size: int, path: Path) -> Path:
    """Export pixels -> pooled features with a dynamic batch axis; reuse an existing export."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    in_chans = getattr(backbone, "in_chans", 3)
    dummy = torch.zeros(1, in_chans, size, size)
    # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript and
    # handles these CNNs no better; its warning is noise for a medtl user.
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            PooledFeatures(backbone).eval(), (dummy,), str(tmp), dynamo=False,
            input_names=["pixels"], output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
        )
    return path


def _check_against_torch(backbone: nn.Module, run, size: int, path: Path) -> None:
    """Refuse an export whose outputs differ from PyTorch's by more than ONNX_TOLERANCE."""
    g = torch.Generator().manual_seed(0)
    in_chans = getattr(backbone, "in_chans", 3)
    x = torch.randn(2, in_chans, size, size, generator=g)
    with torch.inference_mode():
        ref = PooledFeatures(backbone).eval()(x).numpy()
    got = run(x.numpy())
    # Relative to the features' own scale: an absolute bound would pass any error on weights
    # whose features are small (random weights give ~1e-8).
    err = float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
    if not err <= ONNX_TOLERANCE:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"ONNX export differs from PyTorch by {err:.2e} > {ONNX_TOLERANCE}")
