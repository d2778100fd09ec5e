"""The hidden-state contract: what a server captures, how a file says so, and which tensor the MTP head reads.

Layer ids follow vLLM (`eagle_aux_hidden_state_layer_ids`; docs/contracts.md, "Layer ids"): 0 = the embedding
output, k = the residual stream after k decoder layers, N = the last layer's residual stream *before* the final
norm. MTP reads layer N: the server returns r_t and the trainer computes h_t = FinalNorm(r_t) itself
(`MtpHead.residual_to_inputs`). `serve` and `train` resolve `--target-layer-ids` with the same rule
(`capture_spec`), the built-in server writes the spec into every file's metadata, and readers check it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mtptune.checkpoint.safetensors_io import read_config_dict, resolve_model_dir
from mtptune.errors import ConfigError

# safetensors metadata keys of a hidden-state file written by mtptune's server (vLLM writes none).
META_LAYER_IDS = "mtptune_layer_ids"
META_NUM_LAYERS = "mtptune_num_layers"


def verifier_num_layers(config: Mapping, where: str = "config.json") -> int:
    """N: the verifier's text `num_hidden_layers` (under `text_config` when the config is composite)."""
    text = config.get("text_config") or config
    n = text.get("num_hidden_layers", config.get("num_hidden_layers"))
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ConfigError(f"{where}: no positive num_hidden_layers (looked in text_config and at the top level).")
    return n


@dataclass(frozen=True)
class CaptureSpec:
    """The layers a hidden-state server captures, in file order (axis 1 of `hidden_states [T, n, H]`)."""

    layer_ids: tuple[int, ...]
    num_layers: int  # N

    @property
    def mtp_index(self) -> int:
        """Where layer N (the MTP input) sits on the file's layer axis."""
        return self.layer_ids.index(self.num_layers)

    def to_metadata(self) -> dict[str, str]:
        return {META_LAYER_IDS: ",".join(map(str, self.layer_ids)), META_NUM_LAYERS: str(self.num_layers)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None) -> CaptureSpec | None:
        """The spec a file declares, or None for a file without one (vLLM's)."""
        if not metadata or META_LAYER_IDS not in metadata:
            return None
        try:
            ids = tuple(int(i) for i in metadata[META_LAYER_IDS].split(","))
            return cls(ids, int(metadata[META_NUM_LAYERS]))
        except (KeyError, ValueError):
            return None

    def describe(self) -> str:
        return f"layers {list(self.layer_ids)} of N={self.num_layers}"


def capture_spec(
    num_layers: int, target_layer_ids: Sequence[int] | None = None, include_last_layer: bool = True
) -> CaptureSpec:
    """`--target-layer-ids` as both `serve` and `train` read it (speculators' launcher rule): no ids = `[N]`; with
    ids, N is appended unless present. MTP needs N, so a list without it (`--no-include-last-layer`) is an error."""
    if not target_layer_ids:
        return CaptureSpec((num_layers,), num_layers)
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
    if num_layers not in ids:
        raise ConfigError(
            f"--target-layer-ids {ids} lacks layer N={num_layers}: the MTP head reads the verifier's last layer "
            "(before the final norm). Add it, or drop --no-include-last-layer."
        )
    return CaptureSpec(tuple(ids), num_layers)


def model_capture_spec(
    model: str, target_layer_ids: Sequence[int] | None = None, include_last_layer: bool = True
) -> CaptureSpec:
    """`capture_spec` for a verifier folder or hub id (N read from its config.json)."""
    root = resolve_model_dir(model)
    n = verifier_num_layers(read_config_dict(root), str(root / "config.json"))
    return capture_spec(n, target_layer_ids, include_last_layer)


def mtp_residual(hidden_states: torch.Tensor, spec: CaptureSpec | None = None) -> torch.Tensor:
    """[T, n, H] captured states -> [T, H]: the layer-N residual r_t the head's input is computed from. Without a
    spec, the last captured layer (where N sits by the launcher rule)."""
    index = -1 if spec is None else spec.mtp_index
    return hidden_states[:, index]
