"""Reading what the head needs from a verifier folder: its config, family, shared tensors and native head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from mtptune.checkpoint.head_config import HeadConfig
from mtptune.checkpoint.safetensors_io import (
    SafetensorsCheckpoint,
    check_model_files,
    read_config_dict,
    resolve_model_dir,
)
from mtptune.errors import CheckpointError, FamilyError
from mtptune.families import MtpFamily, SharedTensorNames, family_for_model_type


@dataclass
class Verifier:
    name_or_path: str
    root: Path
    config: PretrainedConfig
    config_dict: dict
    family: MtpFamily
    checkpoint: SafetensorsCheckpoint

    @classmethod
    def open(cls, name_or_path: str) -> Verifier:
        root = resolve_model_dir(name_or_path)
        config_dict = read_config_dict(root)
        model_type = config_dict.get("model_type")
        if not model_type:
            raise CheckpointError(f"{root / 'config.json'} has no model_type.")
        family = family_for_model_type(model_type)
        try:
            config = family.load_config(root, config_dict)
        except Exception as exc:
            raise CheckpointError(f"transformers cannot read {root / 'config.json'}: {exc}") from exc
        return cls(str(name_or_path), root, config, config_dict, family, SafetensorsCheckpoint.open(root))

    @property
    def text_config(self) -> PretrainedConfig:
        return self.family.text_config(self.config)

    @property
    def architectures(self) -> list[str]:
        return list(self.config_dict.get("architectures") or [])

    def head_keys(self) -> list[str]:
        """Every MTP tensor of the verifier, frozen copies (`family.is_frozen_head_key`) included."""
        text_config = self.text_config
        return [k for k in self.checkpoint.keys() if self.family.is_head_key(k, text_config)]

    def trainable_head_keys(self) -> list[str]:
        """The MTP tensors the head owns: what convert extracts and stitch replaces."""
        return [k for k in self.head_keys() if not self.family.is_frozen_head_key(k)]

    def shared_names(self) -> SharedTensorNames:
        return self.family.shared_tensor_names(self.checkpoint.weight_map, self.text_config, self.root)

    def check_fits(self, config: HeadConfig, source: object) -> None:
        """The one check that the head checkpoint `source` (config `config`) belongs to this verifier: same family,
        hidden size and vocabulary. train, evaluate and stitch all refuse a head with this message."""
        if config.family != self.family.name:
            raise CheckpointError(
                f"head {source} is a {config.family} head but verifier {self.root} is a {self.family.name} verifier "
                f"(the head was made for {config.verifier_name_or_path or 'an unnamed verifier'})."
            )
        for name in ("hidden_size", "vocab_size"):
            mine, theirs = config.text_config.get(name), getattr(self.text_config, name)
            if mine != theirs:
                raise CheckpointError(
                    f"head {source} has {name} {mine} but verifier {self.root} has {theirs}: this head does not fit "
                    f"this verifier (it was made for {config.verifier_name_or_path or 'another verifier'})."
                )

    def native_head_state(self) -> dict[str, torch.Tensor]:
        keys = self.trainable_head_keys()
        if not keys:
            raise CheckpointError(
                f"{self.root}: no tensor starts with 'mtp.' — this verifier has no native MTP head. "
                "Use `mtptune convert --init fresh` to attach a new one."
            )
        return self.family.native_to_head(self.checkpoint.get_many(keys))


def _family_config(root: Path, config_dict: dict) -> PretrainedConfig | None:
    """The config a family supplies itself (MiMo: model_type transformers lacks); None = let transformers read it."""
    try:
        family = family_for_model_type(config_dict.get("model_type", ""))
    except FamilyError:
        return None
    if type(family).load_config is MtpFamily.load_config:
        return None
    return family.load_config(root, config_dict)


def load_causal_lm(
    name_or_path: str | Path, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The verifier as a transformers causal LM (text-only: a Qwen3.5 ConditionalGeneration checkpoint loads as
    *ForCausalLM without the vision tower). Families whose model_type transformers lacks (MiMo) supply the
    config; any other causal LM loads as usual."""
    from transformers import AutoModelForCausalLM

    root = resolve_model_dir(name_or_path)
    check_model_files(root)  # a truncated shard: one line naming it, not transformers' traceback
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if (config := _family_config(root, read_config_dict(root))) is not None:
        kwargs["config"] = config
    try:
        return AutoModelForCausalLM.from_pretrained(root, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"transformers cannot load the verifier {name_or_path!r} from {root}: {exc}") from exc


def build_random_causal_lm(
    name_or_path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """The causal LM `load_causal_lm` would return, with random weights and from config.json alone (vLLM's
    `--load-format dummy`): safetensors are never opened, so a folder holding only config.json (or a config plus
    a few shards) works. Parameters are created directly on `device` in `dtype` (`auto`/None: the checkpoint's
    declared dtype, else float32), so a 9B model initialises on a GPU in seconds with no CPU copy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = resolve_model_dir(name_or_path)
    config = _family_config(root, read_config_dict(root))
    try:
        if config is None:
            config = AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"transformers cannot read {root / 'config.json'}: {exc}") from exc
    if dtype in (None, "auto"):
        declared = getattr(config.get_text_config(), "dtype", None) or getattr(config, "dtype", None)
        dtype = getattr(torch, declared) if isinstance(declared, str) else declared
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
            )
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"transformers cannot build a causal LM from {root / 'config.json'}: {exc}") from exc
    return model.eval()
