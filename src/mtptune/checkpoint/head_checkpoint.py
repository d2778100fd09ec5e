"""mtptune's head checkpoint: `config.json` + `model.safetensors` holding only the head (`mtp.*` names, experts
fused as in memory). Written by `convert` and by the trainer; read by `--from-pretrained`, `stitch`, `evaluate`.
Those readers also accept speculators' MTP folders (`checkpoint/speculators_format.py`), detected from config.json:
`read_head_config` and `load_head_checkpoint` are the one way to read either format.

Writes go through `files.atomic_folder`, so a crash never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from mtptune.checkpoint import speculators_format as speculators
from mtptune.checkpoint.files import atomic_folder, json_text
from mtptune.checkpoint.head_config import FORMAT_NAME, HeadConfig
from mtptune.checkpoint.safetensors_io import load_safetensors
from mtptune.errors import CheckpointError
from mtptune.families import FAMILIES

HEAD_PREFIX = "mtp."


def is_head_checkpoint(path: Path) -> bool:
    """True for a head checkpoint in mtptune's format or speculators' MTP format (not for a verifier)."""
    return is_mtptune_head_checkpoint(path) or speculators.is_speculators_checkpoint(path)


def is_mtptune_head_checkpoint(path: Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        body = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(body, dict) and body.get("format") == FORMAT_NAME


def read_head_config(path: str | os.PathLike) -> HeadConfig:
    """The config of a head checkpoint in either format, weights unread. K is `.num_speculative_steps`: the one
    place any command reads it from a checkpoint (a checkpoint without it is an error naming the field)."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json: not an mtptune head checkpoint.")
    if speculators.speculators_model_type(path) is not None:
        return speculators.read_speculators_config(path)
    try:
        body = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise CheckpointError(f"{config_path} is not a JSON object.")
    return HeadConfig.from_json(body, path)


def load_head_checkpoint(path: str | os.PathLike) -> tuple[HeadConfig, dict[str, torch.Tensor]]:
    """(config, head state dict without the `mtp.` prefix) from an mtptune or a speculators MTP checkpoint."""
    path = Path(path)
    if speculators.speculators_model_type(path) is not None:
        return speculators.load_speculators_checkpoint(path)
    config = read_head_config(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has config.json but no model.safetensors (an incomplete checkpoint?).")
    tensors = load_safetensors(weights)
    stray = [k for k in tensors if not k.startswith(HEAD_PREFIX)]
    if stray:
        raise CheckpointError(f"{weights}: unexpected tensor {stray[0]!r} (a head checkpoint holds only mtp.*).")
    return config, {k[len(HEAD_PREFIX) :]: v for k, v in tensors.items()}


def save_head_checkpoint(
    path: str | os.PathLike,
    config: HeadConfig,
    head_state: dict[str, torch.Tensor],
    extra_files: dict[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `path/config.json` + `path/model.safetensors` (+ JSON or torch.save'd extras) atomically."""
    path = Path(path)
    dtype = getattr(torch, config.dtype)
    fp32 = FAMILIES[config.family].fp32_buffers if config.family in FAMILIES else ()

    def write_weights(tmp: Path) -> None:
        # Buffers the family keeps fp32 (e.g. DeepSeek's router bias) are saved in their own dtype.
        tensors = {
            HEAD_PREFIX + k: v.detach().to("cpu", v.dtype if k.rsplit(".", 1)[-1] in fp32 else dtype).contiguous()
            for k, v in head_state.items()
        }
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", "producer": "mtptune"})

    def write_extra(file: Path, obj: object) -> None:
        if file.name.endswith(".json"):
            file.write_text(json_text(obj))
        else:
            torch.save(obj, file)

    with atomic_folder(path, overwrite=overwrite, what="checkpoint") as tmp:
        # The files side by side: a training checkpoint's master weights and optimizer state are GBs, and their
        # serialisation releases the GIL. Leaving the `with` waits for every write; the first error is raised.
        with ThreadPoolExecutor(max_workers=1 + len(extra_files or {})) as pool:
            writes = [pool.submit(write_weights, tmp)]
            writes += [pool.submit(write_extra, tmp / name, obj) for name, obj in (extra_files or {}).items()]
        for done in writes:
            done.result()
        (tmp / "config.json").write_text(json_text(config.to_json()))  # last: its presence marks the folder complete
    return path
