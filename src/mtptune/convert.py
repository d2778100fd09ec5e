"""Step 1 of the workflow: extract a verifier's native MTP head into a standalone head checkpoint.

Reads only the head's tensors (plus config), shard by shard through the safetensors index, so a 20 GB
verifier converts in seconds with little memory. Strict: no `mtp.*` tensor, unknown or missing keys, shape
mismatches and unsupported families all fail with the offending key or file.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import torch

from mtptune.checkpoint.speculators_format import check_interchange_family
from mtptune.checkpoint.verifier import Verifier
from mtptune.devices import resolve_device
from mtptune.errors import CheckpointError, ConfigError
from mtptune.export import check_format, write_head
from mtptune.modeling.fresh_head import fresh_head_state, resolve_init
from mtptune.modeling.load import build_head, head_config_for, load_state_strict, shared_weights

logger = logging.getLogger(__name__)


def convert_model(
    model: str | os.PathLike,
    verifier: str | os.PathLike | None = None,
    algorithm: str = "mtp",
    output_path: str | os.PathLike = "converted",
    validate_device: str | None = None,
    num_speculative_steps: int = 3,
    overwrite: bool = False,
    format: str = "mtptune",
    init: str | None = None,
    seed: int = 0,
    **kwargs,
) -> Path:
    """speculators-compatible signature. `model` holds the native `mtp.*` tensors (usually the verifier itself);
    `verifier` is the base model whose config builds the head (defaults to `model`). `format="speculators"` writes
    speculators' MTP interchange format instead of mtptune's own.

    `init` ("fresh", "copy-last-layer", "random"; modeling/fresh_head.py) creates a new head instead of extracting
    one: required for a verifier without a native head (Llama / SmolLM2), optional otherwise (restarts the head)."""
    check_format(format)
    if algorithm != "mtp":
        raise ConfigError(f"--algorithm {algorithm!r} is not supported: mtptune converts native MTP heads ('mtp').")
    if kwargs:
        raise ConfigError(f"unknown convert option(s): {', '.join(sorted(kwargs))} (known: num_speculative_steps).")
    if num_speculative_steps < 1:
        raise ConfigError(f"num_speculative_steps must be >= 1, got {num_speculative_steps}.")
    source = Verifier.open(str(model))
    base = source if verifier is None or str(verifier) == str(model) else Verifier.open(str(verifier))
    if format == "speculators":
        check_interchange_family(base.family.name, base.root)
    if source.family.name != base.family.name:
        raise CheckpointError(f"{source.root} is {source.family.name} but verifier {base.root} is {base.family.name}.")
    if source.text_config.hidden_size != base.text_config.hidden_size:
        raise CheckpointError(
            f"hidden_size differs: {source.root} has {source.text_config.hidden_size}, "
            f"verifier {base.root} has {base.text_config.hidden_size}."
        )
    head_keys = source.trainable_head_keys()
    if init is not None:
        return _convert_fresh(base, init, seed, output_path, num_speculative_steps, overwrite, format, validate_device)
    if not head_keys:
        raise CheckpointError(
            f"{source.root}: no tensor starts with 'mtp.'; nothing to convert. This model has no native MTP head: "
            "create a new one with `mtptune convert MODEL --init fresh` (or --init copy-last-layer / random)."
        )
    state = source.native_head_state()
    # The head's dtype is its weights' dtype; a few fp32 buffers (family.fp32_buffers) must not decide it.
    dtype = Counter(v.dtype for v in state.values()).most_common(1)[0][0]
    head = build_head(base.family, base.text_config, dtype)
    load_state_strict(head, state, str(source.root))  # validates names and shapes against the verifier's config
    if validate_device:
        _validate_forward(head, base, validate_device)
    config = head_config_for(base, num_speculative_steps=num_speculative_steps, dtype=str(dtype).removeprefix("torch."))
    out = write_head(format, output_path, config, head.state_dict(), overwrite=overwrite)
    logger.info("converted %d head tensors from %s into %s (%s format)", len(head_keys), source.root, out, format)
    return out


def _convert_fresh(
    base: Verifier,
    init: str,
    seed: int,
    output_path: str | os.PathLike,
    num_speculative_steps: int,
    overwrite: bool,
    format: str,
    validate_device: str | None,
) -> Path:
    method = resolve_init(init)
    if base.trainable_head_keys():
        logger.warning("%s has a native MTP head; --init %s ignores it and starts a new one", base.root, init)
    # The head takes the verifier's weight dtype (the embedding's), like a native head would.
    dtype = base.checkpoint.get(base.shared_names().embed).dtype
    state = {k: v.to(dtype) for k, v in fresh_head_state(base, method, seed=seed).items()}
    head = build_head(base.family, base.text_config, dtype)
    load_state_strict(head, state, f"fresh {method} head")
    if validate_device:
        _validate_forward(head, base, validate_device)
    config = head_config_for(
        base, num_speculative_steps=num_speculative_steps, init=method, dtype=str(dtype).removeprefix("torch.")
    )
    out = write_head(format, output_path, config, head.state_dict(), overwrite=overwrite)
    logger.info(
        "created a fresh %s head (%s) for %s in %s (%s format)", base.family.name, method, base.root, out, format
    )
    return out


def _validate_forward(head, verifier: Verifier, device: str) -> None:
    """Run a short K=2 forward on `device`: proves the head builds, loads and computes finite outputs."""
    device = resolve_device(device, "--validate-device")
    head = head.to(device)
    head.set_shared(shared_weights(verifier, device=device, dtype=head.fc.weight.dtype))
    ids = torch.randint(0, verifier.text_config.vocab_size, (1, 8), device=device)
    hidden = torch.randn(1, 8, verifier.text_config.hidden_size, device=device, dtype=head.fc.weight.dtype)
    with torch.no_grad():
        outputs = head(ids, hidden, num_steps=2)
        logits = head.logits(outputs[-1])
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"validation forward on {device} produced non-finite logits.")
    head.to("cpu")
