"""Initial weights for a new MTP head (`mtptune convert --init`), for verifiers without one (Llama / SmolLM2) or
to restart a native head from scratch.

Methods
* `random`: every projection ~ N(0, initializer_range) (the verifier's own init scale), every norm the identity
  (`w = 1` Llama-style, `w = 0` zero-centred), biases 0.
* `copy-last-layer`: the block is a copy of the verifier's last full-attention decoder layer, the output `norm` a
  copy of its final norm, so the untrained head maps its input through the same last computation as the trunk;
  `fc = [εR | I]` (hidden half the identity, embedding half N(0, initializer_range)), input norms the identity.
  Step 0 then starts as "run the last layer once more on h_t" and training learns how much of E[x_{t+1}] to mix in.
* `fresh`: the default, whichever of the two trains better on SmolLM2 / GSM8K: `random` (docs/results.md: same data,
  loss and steps, held-out GSM8K tau_sim at K=3 1.67 vs 1.60 for `copy-last-layer`, and 1.70 vs 1.60 on the
  training run's validation rows; untrained, both give AL 1.0). The copied last layer starts from a map that
  predicts the token after x_t, not after x_{t+1}, and has to be unlearned first.
"""

from __future__ import annotations

import torch
from torch import nn

from mtptune.checkpoint.verifier import Verifier
from mtptune.errors import CheckpointError, ConfigError
from mtptune.families.moe_experts import fuse_experts
from mtptune.modeling.head import MtpHead

INIT_METHODS = ("fresh", "copy-last-layer", "random")
DEFAULT_FRESH = "random"


def resolve_init(init: str) -> str:
    if init not in INIT_METHODS:
        raise ConfigError(f"--init {init!r} is not supported; choose one of {', '.join(INIT_METHODS)}.")
    return DEFAULT_FRESH if init == "fresh" else init


def fresh_head_state(verifier: Verifier, init: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A new head's state dict (fp32, head names without `mtp.`) for `verifier`, initialised by `init`."""
    method = resolve_init(init)
    family, text_config = verifier.family, verifier.text_config
    generator = torch.Generator().manual_seed(seed)
    head = MtpHead(family, text_config)
    std = float(getattr(text_config, "initializer_range", 0.02) or 0.02)
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
        identity = 0.0 if family.zero_centered_norms else 1.0
        for name, param in head.named_parameters():
            if param.ndim == 1 and name.endswith("weight"):  # RMSNorm weights
                param.fill_(identity)
        if method == "copy-last-layer":
            _copy_last_layer(head, verifier)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def _copy_last_layer(head: MtpHead, verifier: Verifier) -> None:
    text_config = verifier.text_config
    index = verifier.family.full_attention_layer_index(text_config)
    marker = f"layers.{index}.input_layernorm.weight"
    found = [
        k for k in verifier.checkpoint.keys() if k.endswith(marker) and not verifier.family.is_head_key(k, text_config)
    ]
    if len(found) != 1:
        raise CheckpointError(f"{verifier.root}: cannot find decoder layer {index} (looked for '*{marker}').")
    prefix = found[0][: -len("input_layernorm.weight")]
    layer = fuse_experts(
        {
            k[len(prefix) :]: v
            for k, v in verifier.checkpoint.get_many(
                k for k in verifier.checkpoint.keys() if k.startswith(prefix)
            ).items()
        }
    )
    target = head.layers[0].state_dict()
    missing, unexpected = sorted(set(target) - set(layer)), sorted(set(layer) - set(target))
    if missing or unexpected:
        raise CheckpointError(
            f"{verifier.root}: layer {prefix!r} does not fit the head's block "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})."
        )
    head.layers[0].load_state_dict({k: v.to(target[k].dtype) for k, v in layer.items()})
    final_norm = verifier.checkpoint.get(verifier.shared_names().final_norm)
    head.norm.weight.copy_(final_norm.to(head.norm.weight.dtype))
    hidden = head.hidden_size
    head.fc.weight[:, hidden:].copy_(torch.eye(hidden))
    if verifier.family.concat_order == "hidden_first":  # the identity goes on the hidden half wherever it sits
        head.fc.weight.copy_(head.fc.weight.roll(hidden, dims=1))
