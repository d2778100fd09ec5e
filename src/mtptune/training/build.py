"""Building the trainer's parts from a `TrainConfig`: the head (native or --from-pretrained), the data split,
the hidden-state source, optimizer, scheduler and loggers. Before anything is written under --save-path the run
takes its lock (run_lock.py) and, when it resumes, checks that its flags are the checkpoint's (resume_check.py)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mtptune.checkpoint.head_checkpoint import HeadConfig, is_head_checkpoint, read_head_config
from mtptune.checkpoint.verifier import Verifier
from mtptune.data.rows import PreparedRows
from mtptune.errors import ConfigError
from mtptune.metrics.acceptance import step_weights as fastmtp_weights
from mtptune.modeling.compile_cache import use_persistent_compile_cache
from mtptune.modeling.head import MtpHead
from mtptune.modeling.load import load_head
from mtptune.serving.sources import HiddenSource
from mtptune.training import checkpointing as ckpt
from mtptune.training.background import Background
from mtptune.training.batching import pack_rows, split_train_val
from mtptune.training.config import TrainConfig
from mtptune.training.distributed import DistInfo, broadcast_object, wrap_head
from mtptune.training.hidden_source import FailedRows, SourceStats, build_source
from mtptune.training.loggers import MetricsLogger
from mtptune.training.loss_kernels import resolve_loss_kernel
from mtptune.training.numerics import NonFiniteTraining, describe_tensors, non_finite_tensors
from mtptune.training.optim import MuonWithAdamW
from mtptune.training.resume_check import check_fresh_start, check_resume, run_record
from mtptune.training.run_lock import RunLock

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Everything the loop needs, built once."""

    config: TrainConfig
    info: DistInfo
    head: MtpHead
    model: torch.nn.Module  # the head, wrapped for DDP when distributed
    head_config: HeadConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rows: PreparedRows
    train_ids: list[int]
    val_ids: list[int]
    source: HiddenSource
    logger: MetricsLogger
    weights: list[float]  # alpha_k
    autocast_dtype: torch.dtype | None  # None: plain fp32
    total_steps: int
    stats: SourceStats = field(default_factory=SourceStats)
    timings: dict[str, float] = field(default_factory=dict)  # start-up costs, seconds (logged with the summary)
    writer: ckpt.BackgroundWriter = field(default_factory=ckpt.BackgroundWriter)  # checkpoint folders, in order
    lock: RunLock | None = None  # rank 0's lock on --save-path, released when the run ends
    run: dict = field(default_factory=dict)  # the run's flags, recorded in every checkpoint (resume_check)
    resume_changes: list = field(default_factory=list)  # what --resume-with-changes let differ from the checkpoint


def compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def loss_weights(config: TrainConfig) -> list[float]:
    if config.loss.step_weights is not None:
        total = sum(config.loss.step_weights)
        return [w / total for w in config.loss.step_weights]
    return fastmtp_weights(config.num_speculative_steps, config.loss.step_weight_beta)


def build_head(
    config: TrainConfig, info: DistInfo, autocast_dtype: torch.dtype | None, verifier: Verifier | None = None
) -> tuple[MtpHead, HeadConfig, Verifier]:
    """fp32 master weights on the device; the frozen shared tensors in the compute dtype."""
    source = config.from_pretrained or config.verifier
    head, head_config, verifier = load_head(
        source,
        verifier or config.verifier,
        device=info.device,
        dtype=torch.float32,
        shared_dtype=autocast_dtype or torch.float32,
    )
    if config.from_pretrained:
        if head_config.num_speculative_steps != config.num_speculative_steps:
            log.warning(
                "--from-pretrained %s was made for K=%d steps; training K=%d (--num-speculative-steps).",
                config.from_pretrained,
                head_config.num_speculative_steps,
                config.num_speculative_steps,
            )
        if head_config.mtp_input_norm != config.mtp_input_norm:
            log.warning(
                "--from-pretrained %s was trained with --mtp-input-norm %s; this run uses %s.",
                config.from_pretrained,
                head_config.mtp_input_norm,
                config.mtp_input_norm,
            )
    head_config = replace(
        head_config,
        num_speculative_steps=config.num_speculative_steps,
        mtp_input_norm=config.mtp_input_norm,
        extra={**head_config.extra, "trained_from": str(source), "loss": config.loss.kind},
    )
    for param in head.parameters():
        param.requires_grad_(True)
    if bad := non_finite_tensors(head):
        raise NonFiniteTraining(
            f"the starting head ({source}) holds NaN or Inf in {describe_tensors(bad)}: training it would only "
            "produce NaN. It was probably written by a run that diverged; start from an earlier checkpoint or from "
            "the verifier's own head (drop --from-pretrained)."
        )
    return head, head_config, verifier


def compile_head(head: MtpHead, scope: str) -> None:
    """Compile the head in place (state-dict keys unchanged). Eager, one MTP step is ~100 small kernels (each RMSNorm
    ~6 fp32 passes forward and more backward, rotary, residuals, SiLU-gating). "step" compiles `MtpHead.step` whole
    (flex attention and the elementwise work around the matmuls fuse; one graph per step index k, the chain state's
    step being a guarded constant); "norms" compiles only the RMSNorm modules (the measured difference:
    docs/benchmarks.md, "Trainer step"). A compile failure falls back to eager instead of stopping the run."""
    import torch._dynamo

    if scope == "none":
        return
    torch._dynamo.config.suppress_errors = True
    if scope == "step":
        # K steps x (train, no-grad validation) graphs, with room for a shape change.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
        head.step = torch.compile(head.step)  # an instance attribute shadows the method; forward calls self.step
        return
    for module in head.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.compile()


def build_optimizer(config: TrainConfig, head: MtpHead) -> torch.optim.Optimizer:
    # fused: one kernel for the whole AdamW update on CUDA (the foreach default launches several per tensor group)
    fused = all(p.is_cuda for p in head.parameters())
    if config.optim.name == "muon":  # Muon on the 2-D weights, AdamW on the norms (training/optim.py)
        return MuonWithAdamW(
            head.parameters(),
            config.optim.lr,
            config.optim.muon_lr,
            config.optim.weight_decay,
            config.optim.betas,
            fused,
        )
    decay = [p for p in head.parameters() if p.ndim >= 2]
    no_decay = [p for p in head.parameters() if p.ndim < 2]  # norms
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.optim.lr, betas=config.optim.betas, fused=fused)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    warmup, kind, floor = config.optim.warmup_steps, config.optim.scheduler, config.optim.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def count_total_steps(config: TrainConfig, rows: PreparedRows, train_ids: list[int], world_size: int) -> int:
    per_step = world_size * config.optim.grad_accum
    total = 0
    for epoch in range(config.epochs):
        batches = pack_rows(train_ids, rows.lengths, config.data.total_seq_len, config.seed, epoch)
        total += -(-len(batches) // per_step)
    return min(total, config.max_steps) if config.max_steps else total


def build_parts(config: TrainConfig, info: DistInfo) -> Parts:
    """The head, data, optimizer, loggers and hidden-state source. The source (for --colocated: loading the
    verifier, the largest start-up cost) is built in a background thread while the head and the data load."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    kernel = resolve_loss_kernel(config.loss.kernel, config.loss.kind, info.device.type)
    if kernel != config.loss.kernel:
        config = replace(config, loss=replace(config.loss, kernel=kernel))
        if info.is_main:
            log.info("--loss-kernel auto: %s (liger on CUDA for --loss ce when liger-kernel is installed)", kernel)
    use_persistent_compile_cache()
    verifier = Verifier.open(config.verifier)
    save_path = Path(config.checkpoint.save_path)
    lock = lock_save_path(save_path, info)
    try:
        return _build_parts(config, info, verifier, lock, timings, start)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def lock_save_path(save_path: Path, info: DistInfo) -> RunLock | None:
    """Rank 0 takes the run lock; every rank stops when it could not (the reason is broadcast)."""
    lock, error = None, None
    if info.is_main:
        try:
            lock = RunLock.acquire(save_path)
        except ConfigError as exc:
            if not info.enabled:
                raise
            error = str(exc)
    error = broadcast_object(error, info)
    if error is not None:
        if lock is not None:
            lock.release()
        raise ConfigError(error)
    return lock


def check_resume_flags(config: TrainConfig, info: DistInfo) -> list:
    """Before run.yaml is rewritten: the flags of a resumed run must be its checkpoint's (resume_check.py)."""
    save_path = Path(config.checkpoint.save_path)
    if not config.checkpoint.resume:
        check_fresh_start(config, ckpt.complete_checkpoints(save_path))
        return []
    checkpoint = ckpt.find_resume_checkpoint(save_path)
    if checkpoint is None:
        return []
    return check_resume(config, checkpoint, info.world_size)


def _build_parts(
    config: TrainConfig, info: DistInfo, verifier: Verifier, lock: RunLock | None, timings: dict, start: float
) -> Parts:
    resume_changes = check_resume_flags(config, info)
    pending_source = Background(
        (_timed(build_source, config.hidden_states, config.data.data_path, verifier, verifier.text_config.hidden_size,
                info.device) for _ in range(1)), 1, "mtptune-source"
    )  # fmt: skip
    try:
        autocast_dtype = compute_dtype(config, info.device)
        head, head_config, verifier = build_head(config, info, autocast_dtype, verifier)
        if info.device.type == "cuda":
            compile_head(head, config.compile)
        rows = PreparedRows(config.data.data_path, config.data.total_seq_len, config.data.max_rows)
        train_ids, val_ids = split_train_val(len(rows), config.data.train_data_ratio)
        if not val_ids and info.is_main:
            log.warning("no validation rows (--train-data-ratio 1.0): checkpoint_best will point at the last epoch.")
        total_steps = count_total_steps(config, rows, train_ids, info.world_size)
        optimizer = build_optimizer(config, head)
        scheduler = build_scheduler(config, optimizer, total_steps)
        save_path = Path(config.checkpoint.save_path)
        if info.is_main:
            changes = [{"flag": flag, "checkpoint": old, "now": new} for _, flag, old, new in resume_changes]
            ckpt.write_run_files(save_path, config, changes)
        run_name = config.logging.run_name or save_path.resolve().name
        log_dir = Path(config.logging.log_dir) if config.logging.log_dir else save_path / "logs"
        logger = MetricsLogger(save_path, config.logging.loggers, log_dir, run_name, config.to_dict(), info.is_main)
        timings["head_and_data_s"] = time.perf_counter() - start
        source, timings["source_s"] = pending_source.next()
    finally:
        pending_source.close()
    timings["build_s"] = time.perf_counter() - start
    return Parts(
        config=config,
        info=info,
        head=head,
        model=wrap_head(head, info),
        head_config=head_config,
        optimizer=optimizer,
        scheduler=scheduler,
        rows=rows,
        train_ids=train_ids,
        val_ids=val_ids,
        source=source,
        logger=logger,
        weights=loss_weights(config),
        autocast_dtype=autocast_dtype,
        total_steps=total_steps,
        stats=SourceStats(
            guard=FailedRows(config.hidden_states.max_failed_fraction, config.hidden_states.failed_fraction_window)
        ),
        timings=timings,
        lock=lock,
        run=run_record(config, info.world_size),
        resume_changes=resume_changes,
    )


def _timed(fn, *args):
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def pretrained_num_steps(path: str) -> int | None:
    """K recorded in a head checkpoint of either format (None for a verifier folder: a native head records none)."""
    return read_head_config(path).num_speculative_steps if is_head_checkpoint(Path(path)) else None
