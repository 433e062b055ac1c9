"""Data parallelism for the training stages under `torchrun` (run.launcher in params.yaml).

Every rank loads the same weights, draws its own noise and prompts, and averages gradients with the others
before each optimizer step. The averaging is a post-accumulate-grad hook per trained parameter (one
all-reduce as its gradient is complete) rather than a DistributedDataParallel wrapper: objectives call a
network several times per loss (DMD2's critic runs the fake score on student and real samples, DMD's
generator runs the student twice) and freeze networks mid-loss, which DDP's reducer does not allow, while
the hook sees exactly the gradient each parameter ends up with. Rank 0 alone writes the stage's outputs.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from fewstep.files import atomic_output


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain `python` launch."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device) -> torch.device:
    """Join the process group (NCCL on GPU, gloo on CPU); each rank gets its own GPU."""
    rank, size = world()
    if size == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _average(param: torch.Tensor) -> None:
    dist.all_reduce(param.grad)
    param.grad.div_(dist.get_world_size())


def broadcast(*modules: nn.Module) -> None:
    """Every rank starts from rank 0's weights (a freshly initialized module differs per rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for module in modules:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)


def synchronize(*modules: nn.Module) -> None:
    """Start every rank from rank 0's weights and average the gradients of every trainable parameter."""
    if not dist.is_initialized():
        return
    broadcast(*modules)
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(_average)


def checkpoint_name(pipeline: str, stage: str, per_rank: bool = True) -> str:
    """The checkpoint folder of a pipeline's stage (`default-teacher`, `sdxl-distill`), for every family. Each
    rank resumes its own random streams: one folder per rank when there are several, unless the checkpoint is
    sharded (an FSDP checkpoint reshards across rank counts)."""
    rank, size = world()
    name = f"{pipeline}-{stage}"
    return name if size == 1 or not per_rank else f"{name}-rank{rank}of{size}"


def per_rank(settings, stage: str, generator: torch.Generator):
    """A training section's `batch_size` is the global batch, whatever the family: each rank draws its own
    noise and conditions (a rank-salted generator) for batch_size / ranks samples, and gradients are averaged.
    Returns the settings this rank trains with."""
    rank, size = world()
    if size == 1:
        return settings
    if settings.batch_size % size:
        raise ValueError(f"{stage}.batch_size ({settings.batch_size}) must divide over {size} processes (it is "
                         f"the global batch: e.g. {settings.batch_size * size} for {settings.batch_size} per process)")
    generator.manual_seed(generator.initial_seed() + rank)
    return settings.model_copy(update={"batch_size": settings.batch_size // size})


def mine(batch: torch.Tensor) -> torch.Tensor:
    """This rank's equal share of a global batch drawn identically on every rank: averaged gradients then
    equal the one-process gradient of the whole batch."""
    rank, size = world()
    if size == 1:
        return batch
    if len(batch) % size:
        raise ValueError(f"a batch of {len(batch)} does not split over {size} processes")
    return batch.chunk(size)[rank]


def mean_across(values: dict[str, float]) -> dict[str, float]:
    """The mean of each logged value over all ranks (what one process on the whole batch would log)."""
    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(stacked)
    return dict(zip(keys, (stacked / dist.get_world_size()).tolist()))


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def output(path: Path):
    """Rank 0: the stage's atomic output. Other ranks: a scratch directory that is thrown away."""
    if world()[0] == 0:
        with atomic_output(path) as out:
            yield out
        return
    with tempfile.TemporaryDirectory(prefix=f"rank{world()[0]}-") as scratch:
        yield Path(scratch) / Path(path).name
