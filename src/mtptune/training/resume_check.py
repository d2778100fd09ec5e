"""Resume only into the run that wrote the checkpoint: the flags that change the maths must be the same.

A resumed run restores the optimizer and the schedule from the checkpoint, so a new `--lr` would be silently
ignored (the scheduler's saved base rate wins) while `run.yaml` recorded it; a new `--epochs` reshapes the
schedule midway; new data, packing budget or rank count replay another plan. Each checkpoint therefore records its
run (`run_config.json`: the config and the number of ranks); a resume compares the fields in `MATHS_FIELDS` with
it and refuses with the differences listed, unless `--resume-with-changes` (then they are warned about, applied
and recorded in `metrics.jsonl` and `run.yaml`). A different K is refused even then: the folder's checkpoints
would differ in K and `checkpoint_best` would compare tau_sim across them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from mtptune.errors import ConfigError
from mtptune.training.config import TrainConfig

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.json"

# (dotted key in TrainConfig.to_dict(), flag) of everything that changes what a step computes or which rows it sees.
MATHS_FIELDS: tuple[tuple[str, str], ...] = (
    ("verifier", "--verifier-name-or-path"),
    ("num_speculative_steps", "--num-speculative-steps"),
    ("mtp_input_norm", "--mtp-input-norm"),
    ("epochs", "--epochs"),
    ("max_steps", "--max-steps"),
    ("seed", "--seed"),
    ("dtype", "--dtype"),
    ("data.data_path", "--data-path"),
    ("data.total_seq_len", "--total-seq-len"),
    ("data.train_data_ratio", "--train-data-ratio"),
    ("data.max_rows", "--max-rows"),
    ("optim.name", "--optimizer"),
    ("optim.lr", "--lr"),
    ("optim.muon_lr", "--muon-lr"),
    ("optim.weight_decay", "--weight-decay"),
    ("optim.betas", "betas"),
    ("optim.grad_clip", "--grad-clip"),
    ("optim.grad_accum", "--grad-accum"),
    ("optim.scheduler", "--scheduler"),
    ("optim.warmup_steps", "--warmup-steps"),
    ("optim.min_lr_ratio", "min_lr_ratio"),
    ("loss.kind", "--loss"),
    ("loss.step_weight_beta", "--step-weight-beta"),
    ("loss.step_weights", "--step-weights"),
    ("loss.kl_weight", "--kl-weight"),
    ("world_size", "ranks (torchrun --nproc_per_node x nodes)"),
)
PATH_FIELDS = {"verifier", "data.data_path"}  # compared as resolved paths when they exist here


def run_record(config: TrainConfig, world_size: int) -> dict:
    """What a checkpoint records of its run (paths resolved, so that a rerun from another folder compares equal)."""
    record = {"config": json.loads(json.dumps(config.to_dict())), "world_size": world_size}
    for key in PATH_FIELDS:
        *parents, name = key.split(".")
        holder = record["config"]
        for part in parents:
            holder = holder[part]
        holder[name] = _path(holder[name])
    return record


def recorded_run(checkpoint: Path, save_path: Path) -> dict | None:
    """The run that wrote `checkpoint`: its `run_config.json`, else (checkpoints from before it existed) the
    folder's `run.yaml`, which the run that wrote it left there; None when neither is there."""
    try:
        return json.loads((checkpoint / RUN_CONFIG_FILE).read_text())
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s; the resumed run's flags are not compared.", checkpoint / RUN_CONFIG_FILE, exc)
        return None
    try:
        config = yaml.safe_load((save_path / "run.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return {"config": config, "world_size": None} if isinstance(config, dict) else None


def differences(old: dict, new: dict) -> list[tuple[str, str, object, object]]:
    """(key, flag, old value, new value) for each maths field that differs; fields the old record lacks are skipped."""
    out = []
    for key, flag in MATHS_FIELDS:
        found, before = _get(old, key)
        if not found or (before is None and key == "world_size"):
            continue
        _, after = _get(new, key)
        if key in PATH_FIELDS:
            before, after = _path(before), _path(after)
        if _plain(before) != _plain(after):
            out.append((key, flag, before, after))
    return out


def checkpoint_num_steps(checkpoint: Path) -> int | None:
    try:
        return int(json.loads((checkpoint / "config.json").read_text())["num_speculative_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_resume(config: TrainConfig, checkpoint: Path, world_size: int) -> list[tuple[str, str, object, object]]:
    """Compare this run with the one that wrote `checkpoint`: [] when they agree; the differences when
    `--resume-with-changes` allows them; else a ConfigError listing them. A changed K is always refused."""
    save_path = Path(config.checkpoint.save_path)
    k = checkpoint_num_steps(checkpoint)
    if k is not None and k != config.num_speculative_steps:
        raise ConfigError(
            f"{checkpoint} was trained for K={k} (--num-speculative-steps), this run trains "
            f"K={config.num_speculative_steps}; resuming would leave checkpoints of both K in {save_path}, and "
            f"checkpoint_best compares tau_sim across them. Train K={config.num_speculative_steps} in a new "
            f"--save-path, starting from this head if you like: --from-pretrained {checkpoint}."
        )
    old = recorded_run(checkpoint, save_path)
    if old is None:
        log.warning("%s records no run configuration; the resumed run's flags cannot be compared with it.", checkpoint)
        return []
    changes = differences(old, run_record(config, world_size))
    if not changes:
        return []
    listed = "\n".join(f"  {flag}: {before!r} -> {after!r}" for _, flag, before, after in changes)
    if not config.checkpoint.resume_with_changes:
        raise ConfigError(
            f"--save-path {save_path} holds a run with other settings; resuming from {checkpoint} would mix them "
            f"(the optimizer and the schedule come from the checkpoint):\n{listed}\nRerun with the checkpoint's "
            "values to resume it, pass --resume-with-changes to continue it with the new ones (recorded in "
            "metrics.jsonl), or start a new run with another --save-path (or --no-resume)."
        )
    log.warning("!!! --resume-with-changes: resuming from %s with other settings:\n%s", checkpoint, listed)
    return changes


def check_fresh_start(config: TrainConfig, checkpoints: list[Path]) -> None:
    """--no-resume into a folder that holds checkpoints of another K would leave both K in one folder."""
    for checkpoint in checkpoints:
        k = checkpoint_num_steps(checkpoint)
        if k is not None and k != config.num_speculative_steps:
            raise ConfigError(
                f"{checkpoint} holds a K={k} checkpoint and this run (--no-resume) trains "
                f"K={config.num_speculative_steps}: the folder would hold checkpoints of both K, and checkpoint_best "
                f"would compare tau_sim across them. Use a new --save-path (or delete {config.checkpoint.save_path})."
            )


def _get(record: dict, key: str) -> tuple[bool, object]:
    if key == "world_size":
        return "world_size" in record, record.get("world_size")
    value: object = record.get("config", {})
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _path(value: object) -> object:
    if isinstance(value, str) and Path(value).exists():
        return str(Path(value).resolve())
    return value


def _plain(value: object) -> object:
    """Tuples and lists compare equal (JSON and YAML records hold lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
