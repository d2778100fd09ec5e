"""Build an `MtpHead` from a head checkpoint or straight from a verifier's native `mtp.*` tensors."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from mtptune.checkpoint.head_checkpoint import FORMAT_NAME, HeadConfig, is_head_checkpoint, load_head_checkpoint
from mtptune.checkpoint.verifier import Verifier
from mtptune.errors import CheckpointError, MtpTuneError
from mtptune.families import MtpFamily, family_by_name
from mtptune.modeling.head import MtpHead, SharedWeights


def text_config_from_dict(body: dict) -> PretrainedConfig:
    body = dict(body)
    model_type = body.pop("model_type", None)
    if not model_type:
        raise CheckpointError("head config.json: text_config lacks model_type.")
    return AutoConfig.for_model(model_type, **body)


def head_config_for(verifier: Verifier, num_speculative_steps: int, **overrides) -> HeadConfig:
    return HeadConfig(
        family=verifier.family.name,
        verifier_name_or_path=verifier.name_or_path,
        verifier_architectures=verifier.architectures,
        verifier_model_type=verifier.config_dict.get("model_type", ""),
        num_speculative_steps=num_speculative_steps,
        text_config=verifier.text_config.to_dict(),
        **overrides,
    )


def shared_weights(
    verifier: Verifier, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> SharedWeights:
    """The verifier tensors the head shares (embedding, LM head, final norm in fp32), read from its checkpoint."""
    names = verifier.shared_names()

    def load(key: str) -> torch.Tensor:
        t = verifier.checkpoint.get(key)
        return t.to(device=device, dtype=dtype or t.dtype)

    embed = load(names.embed)
    lm_head = embed if names.lm_head == names.embed else load(names.lm_head)
    return SharedWeights(embed=embed, lm_head=lm_head, final_norm=load(names.final_norm).float())


def load_state_strict(head: MtpHead, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into the head; any missing/unexpected key or shape mismatch is an error naming the key."""
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. 'mtp.{missing[0]}')")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. 'mtp.{unexpected[0]}')")
        raise CheckpointError(f"{source}: head tensors do not match the {head.family.name} layout: {', '.join(parts)}.")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: tensor 'mtp.{key}' has shape {tuple(value.shape)}, the verifier's config needs "
                f"{tuple(expected[key].shape)} (head and verifier do not fit: different hidden size?)."
            )
    head.load_state_dict(state, strict=True)


def build_head(family: MtpFamily, text_config: PretrainedConfig, dtype: torch.dtype) -> MtpHead:
    """An uninitialised head (parameters are loaded right after), built on the meta device to skip random init."""
    with torch.device("meta"):
        head = MtpHead(family, text_config)
    head = head.to_empty(device="cpu")
    # to_empty leaves buffers uninitialised too: rebuild the rotary inv_freq buffers for real.
    head.rotary_emb = family.build_rotary(head.layer_config)
    return head.to(dtype)


def load_head(
    source: str | os.PathLike,
    verifier: Verifier | str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    shared_dtype: torch.dtype | None = None,
) -> tuple[MtpHead, HeadConfig, Verifier]:
    """Load a head from a head checkpoint folder or from a verifier's native head.

    Returns the head (with the verifier's shared embed/lm_head/final norm attached and frozen), its config,
    and the verifier it belongs to.
    """
    source = str(source)
    if is_head_checkpoint(Path(source)):  # mtptune's own format or a speculators MTP folder
        config, state = load_head_checkpoint(source)
        if verifier is None:
            if not config.verifier_name_or_path:
                raise CheckpointError(
                    f"{source} does not name its verifier; pass the verifier explicitly (--verifier)."
                )
            verifier = config.verifier_name_or_path
        verifier = verifier if isinstance(verifier, Verifier) else Verifier.open(verifier)
        verifier.check_fits(config, source)
        family = family_by_name(config.family)
        text_config = text_config_from_dict(config.text_config)
    else:
        if verifier is None:
            verifier = _open_source_verifier(source)
        verifier = verifier if isinstance(verifier, Verifier) else Verifier.open(verifier)
        if Path(source).resolve() != verifier.root.resolve():
            _open_source_verifier(source)
        family = verifier.family
        text_config = verifier.text_config
        state = verifier.native_head_state()
        config = head_config_for(verifier, num_speculative_steps=max(1, family.num_mtp_layers(text_config)))
    head = build_head(family, text_config, dtype)
    target = head.state_dict()  # fp32 buffers (family.fp32_buffers) keep their dtype
    load_state_strict(head, {k: v.to(target[k].dtype if k in target else dtype) for k, v in state.items()}, source)
    head.set_shared(shared_weights(verifier, dtype=shared_dtype or dtype))
    return head.to(device), config, verifier


def _open_source_verifier(source: str) -> Verifier:
    """A head source that is not a head checkpoint must be a verifier with a native head; say what it is not."""
    try:
        return Verifier.open(source)
    except MtpTuneError as exc:
        raise CheckpointError(
            f'{source} is not a head checkpoint: neither mtptune\'s (config.json "format": "{FORMAT_NAME}") nor '
            f'speculators\' MTP format ("speculators_model_type": "mtp"), and not a verifier with a native MTP head '
            f"({exc}). --from-pretrained / evaluate / stitch need one of these (create one with `mtptune convert`)."
        ) from exc
