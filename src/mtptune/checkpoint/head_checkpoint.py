"""mtptune's head checkpoint: `config.json` + `model.safetensors` holding only the head (`mtp.*` names, experts
fused as in memory). Written by `convert` and by the trainer; read by `--from-pretrained`, `stitch`, `evaluate`.
Those readers also accept speculators' MTP folders (`checkpoint/speculators_format.py`), detected from config.json.

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place last, so a crash
never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtptune import __version__
from mtptune.errors import CheckpointError

FORMAT_NAME = "mtptune-mtp-head"
FORMAT_VERSION = 1
HEAD_PREFIX = "mtp."


@dataclass(frozen=True)
class HeadConfig:
    family: str
    verifier_name_or_path: str
    verifier_architectures: list[str]
    verifier_model_type: str
    num_speculative_steps: int
    text_config: dict  # the verifier's text config (to_dict), which builds the decoder block
    mtp_input_norm: str = "post_norm"  # what the head was trained on: verifier post-norm states, or "none"
    init: str = "native"  # native head extracted from the verifier, or how a fresh head was initialised
    dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        body = asdict(self)
        body = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "mtptune_version": __version__, **body}
        return body

    @classmethod
    def from_json(cls, body: dict, source: Path) -> HeadConfig:
        if body.get("format") != FORMAT_NAME:
            raise CheckpointError(
                f'{source} is not an mtptune head checkpoint (config.json has no "format": "{FORMAT_NAME}") nor a '
                'speculators MTP checkpoint (no "speculators_model_type": "mtp"). Create one with `mtptune convert`, '
                "or point at a training checkpoint folder."
            )
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in body.items() if k in known})
        except TypeError as exc:
            raise CheckpointError(f"{source}: config.json lacks a field: {exc}") from exc


def is_head_checkpoint(path: Path) -> bool:
    """True for a head checkpoint in mtptune's format or speculators' MTP format (not for a verifier)."""
    return is_mtptune_head_checkpoint(path) or _speculators().is_speculators_checkpoint(path)


def is_mtptune_head_checkpoint(path: Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        body = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(body, dict) and body.get("format") == FORMAT_NAME


def _speculators():
    # Imported lazily: speculators_format builds on HeadConfig from this module.
    from mtptune.checkpoint import speculators_format

    return speculators_format


def save_head_checkpoint(
    path: str | os.PathLike,
    config: HeadConfig,
    head_state: dict[str, torch.Tensor],
    extra_files: dict[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `path/config.json` + `path/model.safetensors` (+ torch.save'd extras) atomically."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; pass --overwrite (or choose another --output-path).")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        dtype = getattr(torch, config.dtype)
        tensors = {
            HEAD_PREFIX + k: v.detach().to("cpu", v.dtype if _keeps_fp32(config.family, k) else dtype).contiguous()
            for k, v in head_state.items()
        }
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", "producer": "mtptune"})
        for name, obj in (extra_files or {}).items():
            if name.endswith(".json"):
                (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
            else:
                torch.save(obj, tmp / name)
        # config.json last: its presence marks the folder complete.
        (tmp / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it 0700
        # Move the old folder aside before the new one takes its name, and delete it only afterwards: deleting
        # in place could leave a half-deleted folder that still has config.json (looks complete) after a crash.
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {exc} (disk full or not writable?)") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _keeps_fp32(family_name: str, key: str) -> bool:
    """Buffers the family keeps fp32 (e.g. DeepSeek's router bias) are saved in their own dtype."""
    from mtptune.families import FAMILIES  # families import checkpoint I/O: import late

    family = FAMILIES.get(family_name)
    return family is not None and key.rsplit(".", 1)[-1] in family.fp32_buffers


def load_head_checkpoint(path: str | os.PathLike) -> tuple[HeadConfig, dict[str, torch.Tensor]]:
    """(config, head state dict without the `mtp.` prefix) from an mtptune or a speculators MTP checkpoint."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json: not an mtptune head checkpoint.")
    if _speculators().speculators_model_type(path) is not None:
        return _speculators().load_speculators_checkpoint(path)
    try:
        body = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    config = HeadConfig.from_json(body, path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has config.json but no model.safetensors (an incomplete checkpoint?).")
    tensors = load_file(weights)
    stray = [k for k in tensors if not k.startswith(HEAD_PREFIX)]
    if stray:
        raise CheckpointError(f"{weights}: unexpected tensor {stray[0]!r} (a head checkpoint holds only mtp.*).")
    return config, {k[len(HEAD_PREFIX) :]: v for k, v in tensors.items()}
