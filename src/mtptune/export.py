"""Write a head checkpoint in another format: speculators' MTP interchange format (docs/contracts.md, "The speculators
interchange format") so that speculators 0.9.0 loads and stitches it with its own code, or back into mtptune's own
format.

`export_checkpoint` reads either format (the reader detects it from config.json), so it converts both ways.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mtptune.checkpoint.head_checkpoint import HeadConfig, load_head_checkpoint, save_head_checkpoint
from mtptune.checkpoint.speculators_format import save_speculators_checkpoint
from mtptune.errors import ConfigError

logger = logging.getLogger(__name__)

HEAD_FORMATS = ("mtptune", "speculators")


def check_format(format: str) -> None:
    if format not in HEAD_FORMATS:
        raise ConfigError(f"--format {format!r} is not supported; choose one of {', '.join(HEAD_FORMATS)}.")


def write_head(
    format: str,
    path: str | os.PathLike,
    config: HeadConfig,
    head_state: dict[str, torch.Tensor],
    overwrite: bool = False,
) -> Path:
    """Save a head (state dict without the `mtp.` prefix) in `format`."""
    check_format(format)
    if format == "speculators":
        return save_speculators_checkpoint(path, config, head_state, overwrite=overwrite)
    return save_head_checkpoint(path, config, head_state, overwrite=overwrite)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output_path: str | os.PathLike,
    format: str = "speculators",
    overwrite: bool = False,
) -> Path:
    """Re-write the head checkpoint `checkpoint` (mtptune or speculators format) in `format`, values unchanged."""
    check_format(format)
    config, state = load_head_checkpoint(checkpoint)
    if format == "speculators" and config.mtp_input_norm != "none":
        logger.info(
            "%s was trained on verifier post-norm hidden states (what vLLM serves); speculators' own trainer feeds "
            "the pre-norm residual, so keep finetuning it with mtptune (--mtp-input-norm %s) for consistency.",
            checkpoint,
            config.mtp_input_norm,
        )
    out = write_head(format, output_path, config, state, overwrite=overwrite)
    logger.info("exported %d head tensors from %s to %s (%s format)", len(state), checkpoint, out, format)
    return out
