"""Training checkpoints under --save-path (docs/contracts.md, "Output folders"), written by rank 0, atomically.

    <save-path>/run.yaml, train_command.txt, metrics.jsonl, .train.lock (while a trainer runs: run_lock.py)
    <save-path>/<epoch>/        config.json + model.safetensors (bf16 head: `stitch` and `--from-pretrained` read it)
                                master_weights.pt (fp32), optimizer_state_dict.pt, scheduler_state_dict.pt,
                                rng_state.pt, training_state.json, val_metrics.json,
                                run_config.json (the run's flags: a resume compares them, resume_check.py)
    <save-path>/step<N>/        mid-epoch checkpoints (--checkpoint-freq < 1), same content
    <save-path>/interrupted/    written on SIGINT / SIGTERM, same content
    <save-path>/epoch<E>_end -> <E>/, checkpoint_best -> <E>/   (relative symlinks; best = highest val tau_sim)

Each folder is written to a temporary sibling and renamed into place (save_head_checkpoint), so a crash never
leaves a folder that looks complete. Resume picks the complete folder with the highest global step and
continues bit-identically: fp32 master weights, optimizer and scheduler state, RNG state and the data
position (epoch, step within the epoch) are all restored.
"""

from __future__ import annotations

import json
import os
import random
import shlex
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml

from mtptune.checkpoint.head_checkpoint import HeadConfig, save_head_checkpoint
from mtptune.errors import CheckpointError, ConfigError
from mtptune.modeling.head import MtpHead
from mtptune.training.batching import PACKING
from mtptune.training.config import TrainConfig
from mtptune.training.resume_check import RUN_CONFIG_FILE

STATE_FILE = "training_state.json"
BEST_LINK = "checkpoint_best"
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class TrainingState:
    epoch: int  # epoch the next step belongs to
    local_step: int  # optimizer steps already done in that epoch
    global_step: int  # optimizer steps done in total
    best_epoch: int | None = None
    best_tau_sim: float | None = None
    best_loss: float | None = None
    skipped_steps: int = 0  # global steps without a supervised token (no optimizer step taken)
    packing: str = PACKING  # how the epoch's rows were packed: a mid-epoch resume replays that plan

    @classmethod
    def from_json(cls, body: dict) -> TrainingState:
        known = set(cls.__dataclass_fields__)
        # Checkpoints from before the field were packed next-fit.
        return cls(**{"packing": "next-fit", **{k: v for k, v in body.items() if k in known}})


def write_run_files(save_path: Path, config: TrainConfig, resumed_with_changes: list | None = None) -> None:
    """Also the early check that --save-path is writable, before any GPU time is spent. `resumed_with_changes`
    (flag, checkpoint's value, this run's value) is recorded in run.yaml when --resume-with-changes applied some."""
    body = _plain(config.to_dict())
    if resumed_with_changes:
        body["resumed_with_changes"] = _plain(resumed_with_changes)
    try:
        save_path.mkdir(parents=True, exist_ok=True)
        (save_path / "run.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
        if config.command:
            (save_path / "train_command.txt").write_text(shlex.join(config.command) + "\n")
    except OSError as exc:
        raise ConfigError(f"--save-path {save_path} is not writable: {exc}") from exc


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class Snapshot:
    """Everything a checkpoint holds, copied to the host: training may go on while it is written."""

    head_state: dict[str, torch.Tensor]
    extra: dict[str, object]


def snapshot(
    head: MtpHead,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainingState,
    val_metrics: dict | None,
    run: dict | None = None,
) -> Snapshot:
    """`run`: the run's flags (resume_check.run_record), which a resume compares with its own."""
    copier = _HostCopier()
    head_state = {k: copier(v) for k, v in head.state_dict().items()}
    extra: dict[str, object] = {
        # head_state is already this snapshot's own copy: an fp32 head's master weights are the same tensors.
        "master_weights.pt": {k: v.float() for k, v in head_state.items()},
        # state_dict() holds the live tensors, which the next optimizer step updates in place: copy them.
        "optimizer_state_dict.pt": _to_host(optimizer.state_dict(), copier),
        "scheduler_state_dict.pt": scheduler.state_dict(),
        "rng_state.pt": rng_state(),
        STATE_FILE: asdict(state),
    }
    if val_metrics is not None:
        extra["val_metrics.json"] = val_metrics
    if run is not None:
        extra[RUN_CONFIG_FILE] = run
    copier.finish()
    return Snapshot(head_state, extra)


def write_snapshot(path: Path, head_config: HeadConfig, snap: Snapshot) -> Path:
    # The head config says how to serve it: bf16 weights, the K trained, the input-norm convention.
    return save_head_checkpoint(
        path, replace(head_config, dtype="bfloat16"), snap.head_state, snap.extra, overwrite=True
    )


def save_checkpoint(
    path: Path,
    head_config: HeadConfig,
    head: MtpHead,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainingState,
    val_metrics: dict | None,
) -> Path:
    return write_snapshot(path, head_config, snapshot(head, optimizer, scheduler, state, val_metrics))


class _HostCopier:
    """Private host copies of tensors. GPU tensors go to page-locked memory, queued without waiting, then `finish`
    waits once: a pageable copy of a 9B-class head's 3.5 GB snapshot (weights + AdamW state) held training up for
    ~2.4 s at every epoch end (docs/benchmarks.md). torch's host allocator caches page-locked blocks, so the next
    snapshot of the same shapes reuses them rather than locking new pages. Where page-locking fails, pageable."""

    def __init__(self) -> None:
        self._devices: set[torch.device] = set()

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.device.type != "cuda":
            return tensor.to("cpu", copy=True)
        try:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        except RuntimeError:
            return tensor.to("cpu", copy=True)
        host.copy_(tensor, non_blocking=True)
        self._devices.add(tensor.device)
        return host

    def finish(self) -> None:
        """Wait for the queued copies: after this the host tensors hold the values (the writer thread reads them)."""
        for device in self._devices:
            torch.cuda.synchronize(device)
        self._devices.clear()


def _to_host(value, copy: Callable[[torch.Tensor], torch.Tensor]):
    if isinstance(value, torch.Tensor):
        return copy(value)
    if isinstance(value, dict):
        return {k: _to_host(v, copy) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v, copy) for v in value)
    return value


class BackgroundWriter:
    """Writes checkpoints on one background thread, in order, so the next epoch trains meanwhile. A write's error
    is raised by the next `submit` or by `wait`, which the trainer calls before it exits (or reads a folder)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mtptune-checkpoint")
        self._pending: list[Future] = []

    def submit(self, job: Callable[[], object]) -> None:
        self._raise_finished()
        self._pending.append(self._pool.submit(job))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _raise_finished(self) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def load_checkpoint(
    path: Path,
    head: MtpHead,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainingState:
    try:
        master = torch.load(path / "master_weights.pt", map_location="cpu", weights_only=True)
        head.load_state_dict(master, strict=True)  # copy_ into the live fp32 parameters
        optimizer.load_state_dict(torch.load(path / "optimizer_state_dict.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler_state_dict.pt", map_location="cpu", weights_only=True))
        set_rng_state(torch.load(path / "rng_state.pt", map_location="cpu", weights_only=False))
        return TrainingState.from_json(json.loads((path / STATE_FILE).read_text()))
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot resume from {path}: {exc}. Delete the folder or pass --no-resume to start over."
        ) from exc


def complete_checkpoints(save_path: Path) -> list[Path]:
    """The complete checkpoint folders under `save_path` (not the links, not temporary folders)."""
    if not save_path.is_dir():
        return []
    return sorted(
        child
        for child in save_path.iterdir()
        if not child.is_symlink()
        and child.is_dir()
        and not child.name.startswith(".")
        and (child / STATE_FILE).is_file()
        and (child / "config.json").is_file()
    )


def find_resume_checkpoint(save_path: Path) -> Path | None:
    """The complete checkpoint folder (not a symlink) with the highest global step, or None."""
    best: tuple[int, int, Path] | None = None
    for child in complete_checkpoints(save_path):
        state = TrainingState.from_json(json.loads((child / STATE_FILE).read_text()))
        # Prefer the latest by global step; at equal steps an epoch folder beats interrupted/ (same content).
        key = (state.global_step, 0 if child.name == INTERRUPTED else 1, child)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def link(save_path: Path, name: str, target: str) -> None:
    """Point `save_path/name` at `target` (relative), replacing an old link atomically."""
    tmp = save_path / f".{name}.tmp-link"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, save_path / name)
