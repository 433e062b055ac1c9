"""FSDP2 for the training stages (`run.parallel: fsdp`): torch's own `fully_shard`, nothing home-made.

Each trained network (student, fake score, GAN head) is sharded block by block (every entry of a diffusers
UNet's `down_blocks`/`up_blocks`, its `mid_block`, every block of a transformer), then at its root, so each
rank holds 1/N of the weights, gradients and AdamW states and gathers one block at a time for compute.
Gradients are reduce-scattered and averaged by FSDP itself: the per-parameter all-reduce hooks of
`fewstep.core.parallel.synchronize` (the `ddp` path) are not used. The frozen teacher is replicated by default
(`run.shard_teacher: true` shards it too, for when its copy does not fit beside the trained shards).

Checkpoints go through `torch.distributed.checkpoint` with its Hugging Face storage: every rank writes its
shards as safetensors (offsets in the file header), read back with resharding, so a run saved by 2 ranks
resumes on 1 or 4. Nothing in them is a pickle: the rest of the state is JSON and per-rank safetensors.
"""
from __future__ import annotations

import atexit
import gc
import json
import shutil
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from fewstep.core import parallel
from fewstep.core.checkpoint import Checkpointer, GeneratorState, fingerprint, flatten, unflatten
from fewstep.io import load_tensors, save_tensors

# child lists / children whose entries become FSDP units: diffusers UNets and DiT-style transformers
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")
BLOCKS = ("mid_block",)


def init(device: torch.device) -> torch.device:
    """Join (or, for a plain `python` launch, create a one-process) group: FSDP needs one even alone."""
    device = parallel.init(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    atexit.unregister(_release)  # once, however many stages a process runs
    atexit.register(_release)
    return device


def _release() -> None:
    """At exit, while the interpreter is still whole: sharded modules keep the process group and its backend's
    worker threads alive past destroy_process_group, and freed only during interpreter finalization, a thread
    that then needs the GIL aborts the process after its work is done ("terminate called without an active
    exception", SIGABRT; seen once in CI on a 2-rank gloo run). Destroy the group and collect the cycles now."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def blocks(module: nn.Module) -> list[nn.Module]:
    """The per-block FSDP units inside `module`: the outermost entries of BLOCK_LISTS and BLOCKS (a UNet's
    down block is one unit with the transformer blocks inside it)."""
    found: dict[str, nn.Module] = {}
    for name, child in module.named_modules():
        parts = name.split(".")
        is_block = parts[-1] in BLOCKS or (len(parts) > 1 and parts[-2] in BLOCK_LISTS and parts[-1].isdigit())
        if is_block and not any(name.startswith(outer + ".") for outer in found):
            found[name] = child
    return list(found.values())


def shard(module: nn.Module, device: torch.device, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """fully_shard every block, then the network's root (which keeps what no block owns: conv_in, the time
    embedding...). A denoiser wrapper is not sharded itself, its `.unet` is: the wrapper's noise-level
    arithmetic (x0 = x - sigma * eps) stays in fp32 while, with a compute dtype (bf16 on GPU), the network's
    blocks are gathered and run in it, their gradients reduced in fp32 and the network's output returned in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    network = getattr(module, "unet", module)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mixed = compute_dtype is not None and device.type != "cpu"
    blocks_policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if mixed else \
        MixedPrecisionPolicy()
    root_policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                       output_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    for block in blocks(network):
        fully_shard(block, mesh=mesh, mp_policy=blocks_policy)
    fully_shard(network, mesh=mesh, mp_policy=root_policy)
    if network is not module:  # the wrapper's own buffers (its noise schedule) follow the shards
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, buffer.to(device))
    return module


def trained_bytes(*objects: Any) -> int:
    """Bytes this rank holds of the given modules' parameters and gradients and optimizers' states
    (a DTensor counts its local shard)."""
    def size(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    total = 0
    for obj in objects:
        if isinstance(obj, torch.optim.Optimizer):
            total += sum(size(v) for state in obj.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor))
        else:
            for p in obj.parameters():
                total += size(p) + (size(p.grad) if p.grad is not None else 0)
    return total


def unsharded(modules: list[nn.Module], rebuild) -> list[nn.Module]:
    """Gather the whole weights of sharded `modules` (every rank must call this); rank 0 gets plain models
    from `rebuild()` (same architecture, on the CPU) holding them, to save as usual. Other ranks get `modules`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    states = [get_model_state_dict(module, options=options) for module in modules]
    if dist.get_rank() != 0:
        return modules
    plain = rebuild()
    for module, state in zip(plain, states):
        module.load_state_dict(state)
    return plain


class ModelState:
    """A sharded module's state through torch.distributed.checkpoint.state_dict (DTensor shards)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, state)


class OptimizerState:
    """An optimizer's state keyed by parameter names (torch.distributed.checkpoint.state_dict), so a
    checkpoint reshards onto another number of ranks."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer, state)


class ShardedCheckpointer(Checkpointer):
    """`fewstep.core.checkpoint.Checkpointer` for sharded runs: one folder for all ranks,

        shards/              torch.distributed.checkpoint, HuggingFaceStorageWriter: each rank's DTensor shards
        rank<r>.safetensors  what each rank holds whole (its random streams, optimizer step counters, buffers)
        state.json           rank 0's skeleton of the whole state, the run's key, step and number of ranks

    Modules and optimizers go through torch.distributed.checkpoint.state_dict (ModelState, OptimizerState:
    optimizer states keyed by parameter name). Resuming on another number of ranks reshards
    the shards, takes rank 0's whole tensors, and restarts each rank's random streams from a seed derived
    from the step (the old ranks' streams do not map onto the new ones)."""

    def track(self, **objects: Any) -> None:
        for name, obj in objects.items():
            if isinstance(obj, nn.Module):
                obj = ModelState(obj)
            elif isinstance(obj, torch.optim.Optimizer):
                module = self.objects.get(name.rsplit(".", 1)[0] + ".module")
                if module is None:
                    raise ValueError(f"track {name.rsplit('.', 1)[0]}.module before its optimizer")
                obj = OptimizerState(module.module, obj)
            self.objects[name] = obj

    def save(self, step: int) -> None:
        from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

        rank, ranks = dist.get_rank(), dist.get_world_size()
        shards: dict[str, DTensor] = {}
        local: dict[str, torch.Tensor] = {}
        skeleton = {name: flatten(obj.state_dict(), local, name, shards) for name, obj in self.objects.items()}
        tmp = self.folder.with_name(self.folder.name + ".tmp")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        save(shards, storage_writer=HuggingFaceStorageWriter(str(tmp / "shards"), save_distributed=True))
        save_tensors(local, tmp / f"rank{rank}.safetensors")
        if rank == 0:
            (tmp / "state.json").write_text(json.dumps({"key": self.key, "step": step + 1, "ranks": ranks,
                                                        "state": skeleton}))
            if self.logs is not None and self.logs.exists():
                shutil.copytree(self.logs, tmp / "logs")
        dist.barrier()
        if rank == 0:
            self._swap_in(tmp)
        dist.barrier()

    def restore(self) -> int:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, load

        rank, ranks = dist.get_rank(), dist.get_world_size()
        if rank == 0:
            self._recover_swap()
        dist.barrier()
        meta = self._meta()
        if meta is None:
            return 0
        shards: dict[str, DTensor] = {}  # this run's shards, at save()'s paths: DCP loads into them in place
        for name, obj in self.objects.items():
            flatten(obj.state_dict(), {}, name, shards)
        load(shards, storage_reader=HuggingFaceStorageReader(str(self.folder / "shards")))
        same = meta["ranks"] == ranks
        local = load_tensors(self.folder / f"rank{rank if same else 0}.safetensors")
        for name, obj in self.objects.items():
            if isinstance(obj, GeneratorState) and not same:
                obj.generator.manual_seed(int(fingerprint(obj.generator.initial_seed(), meta["step"])[:15], 16))
                continue
            obj.load_state_dict(unflatten(meta["state"][name], local, shards))
        if rank == 0:
            self._restore_logs()
        print(f"[checkpoint] resuming from step {meta['step']} ({self.folder}, saved by {meta['ranks']} rank(s), "
              f"now {ranks}{'' if same else '; random streams reseeded'})", flush=True)
        return meta["step"]

    def finish(self) -> None:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
