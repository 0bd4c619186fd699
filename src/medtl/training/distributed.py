"""Distributed data-parallel training: the process group, and what the loop does differently
under it.

A DDP run is N copies of ``medtl train`` started by torchrun (``--devices N`` on one machine
asks torchrun for them; across machines the user runs torchrun, docs/scale.md). Each process
reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) and joins
the group: gloo on CPU, NCCL on GPU.

What keeps N processes one training:
- the epoch's order of samples is drawn from (seed, epoch) as on one process, and every global
  batch of ``batch_size`` is shared out as DistributedSampler shares out an epoch (rank r takes
  every N-th sample), so the seed gives the same data order for any N;
- the loss is the global batch's mean (each process's sum over the global count, class weights
  included), so the gradients DDP averages are those of one process on the whole batch;
- BatchNorm's running statistics are taken from rank 0 at each epoch's end (without
  ``--sync-bn`` each process normalises its own share of the batch, as in timm and fastai), so
  every process scores validation identically and takes the same early-stopping decisions;
- rank 0 alone writes: the run, its checkpoints, the feature cache. Every process reads the
  checkpoint to resume, so across machines the run's folder must be on shared storage.

Augmentation draws and dropout masks come from each process's own generator: the data order is
the same for any N, the augmented pixels are not.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from medtl.errors import MedtlError

log = logging.getLogger("medtl")

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Group:
    """This process's place in the DDP run."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_GROUP: Group | None = None


def current() -> Group | None:
    """The DDP group this process has joined, None on one process."""
    return _GROUP


def is_main() -> bool:
    """Whether this process writes: rank 0, or the only process."""
    return _GROUP is None or _GROUP.is_main


def requested() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str) -> Group:
    """Join the process group torchrun describes in the environment (once per process)."""
    global _GROUP
    import torch
    import torch.distributed as dist

    if _GROUP is not None:
        return _GROUP
    missing = [k for k in ENV[:3] if k not in os.environ]
    if missing:
        raise MedtlError(f"distributed training needs torchrun's environment ({', '.join(missing)}"
                         " unset): start it with `medtl train --devices N` or torchrun")
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise MedtlError(f"process {local_rank} of this machine has no GPU (this machine has "
                             f"{torch.cuda.device_count()}); start at most that many per node")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    _GROUP = Group(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=local_rank,
                   local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                   backend=backend)
    if not _GROUP.is_main:
        # One voice: the other processes log warnings and errors only.
        logging.getLogger("medtl").setLevel(logging.WARNING)
    return _GROUP


def leave() -> None:
    """Leave the group (end of the run)."""
    global _GROUP
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = None


def barrier() -> None:
    """Wait for every process of the group (nothing on one process)."""
    if _GROUP is not None:
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def alone() -> Iterator[None]:
    """Work that one process does for all (rank 0's frozen stage): the loop inside trains as
    on one process, with no collective the others would have to join."""
    global _GROUP
    saved, _GROUP = _GROUP, None
    try:
        yield
    finally:
        _GROUP = saved


def default_threads() -> int:
    """CPU threads per process: the machine's cores shared among this machine's processes."""
    share = _GROUP.local_world_size if _GROUP is not None else 1
    return max(1, (os.cpu_count() or 1) // share)


# ------------------------------------------------------------------------------ what the loop uses
def shard(indices, group: Group | None):
    """This process's part of one global batch: every N-th sample from its rank, as
    DistributedSampler shares out an epoch."""
    return indices if group is None else indices[group.rank::group.world_size]


def all_sum(value, group: Group | None):
    """A tensor summed over the processes (a new tensor; the input is left as it is)."""
    if group is None:
        return value
    import torch.distributed as dist

    out = value.detach().clone()
    dist.all_reduce(out)
    return out


def sync_buffers(modules: Sequence[Any], group: Group | None) -> None:
    """Every process takes rank 0's buffers (BatchNorm's running statistics)."""
    if group is None:
        return
    import torch.distributed as dist

    for module in modules:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def gather(obj: Any, group: Group | None) -> list[Any]:
    """``obj`` of every process, by rank (a list of one on one process)."""
    if group is None:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * group.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, group: Group | None) -> Any:
    """Rank 0's ``obj`` on every process."""
    if group is None:
        return obj
    import torch.distributed as dist

    box = [obj if group.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_seed(seed: int, group: Group | None) -> int:
    """The seed of this process's own draws (dropout): the run's seed on rank 0, so one process
    is rank 0 of one, and unrelated seeds on the others."""
    if group is None or group.rank == 0:
        return seed
    state = np.random.SeedSequence([seed, group.rank]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & 0x7FFF_FFFF_FFFF_FFFF


def rank_stream(stream: int, group: Group | None) -> int:
    """A generator stream of this process's own (augmentation): rank 0 keeps ``stream``."""
    return stream if group is None or group.rank == 0 else stream + 1000 * group.rank


def wrap(model, group: Group | None, device):
    """``model`` under DistributedDataParallel (the module itself on one process)."""
    if group is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else group.local_rank] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def check_sync_bn(device: str) -> None:
    """``--sync-bn`` where PyTorch cannot do it (CPU) is refused, not silently ignored."""
    if not device.startswith("cuda"):
        raise MedtlError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPU "
                         "(without it each process normalises its own share of the batch)")


def sync_batchnorm(model, device: str) -> None:
    """``--sync-bn``: BatchNorm layers of ``model`` replaced in place by SyncBatchNorm (the
    same parameters and state_dict keys), normalising over the whole global batch."""
    import torch

    check_sync_bn(device)
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


# ------------------------------------------------------------------------------ starting processes
def launch(n: int, argv: Sequence[str]) -> int:
    """Run ``medtl ARGV`` as ``n`` processes on this machine through torchrun (its elastic
    launcher, standalone rendezvous); the exit status is the first failing process's, 0 when
    all succeed. Each process prints its own errors; this adds one line naming the rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if n < 1:
        raise MedtlError(f"--devices {n}: at least 1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id="medtl",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.5)
    # torchrun sets OMP_NUM_THREADS=1 when it is unset; medtl sets threads per process itself.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    # A failing process says why itself; torchrun's own report of it adds a traceback.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "medtl", *argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        if code == 2:  # a user's mistake: the process said it in one line already
            return code
        print(f"medtl: process {rank} of {n} ended with exit status {failure.exitcode}; its "
              "message is above", file=sys.stderr)
        return code
    return 0
