"""Artifact I/O: safetensors tensors, JSON metadata, modules saved as weights + config. Never pickles.
Atomic outputs are fewstep.files' (torch-free, for the pipeline machinery too)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file



class ArtifactError(RuntimeError):
    """A missing or unreadable input artifact, phrased as one line naming the file."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors can run to many lines)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)


def load_tensors(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found (did the upstream stage run?)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ArtifactError(f"{path}: missing tensors {missing}, found {sorted(tensors)}")
    return tensors


def tensor_shapes(path: str | Path) -> dict[str, list[int]]:
    """{name: shape} from a safetensors file's header, without reading the tensors. safetensors checks that
    the header covers the whole file, so a truncated or garbage file fails here with one line."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found (did the upstream stage run?)")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None


def save_shard(tensors: dict[str, torch.Tensor], folder: Path, split: str, shards: list[dict]) -> None:
    """Write the next shard of a split, <split>-NNNNN.safetensors (aligned rows of every tensor), and add its
    {file, count} entry to `shards`, the split's list in index.json."""
    name = f"{split}-{len(shards):05d}.safetensors"
    save_tensors(tensors, folder / name)
    shards.append({"file": name, "count": len(next(iter(tensors.values())))})


def write_shards(folder: Path, split: str, columns: dict[str, torch.Tensor], shard_size: int,
                 dtype: torch.dtype) -> list[dict]:
    """Aligned rows of `columns`, as `dtype`, in shards of `shard_size`; returns the split's shard list."""
    shards: list[dict] = []
    for start in range(0, len(next(iter(columns.values()))), shard_size):
        save_shard({k: v[start:start + shard_size].to(dtype) for k, v in columns.items()}, folder, split, shards)
    return shards


def load_trajectories(folder: str | Path, split: str = "train", states: bool = False) -> dict:
    """One split of the trajectories stage's output, its shards concatenated after checking them against
    index.json: every listed shard holds `count` samples of each tensor, the counts add up to the split's
    num_samples, and no shard file of the split in the folder is left out of the index. Returns noise,
    cond_index, samples (and the ODE states with `states`) plus "index": the parsed index.json."""
    folder = Path(folder)
    index_file = folder / "index.json"
    index = read_json(index_file)
    entry = index.get(split) if isinstance(index, dict) else None
    if not isinstance(entry, dict):
        found = sorted(k for k, v in index.items() if isinstance(v, dict)) if isinstance(index, dict) else []
        raise ArtifactError(f"{index_file}: no {split!r} split (found {found})")
    if states and not index.get("keep_states"):
        raise ArtifactError(f"{index_file}: holds no ODE states (set trajectories.keep_states: true; the "
                            f"consistency objective trains on them)")
    keys = ("noise", "cond_index", "samples") + (("states",) if states else ())
    shards = entry.get("shards")
    if not isinstance(shards, list) or not shards or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("count"), int) for s in shards):
        raise ArtifactError(f"{index_file}: {split}.shards must be a non-empty list of {{file, count}} entries")
    listed = [s["file"] for s in shards]
    for name in listed:
        if Path(name).name != name:
            raise ArtifactError(f"{index_file}: shard {name!r} must be a file name inside {folder}")
    unlisted = sorted(p.name for p in folder.glob(f"{split}-*.safetensors") if p.name not in listed)
    if unlisted:
        raise ArtifactError(f"{index_file}: does not list {unlisted[0]} (found {len(unlisted)} unlisted shard files)")
    total = sum(s["count"] for s in shards)
    if total != entry.get("num_samples"):
        raise ArtifactError(f"{index_file}: {split} shards hold {total} samples, num_samples says "
                            f"{entry.get('num_samples')!r}")
    for s in shards:
        shapes = tensor_shapes(folder / s["file"])
        for key in keys:
            if key not in shapes:
                raise ArtifactError(f"{folder / s['file']}: missing tensors [{key!r}], found {sorted(shapes)}")
            if not shapes[key] or shapes[key][0] != s["count"]:
                raise ArtifactError(f"{folder / s['file']}: {key} holds {(shapes[key] or [0])[0]} samples, "
                                    f"{index_file} says {s['count']}")
    parts = [load_tensors(folder / s["file"], required=keys) for s in shards]
    return {k: torch.cat([p[k] for p in parts]) for k in keys} | {"index": index}


def write_json(obj, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None


class ConfiguredModule(nn.Module):
    """A module rebuilt from its constructor arguments (`self.config`) plus safetensors weights."""

    file_stem: str

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        save_tensors(self.state_dict(), path / f"{self.file_stem}.safetensors")
        write_json(self.config, path / f"{self.file_stem}.json")

    @classmethod
    def load(cls, path: Path):
        model = _from_config(cls, path / f"{cls.file_stem}.json")
        _load_state(model, path / f"{cls.file_stem}.safetensors")
        return model


def _from_config(cls, file: Path):
    config = read_json(file)
    try:
        return cls(**config)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{file}: not a {cls.__name__} config ({first_line(exc)})") from None


def _load_state(model: nn.Module, file: Path) -> None:
    """Load safetensors weights into `model`, naming the first key or shape that does not fit."""
    state = load_tensors(file)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ArtifactError(f"{file}: weights do not fit the model ({what}; "
                            f"{len(missing)} missing, {len(unexpected)} unexpected keys)")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise ArtifactError(f"{file}: weights do not fit the model ({key} has shape {list(state[key].shape)}, "
                                f"expected {list(tensor.shape)})")
    model.load_state_dict(state)
