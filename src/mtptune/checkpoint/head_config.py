"""`HeadConfig`: what a head checkpoint records about its head (family, verifier, K, training conventions).

Both on-disk formats map to it: mtptune's own config.json (`head_checkpoint.py`) and speculators' MTP config.json
(`speculators_format.py`). Everything that reads a property of a saved head, K included, reads it from here.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from mtptune import __version__
from mtptune.errors import CheckpointError

FORMAT_NAME = "mtptune-mtp-head"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class HeadConfig:
    family: str
    verifier_name_or_path: str
    verifier_architectures: list[str]
    verifier_model_type: str
    num_speculative_steps: int  # K: the number of MTP steps the head was made (or trained) for
    text_config: dict  # the verifier's text config (to_dict), which builds the decoder block
    mtp_input_norm: str = "post_norm"  # what the head was trained on: verifier post-norm states, or "none"
    init: str = "native"  # native head extracted from the verifier, or how a fresh head was initialised
    dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "mtptune_version": __version__, **asdict(self)}

    @classmethod
    def from_json(cls, body: dict, source: Path) -> HeadConfig:
        """The config of mtptune's config.json `body`; a missing field or a K that is not a positive integer is an
        error naming the field."""
        if body.get("format") != FORMAT_NAME:
            raise CheckpointError(
                f'{source} is not an mtptune head checkpoint (config.json has no "format": "{FORMAT_NAME}") nor a '
                'speculators MTP checkpoint (no "speculators_model_type": "mtp"). Create one with `mtptune convert`, '
                "or point at a training checkpoint folder."
            )
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in body]
        if missing:
            raise CheckpointError(
                f"{source / 'config.json'} lacks {', '.join(repr(m) for m in missing)}: an incomplete or hand-edited "
                "head checkpoint. Write it again with `mtptune convert` (or the trainer)."
            )
        check_num_steps(body["num_speculative_steps"], f"{source / 'config.json'}: num_speculative_steps")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in known})


def check_num_steps(value: object, where: str) -> int:
    """K as recorded in a checkpoint: a positive integer, else an error naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where} must be a positive integer (the number of MTP steps K), got {value!r}.")
    return value
