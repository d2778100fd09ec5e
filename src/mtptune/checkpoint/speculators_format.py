"""speculators' MTP interchange format, read and written so users move in both directions freely.

A speculators MTP folder (docs/contracts.md, "The speculators interchange format") is `config.json`
(`speculators_model_type: "mtp"`, `transformer_layer_config` = the verifier's text config, `speculators_config` with K
and the verifier) + `model.safetensors` whose head tensors are named `mtp_layers.0.*` (experts fused, as mtptune holds
them in memory). speculators training checkpoints may also carry frozen copies of verifier tensors (`embed_tokens`,
`lm_head`, a NaN/real `verifier_lm_head`); vLLM always uses the target's own, so they are ignored on import and never
written on export or stitched.

The name mapping lives here and only here. It copies MiMo's vocabulary (`token_layernorm`, `input_proj`) but keeps
the Qwen concat order [embedding, hidden] (docs/contracts.md, "Weight names"), so it is applied to Qwen-style families
only.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from mtptune import __version__
from mtptune.checkpoint.files import atomic_folder, json_text
from mtptune.checkpoint.head_config import HeadConfig, check_num_steps
from mtptune.checkpoint.safetensors_io import SafetensorsCheckpoint
from mtptune.errors import CheckpointError
from mtptune.families import family_for_model_type

logger = logging.getLogger(__name__)

SPECULATORS_MODEL_TYPE = "mtp"
SPECULATORS_VERSION = "0.9.0"  # the release whose format this module reads and writes
INTERCHANGE_PREFIX = "mtp_layers.0."
# Families whose head speculators' MTPDraftModel computes exactly like vLLM's native drafter: concat
# [embedding, hidden], zero-centred norms, no position-0 embedding zeroing (speculators supports the same three).
INTERCHANGE_FAMILIES = ("qwen3_5", "qwen3_5_moe", "qwen3_next")

# head name (mtptune, without `mtp.`) -> interchange name (without `mtp_layers.0.`); exact rules before prefixes.
_EXACT = {"fc.weight": "input_proj.weight", "norm.weight": "final_layernorm.weight"}
_PREFIXES = (
    ("pre_fc_norm_hidden.", "hidden_layernorm."),
    ("pre_fc_norm_embedding.", "token_layernorm."),
    ("layers.0.", ""),
)
# Frozen verifier copies found in speculators checkpoints (DraftVocabMixin); never part of the head.
FROZEN_KEYS = frozenset({"embed_tokens.weight", "lm_head.weight", "verifier_lm_head.weight", "t2d", "d2t"})


# --- names ------------------------------------------------------------------------------------------------------
def check_interchange_family(family_name: str, source: object = "") -> None:
    if family_name not in INTERCHANGE_FAMILIES:
        where = f"{source}: " if source else ""
        raise CheckpointError(
            f"{where}the speculators MTP format only carries Qwen-style heads ({', '.join(INTERCHANGE_FAMILIES)}): "
            f"its names (token_layernorm, input_proj) look like MiMo's but mean the Qwen order [embedding, hidden]. "
            f"A {family_name!r} head cannot be converted to or from it; keep it in mtptune's own format."
        )


def head_name_to_interchange(name: str) -> str:
    if name in _EXACT:
        return INTERCHANGE_PREFIX + _EXACT[name]
    for ours, theirs in _PREFIXES:
        if name.startswith(ours):
            return INTERCHANGE_PREFIX + theirs + name[len(ours) :]
    raise CheckpointError(f"head tensor 'mtp.{name}' has no speculators interchange name.")


def interchange_name_to_head(name: str) -> str:
    if not name.startswith(INTERCHANGE_PREFIX):
        raise CheckpointError(f"tensor {name!r} is not an MTP layer tensor (expected '{INTERCHANGE_PREFIX}*').")
    rest = name[len(INTERCHANGE_PREFIX) :]
    for ours, theirs in _EXACT.items():
        if rest == theirs:
            return ours
    for ours, theirs in _PREFIXES:
        if theirs and rest.startswith(theirs):
            return ours + rest[len(theirs) :]
    return "layers.0." + rest


def head_state_to_interchange(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {head_name_to_interchange(k): v for k, v in state.items()}


def select_interchange_keys(keys: list[str], source: object = "") -> list[str]:
    """The head tensors among a speculators checkpoint's keys. Frozen verifier copies are dropped with a warning
    (never read: a real lm_head copy is ~0.5 GB); any other key outside `mtp_layers.0.` is an error (a second
    MTP layer, or not an MTP checkpoint at all)."""
    frozen = sorted(k for k in keys if k in FROZEN_KEYS)
    if frozen:
        logger.warning(
            "%s: ignoring %d frozen verifier tensor(s) %s (vLLM uses the verifier's own; they are never stitched)",
            source,
            len(frozen),
            frozen,
        )
    stray = sorted(k for k in keys if k not in FROZEN_KEYS and not k.startswith(INTERCHANGE_PREFIX))
    if stray:
        raise CheckpointError(
            f"{source}: unexpected tensor {stray[0]!r} ({len(stray)} in all) in a speculators MTP checkpoint; "
            f"only '{INTERCHANGE_PREFIX}*' and frozen copies ({', '.join(sorted(FROZEN_KEYS))}) are allowed "
            "(speculators MTP supports exactly one layer)."
        )
    return [k for k in keys if k.startswith(INTERCHANGE_PREFIX)]


def interchange_to_head_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {interchange_name_to_head(k): v for k, v in tensors.items()}


# --- detection ----------------------------------------------------------------------------------------------------
def speculators_model_type(path: str | os.PathLike) -> str | None:
    """`speculators_model_type` of a folder's config.json (None when absent or not a speculators folder)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        body = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    value = body.get("speculators_model_type") if isinstance(body, dict) else None
    return str(value) if value is not None else None


def is_speculators_checkpoint(path: str | os.PathLike) -> bool:
    return speculators_model_type(path) == SPECULATORS_MODEL_TYPE


# --- import -------------------------------------------------------------------------------------------------------
def read_speculators_config(path: str | os.PathLike) -> HeadConfig:
    """The head config of a speculators MTP folder (config.json and the weights' headers; no tensor is read)."""
    return _open(Path(path))[0]


def load_speculators_checkpoint(path: str | os.PathLike) -> tuple[HeadConfig, dict[str, torch.Tensor]]:
    """(config, head state dict without the `mtp.` prefix), like `load_head_checkpoint` for mtptune's format."""
    config, ckpt, keys = _open(Path(path))
    return config, interchange_to_head_state(ckpt.get_many(keys))


def _open(path: Path) -> tuple[HeadConfig, SafetensorsCheckpoint, list[str]]:
    config_path = path / "config.json"
    body = _read_json(config_path)
    kind = body.get("speculators_model_type")
    if kind != SPECULATORS_MODEL_TYPE:
        raise CheckpointError(
            f"{config_path}: speculators_model_type is {kind!r}; mtptune imports only MTP heads ('mtp')."
        )
    layers = body.get("num_nextn_predict_layers", 1)
    if layers != 1:
        raise CheckpointError(f"{config_path}: num_nextn_predict_layers is {layers}; only 1 MTP layer is supported.")
    layer_config = body.get("transformer_layer_config")
    if not isinstance(layer_config, dict) or not layer_config.get("model_type"):
        raise CheckpointError(f"{config_path}: transformer_layer_config is missing or has no model_type.")
    family = family_for_model_type(layer_config["model_type"])
    check_interchange_family(family.name, config_path)
    try:
        text_config = AutoConfig.for_model(**layer_config).to_dict()
    except Exception as exc:
        raise CheckpointError(f"{config_path}: transformers cannot build transformer_layer_config: {exc}") from exc
    spec = body.get("speculators_config") or {}
    methods = spec.get("proposal_methods") or []
    steps = methods[0].get("speculative_tokens") if methods and isinstance(methods[0], dict) else None
    check_num_steps(steps, f"{config_path}: speculators_config.proposal_methods[0].speculative_tokens")
    verifier = spec.get("verifier") or {}
    verifier_name = str(verifier.get("name_or_path") or "")

    try:
        ckpt = SafetensorsCheckpoint.open(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{path} has a speculators config.json but no readable weights: {exc}") from exc
    keys = select_interchange_keys(ckpt.keys(), path)
    if not keys:
        raise CheckpointError(f"{path}: no '{INTERCHANGE_PREFIX}*' tensor; the checkpoint holds no MTP head.")
    dtype = Counter(ckpt.dtype_name(k) for k in keys).most_common(1)[0][0]
    # speculators trains on the verifier's residual stream as served (no final norm; docs/contracts.md, "Which hidden
    # state"), which is mtptune's "none"; a checkpoint it only converted is the untouched native head (trained on
    # post-norm states).
    trained = (path / "training_state.json").is_file()
    config = HeadConfig(
        family=family.name,
        verifier_name_or_path=verifier_name,
        verifier_architectures=list(verifier.get("architectures") or []),
        verifier_model_type=_verifier_model_type(verifier_name, layer_config["model_type"]),
        num_speculative_steps=steps,
        text_config=text_config,
        mtp_input_norm="none" if trained else "post_norm",
        init="speculators-trained" if trained else "speculators-converted",
        dtype=dtype,
        extra={"source_format": "speculators", "speculators_version": body.get("speculators_version")},
    )
    return config, ckpt, keys


def _verifier_model_type(name_or_path: str, text_model_type: str) -> str:
    config = Path(name_or_path) / "config.json" if name_or_path else None
    if config is not None and config.is_file():
        try:
            return str(json.loads(config.read_text()).get("model_type") or text_model_type)
        except (json.JSONDecodeError, OSError):
            pass
    return text_model_type


def _read_json(config_path: Path) -> dict:
    if not config_path.is_file():
        raise CheckpointError(f"{config_path.parent} has no config.json.")
    try:
        body = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise CheckpointError(f"{config_path} is not a JSON object.")
    return body


# --- export -------------------------------------------------------------------------------------------------------
def speculators_config_json(config: HeadConfig) -> dict:
    """config.json of a speculators MTP checkpoint as speculators 0.9.0's save_pretrained writes it."""
    check_interchange_family(config.family)
    body = dict(config.text_config)
    model_type = body.pop("model_type", None)
    if not model_type:
        raise CheckpointError("head config: text_config lacks model_type.")
    layer_config = AutoConfig.for_model(model_type, **body).to_diff_dict()
    layer_config["model_type"] = model_type
    return {
        "architectures": ["MTPDraftModel"],
        "dtype": config.dtype,
        "model_type": "speculator_model",
        "num_nextn_predict_layers": 1,
        "speculators_config": {
            "algorithm": "mtp",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": config.num_speculative_steps}],
            "verifier": {
                "architectures": list(config.verifier_architectures),
                "name_or_path": config.verifier_name_or_path,
            },
        },
        "speculators_model_type": SPECULATORS_MODEL_TYPE,
        "speculators_version": SPECULATORS_VERSION,
        "tie_word_embeddings": bool(layer_config.get("tie_word_embeddings", False)),
        "transformer_layer_config": layer_config,
        "mtptune": {"version": __version__, "mtp_input_norm": config.mtp_input_norm, "init": config.init},
    }


def save_speculators_checkpoint(
    path: str | os.PathLike, config: HeadConfig, head_state: dict[str, torch.Tensor], overwrite: bool = False
) -> Path:
    """Write `path/config.json` + `path/model.safetensors` (`mtp_layers.0.*`, no embed/lm_head) atomically."""
    path = Path(path)
    body = speculators_config_json(config)
    dtype = getattr(torch, config.dtype)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in head_state_to_interchange(head_state).items()}
    with atomic_folder(path, overwrite=overwrite, what="checkpoint") as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json_text(body))  # last: marks the folder complete
    return path
