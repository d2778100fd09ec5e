"""Lazy, key-level access to (possibly sharded) safetensors checkpoints.

Never loads a whole checkpoint: a 20 GB verifier is opened shard by shard and only the requested
tensors are read, so `convert` and the trainer's frozen embed/lm_head loading stay cheap.

Every safetensors file mtptune reads is opened here (`open_safetensors`), so a truncated or corrupt file (an
interrupted download) is one clear error naming the file in every command, never a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mtptune.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
}
SINGLE_NAME = "model.safetensors"


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder as-is; otherwise a hub id resolved from the local HF cache (never downloads in tests/CI).

    Set MTPTUNE_ALLOW_DOWNLOAD=1 to let huggingface_hub fetch a missing repo. Built-in names (`smollm2`) resolve
    to a transformers folder built once from an offline package (`builtin_models`).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from mtptune.checkpoint.builtin_models import builtin_model_dir, is_builtin_model

    if is_builtin_model(str(name_or_path)) and not path.exists():
        return builtin_model_dir(str(name_or_path))
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a model folder holding config.json and safetensors.")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"model folder {name!r} does not exist (and is not a hub id like 'Qwen/Qwen3.5-9B').")
    from huggingface_hub import snapshot_download

    allow = os.environ.get("MTPTUNE_ALLOW_DOWNLOAD") == "1"
    try:
        return Path(snapshot_download(name, local_files_only=not allow))
    except Exception as exc:  # huggingface_hub raises several types here
        hint = "" if allow else " (not in the local HF cache; set MTPTUNE_ALLOW_DOWNLOAD=1 to download it)"
        raise CheckpointError(f"cannot resolve model {name!r}{hint}: {exc}") from exc


def read_config_dict(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a model folder needs config.json.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def open_safetensors(path: Path):
    """A `safe_open` handle on `path`; its header is checked against the file's size, so a truncated file fails here."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); truncated or corrupt, e.g. an interrupted download? "
            "Download (or write) it again."
        ) from exc


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (small files only: a head checkpoint)."""
    handle = open_safetensors(path)
    return {key: _read(handle, key, path) for key in handle.keys()}


def _read(handle, key: str, path: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read tensor {key!r} ({exc}); the file is corrupt.") from exc


def check_model_files(root: Path) -> None:
    """Open every safetensors file a model folder's index names (or its single model.safetensors), so a truncated
    shard is reported by name before a loader (transformers) trips over it."""
    if (root / INDEX_NAME).is_file() or (root / SINGLE_NAME).is_file():
        SafetensorsCheckpoint.open(root)


@dataclass
class SafetensorsCheckpoint:
    """The tensors of one model folder, addressed by name, read on demand."""

    root: Path
    weight_map: dict[str, str]  # tensor name -> shard file name (relative to root)
    index: dict | None = None  # parsed index json when sharded
    _handles: dict[str, object] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root: str | os.PathLike) -> SafetensorsCheckpoint:
        root = Path(root)
        index_path = root / INDEX_NAME
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
                weight_map = dict(index["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path} is malformed (need a 'weight_map' object): {exc}") from exc
            for shard in sorted(set(weight_map.values())):
                if not (root / shard).is_file():
                    raise CheckpointError(f"{index_path} names shard {shard!r}, which is missing from {root}.")
            ckpt = cls(root=root, weight_map=weight_map, index=index)
            for shard in ckpt.shards():  # headers only: a truncated shard fails now, not halfway through a command
                ckpt._handle(shard)
            return ckpt
        single = root / SINGLE_NAME
        if single.is_file():
            handle = open_safetensors(single)
            return cls(root=root, weight_map=dict.fromkeys(handle.keys(), SINGLE_NAME), _handles={SINGLE_NAME: handle})
        raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {root}: not a safetensors model folder.")

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = open_safetensors(self.root / shard)
        return self._handles[shard]

    def get(self, key: str) -> torch.Tensor:
        shard = self.weight_map.get(key)
        if shard is None:
            raise CheckpointError(f"tensor {key!r} not found in {self.root}.")
        return _read(self._handle(shard), key, self.root / shard)

    def get_many(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in keys}

    def shape(self, key: str) -> tuple[int, ...]:
        shard = self.weight_map.get(key)
        if shard is None:
            raise CheckpointError(f"tensor {key!r} not found in {self.root}.")
        return tuple(self._handle(shard).get_slice(key).get_shape())

    def dtype_name(self, key: str) -> str:
        """torch's name for a tensor's dtype ('bfloat16'), from the header alone."""
        shard = self.weight_map.get(key)
        if shard is None:
            raise CheckpointError(f"tensor {key!r} not found in {self.root}.")
        code = self._handle(shard).get_slice(key).get_dtype()
        return _DTYPE_NAMES.get(code, code.lower())
