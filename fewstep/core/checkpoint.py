"""Resumable training checkpoints: every stateful object of a training run (modules, optimizers, LR
schedulers, EMA, random generators, the data order) saved atomically as safetensors + JSON — no pickle.

Checkpoints live outside the stage's DVC output (under .fewstep/checkpoints/<stage>/), so dvc.lock only
ever records finished outputs. Each carries a fingerprint of the run's params and inputs: a checkpoint
from other params or other upstream outputs is never resumed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.distributed.tensor import DTensor

from fewstep.io import ArtifactError, load_tensors, save_tensors

# Relative to the project root (where dvc runs stages); ignored by git and DVC.
CHECKPOINTS = Path(os.environ.get("FEWSTEP_CHECKPOINT_DIR", ".fewstep/checkpoints"))


class GeneratorState:
    """Adapts a torch.Generator to the state_dict protocol."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


def flatten(value: Any, tensors: dict[str, torch.Tensor], path: str, shards: dict | None = None) -> Any:
    """JSON skeleton of a nested state; tensors are replaced by references into `tensors` and, given `shards`
    (a sharded checkpoint), DTensors by references into `shards`, which torch.distributed.checkpoint writes."""
    if shards is not None and isinstance(value, DTensor):
        shards[path] = value
        return {"__dtensor__": path}
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: flatten(v, tensors, f"{path}.{k}", shards) for k, v in value.items()}
        return {"__items__": [[k, flatten(v, tensors, f"{path}.{k}", shards)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [flatten(v, tensors, f"{path}.{i}", shards) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__} at {path}")


def unflatten(value: Any, tensors: dict[str, torch.Tensor], shards: dict | None = None) -> Any:
    """The nested state `flatten` made the skeleton of, its references filled in."""
    if isinstance(value, dict):
        if "__dtensor__" in value:
            return shards[value["__dtensor__"]]
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {k: unflatten(v, tensors, shards) for k, v in value["__items__"]}
        return {k: unflatten(v, tensors, shards) for k, v in value.items()}
    if isinstance(value, list):
        return [unflatten(v, tensors, shards) for v in value]
    return value


def fingerprint(*parts: Any) -> str:
    """xxh3-128 of JSON-able parts (params sections, input manifests)."""
    return xxhash.xxh3_128(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Checkpointer:
    """Saves {name: object with state_dict()/load_state_dict()} plus a folder of logs every `every` steps."""

    def __init__(self, folder: Path, every: int, key: str, logs: Path | None = None):
        self.folder, self.every, self.key, self.logs = Path(folder), every, key, logs
        self.objects: dict[str, Any] = {}

    def track(self, **objects: Any) -> None:
        self.objects.update(objects)

    def due(self, step: int, steps: int) -> bool:
        return bool(self.every) and (step + 1) % self.every == 0 and step + 1 < steps

    def save(self, step: int) -> None:
        """Write to a temporary sibling, then swap it in."""
        tensors: dict[str, torch.Tensor] = {}
        skeleton = {name: flatten(obj.state_dict(), tensors, name) for name, obj in self.objects.items()}
        tmp = self.folder.with_name(self.folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_tensors(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps({"key": self.key, "step": step + 1, "state": skeleton}))
        if self.logs is not None and self.logs.exists():
            shutil.copytree(self.logs, tmp / "logs")
        self._swap_in(tmp)

    def _swap_in(self, tmp: Path) -> None:
        """Replace the checkpoint folder by `tmp`: a kill at any moment leaves one complete checkpoint."""
        old = self.folder.with_name(self.folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.folder.exists():
            os.replace(self.folder, old)
        os.replace(tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)

    def _recover_swap(self) -> None:
        old = self.folder.with_name(self.folder.name + ".old")
        if not self.folder.is_dir() and old.is_dir():
            os.replace(old, self.folder)  # killed mid-swap

    def _meta(self) -> dict | None:
        """state.json of this very run's last checkpoint (same key), else None."""
        meta_file = self.folder / "state.json"
        if not meta_file.is_file():
            return None
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            raise ArtifactError(f"{meta_file}: damaged checkpoint (delete {self.folder} to start over)") from None
        if meta.get("key") != self.key:
            print(f"[checkpoint] {self.folder} belongs to other params or inputs; starting fresh", flush=True)
            return None
        return meta

    def _restore_logs(self) -> None:
        if self.logs is not None and (self.folder / "logs").is_dir():
            shutil.rmtree(self.logs, ignore_errors=True)
            shutil.copytree(self.folder / "logs", self.logs)

    def restore(self) -> int:
        """Load the last checkpoint of this very run (same key); returns the step to continue from."""
        self._recover_swap()
        meta = self._meta()
        if meta is None:
            return 0
        tensors = load_tensors(self.folder / "state.safetensors")
        for name, obj in self.objects.items():
            obj.load_state_dict(unflatten(meta["state"][name], tensors))
        self._restore_logs()
        print(f"[checkpoint] resuming from step {meta['step']} ({self.folder})", flush=True)
        return meta["step"]

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
