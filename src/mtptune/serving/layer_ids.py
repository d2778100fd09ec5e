"""Which verifier layers a hidden-state server captures (`eagle_aux_hidden_state_layer_ids`, contracts a4/b6).

Ids follow vLLM: 0 = embedding output, k = residual stream after k decoder layers, N = the last layer's residual
stream before the final norm. MTP needs exactly `[N]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mtptune.checkpoint.safetensors_io import read_config_dict, resolve_model_dir
from mtptune.errors import ConfigError


def num_hidden_layers(model: str) -> int:
    """The verifier's text `num_hidden_layers` (`text_config` when the config is composite)."""
    root = resolve_model_dir(model)
    config = read_config_dict(Path(root))
    text = config.get("text_config") or config
    n = text.get("num_hidden_layers", config.get("num_hidden_layers"))
    if not isinstance(n, int) or n <= 0:
        raise ConfigError(
            f"{root / 'config.json'}: no positive num_hidden_layers (looked in text_config and top level)."
        )
    return n


def resolve_layer_ids(
    num_layers: int, target_layer_ids: Sequence[int] | None, include_last_layer: bool = True
) -> list[int]:
    """speculators' launcher rule, except that no ids means MTP's `[N]` (not the EAGLE default).

    With explicit ids, N is appended unless present or `include_last_layer` is False.
    """
    if not target_layer_ids:
        return [num_layers]
    ids = [int(i) for i in target_layer_ids]
    if include_last_layer and num_layers not in ids:
        ids.append(num_layers)
    bad = [i for i in ids if not 0 <= i <= num_layers]
    if bad:
        raise ConfigError(
            f"--target-layer-ids {bad} out of range: the verifier has {num_layers} layers, so ids must be in "
            f"0..{num_layers} (0 = embeddings, {num_layers} = last layer before the final norm)."
        )
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--target-layer-ids {ids} has duplicates.")
    return ids
