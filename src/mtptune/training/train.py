"""The training loop: `run_training(config) -> TrainResult`, the library entry point behind `mtptune train`.

The parts live in their own modules (config, batching, hidden_source, loss, metrics, checkpointing,
distributed, loggers); this file wires them and runs the loop, which reads top to bottom:

    for each epoch: plan packed micro-batches -> prefetch hidden states -> for each global step:
        forward K MTP steps per micro-batch -> chunked loss / N_k -> backward -> clip -> AdamW -> schedule
    validate -> checkpoint (<epoch>/, epoch{E}_end, checkpoint_best)

A run never ends quietly in a bad state (docs/reliability.md): a hidden-state failure that would repeat for every
row, or too many failed rows, stops it after the last finished step with a resumable `interrupted/` (when it
trained anything) and exit 2; so does a server lost on any one rank under torchrun (the ranks agree on it with one
all-reduce per step); a non-finite loss, gradient or weight stops it without saving that state; a run that
trained on nothing writes no checkpoint at all.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mtptune.errors import DataError, MtpTuneError, ServerError
from mtptune.serving.failures import ServerStorageFull, ServerUnavailable
from mtptune.training import checkpointing as ckpt
from mtptune.training.batch_loader import BatchLoader
from mtptune.training.batching import PACKING, PackedBatch, pack_rows, plan_epoch
from mtptune.training.build import Parts, build_parts
from mtptune.training.config import TrainConfig
from mtptune.training.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from mtptune.training.hidden_source import prefetch_depth
from mtptune.training.loss import mtp_loss
from mtptune.training.loss_plan import LossPlan
from mtptune.training.numerics import NonFiniteTraining, describe_tensors, non_finite_tensors
from mtptune.training.step_metrics import StepMetrics

log = logging.getLogger(__name__)


class StoppedOnAnotherRank(MtpTuneError):
    """Under torchrun: another rank's hidden-state source failed, so this rank stops after the same step."""


# What stops a run after its last finished step (with `interrupted/` when it trained anything) rather than crashing
# it: the hidden-state source's failures (a lost or full server, a systematic error, too many failed rows, a bad
# file under --on-missing raise) and another rank's.
SOURCE_FAILURES = (ServerError, DataError, StoppedOnAnotherRank)


@dataclass
class TrainResult:
    save_path: Path
    best_checkpoint: Path | None = None
    global_step: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0  # global steps with no supervised token: no optimizer step was taken
    epochs_completed: int = 0
    interrupted: bool = False
    train_losses: list[float] = field(default_factory=list)  # weighted loss per global step of this run
    val_before: dict | None = None  # the untrained (or resumed-from) head on the validation rows
    val_history: list[dict] = field(default_factory=list)
    source_stats: dict = field(default_factory=dict)


def run_training(config: TrainConfig, should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train the MTP head as configured. `should_stop(global_step)` lets a caller interrupt like Ctrl-C does."""
    config = config.validate()
    info = init_distributed(config.device)
    torch.manual_seed(config.seed)
    parts = build_parts(config, info)
    parts.logger.log("phase", 0, {"phase": "ready", **{k: round(v, 3) for k, v in parts.timings.items()}})
    try:
        with _StopSignals() as signals:

            def stop(step: int) -> bool:
                return signals.requested or (should_stop is not None and should_stop(step))

            return train(parts, stop)
    finally:
        try:
            parts.writer.close()  # a checkpoint still being written is finished, never abandoned
        finally:
            parts.logger.close()
            parts.source.close()  # waits for requests in flight and deletes their files
            if parts.lock is not None:
                parts.lock.release()
            shutdown(info)


def train(p: Parts, stop: Callable[[int], bool]) -> TrainResult:
    config, info, save_path = p.config, p.info, Path(p.config.checkpoint.save_path)
    state = _resume(p) if config.checkpoint.resume else None
    result = TrainResult(save_path=save_path)
    if state is None:
        state = ckpt.TrainingState(epoch=0, local_step=0, global_step=0)
        if config.validate_at_start and p.val_ids:
            started = time.perf_counter()
            with _stop_on_source_failure(p, state, result):
                result.val_before = validate(p)
            p.timings["initial_validation_s"] = time.perf_counter() - started
            p.logger.log("val", 0, result.val_before)
            _report_val("untrained head", result.val_before, info)
    row_uses = torch.zeros(len(p.rows), dtype=torch.int32)  # training uses of each row in this process
    bar = tqdm(
        total=p.total_steps, initial=state.global_step, disable=not (info.is_main and config.logging.progress_bar)
    )
    step_log = _StepLog(p, bar, result)
    for epoch in range(state.epoch, config.epochs):
        if _max_steps_reached(config, state):  # a resumed run that already reached --max-steps
            break
        plan = plan_epoch(_epoch_batches(p, epoch), info.rank, info.world_size, config.optim.grad_accum)
        start = state.local_step if epoch == state.epoch else 0
        loader = _loader(p, (micro for step in plan.steps[start:] for micro in step))
        step_log.start_interval(loader)
        try:
            for local in range(start, plan.num_steps):
                requested, failure, micro = stop(state.global_step), None, []
                if not requested:
                    try:
                        micro = [loader.next() for _ in plan.steps[local]]
                    except SOURCE_FAILURES as exc:
                        failure = exc
                stop_all, failed_ranks = _agree_step(requested, failure is not None, info)
                if failed_ranks:  # every rank saves the same step (rank 0 writes) and stops
                    _stop_after_failure(p, state, result, failure, failed_ranks, step_log)
                if stop_all:
                    step_log.flush()
                    _save(p, save_path / ckpt.INTERRUPTED, state, None)
                    result.interrupted = True
                    break
                for b in micro:
                    if b is not None:
                        row_uses[list(b.row_ids)] += 1
                logged = (  # every --log-every steps, and the last step of each epoch
                    (state.global_step + 1) % config.logging.log_every == 0 or local + 1 == plan.num_steps
                )
                metrics, stepped = train_step(p, [_to_device(p, b) for b in micro], with_reference=logged)
                state = replace(state, local_step=local + 1, global_step=state.global_step + 1)
                if not stepped:
                    state = replace(state, skipped_steps=state.skipped_steps + 1)
                    log.warning(
                        "step %d: no supervised token in the global batch; no optimizer step.", state.global_step
                    )
                result.optimizer_steps += int(stepped)
                tokens = sum(b.num_tokens for b in micro if b is not None) * info.world_size
                step_log.record(state.global_step, metrics, tokens, logged)
                bar.update(1)
                last_step = _max_steps_reached(config, state)
                # --val-every; not on the loop's last step: the epoch's end validates right after it
                due = bool(config.val_every and p.val_ids) and state.global_step % config.val_every == 0
                validate_now = due and not (last_step or local + 1 == plan.num_steps)
                checkpoint_now = _mid_epoch_checkpoint_due(config, plan.num_steps, local + 1)
                if logged or validate_now or checkpoint_now or last_step:
                    step_log.flush()
                if validate_now:
                    with _stop_on_source_failure(p, state, result, step_log):
                        p.logger.log("val", state.global_step, validate(p))
                    step_log.start_interval(loader)
                if checkpoint_now:
                    _save(p, save_path / f"step{state.global_step}", state, None)
                    step_log.start_interval(loader)
                if last_step:
                    break
        finally:
            loader.close()
        step_log.flush()
        if result.interrupted:
            break
        finished_epoch = state.local_step >= plan.num_steps
        if finished_epoch:
            state = replace(state, epoch=epoch + 1, local_step=0)
        state = _end_of_epoch(p, epoch, state, result, finished_epoch)
        if not finished_epoch or _max_steps_reached(config, state):  # --max-steps ended the run
            break
    bar.close()
    result.global_step, result.skipped_steps = state.global_step, state.skipped_steps
    result.source_stats = p.stats.to_dict()
    trained = row_uses[p.train_ids] if p.train_ids else torch.zeros(1, dtype=torch.int32)
    result.source_stats.update(
        truncated_rows=p.rows.truncated,
        train_rows=len(p.train_ids),
        train_row_uses_min=int(trained.min()),
        train_row_uses_max=int(trained.max()),
        train_row_uses_total=int(trained.sum()),
    )
    result.source_stats.update(p.source.stats())
    result.source_stats["timings"] = {k: round(v, 3) for k, v in p.timings.items()}
    p.logger.log("summary", state.global_step, result.source_stats)
    p.writer.wait()
    best = save_path / ckpt.BEST_LINK
    result.best_checkpoint = best if best.exists() else None
    barrier(info)
    return result


def train_step(p: Parts, micro: list[PackedBatch | None], with_reference: bool = True) -> tuple[torch.Tensor, bool]:
    """One global step over this rank's micro-batches (on the device, each with its `LossPlan`). Returns the
    step's metric sums as one flat device tensor (summed over ranks; `StepMetrics.from_flat` reads it, which waits
    for the device, so the loop does that only when it logs), with the gradient norm as its last element, and
    whether an optimizer step was taken (never on a global batch without a supervised token). `with_reference` adds
    the verifier-reference metrics (tau_sim)."""
    K, info = p.config.num_speculative_steps, p.info
    counts = [0] * K
    for b in micro:
        if b is not None:
            counts = [c + n for c, n in zip(counts, b.plan.counts)]
    if info.enabled:  # one small all-reduce; a single process never waits on the device here
        normalizers = all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=info.device), info).tolist()
    else:
        normalizers = [float(c) for c in counts]
    supervised = sum(w * n for w, n in zip(p.weights, normalizers)) > 0
    metrics = StepMetrics.zeros(K, device=info.device)
    p.model.train()
    for j, b in enumerate(micro):
        if b is None:
            if not info.enabled:
                continue
            b = _empty_batch(p)  # every rank must join DDP's gradient all-reduce
        sync = j == len(micro) - 1 or not hasattr(p.model, "no_sync")
        with contextlib.nullcontext() if sync else p.model.no_sync(), _autocast(p):
            loss, m = _forward_loss(p, p.model, b, normalizers, with_reference)
        if supervised:
            (loss * info.world_size).backward()  # DDP averages gradients; the loss is already a global mean
        metrics = metrics.merge(m)
    grad_norm = torch.zeros(1, dtype=torch.float64, device=info.device)
    if supervised:
        norm = torch.nn.utils.clip_grad_norm_(p.head.parameters(), p.config.optim.grad_clip)
        grad_norm = norm.detach().to(torch.float64).reshape(1) / info.world_size  # summed back over the ranks
        p.optimizer.step()
        p.scheduler.step()
    p.optimizer.zero_grad(set_to_none=True)
    # The gradient norm rides along with the metrics: the NaN guard reads both at the next flush, without a sync.
    return all_reduce_sum(torch.cat([metrics.to_flat(), grad_norm]), info), supervised


def _forward_loss(
    p: Parts, model: torch.nn.Module, b: PackedBatch, normalizers: list[float], with_reference: bool = True
):
    config = p.config
    post_norm, head_input = p.head.residual_to_inputs(b.hidden_states, config.mtp_input_norm)
    outputs = model(
        b.input_ids, head_input, b.position_ids, config.num_speculative_steps, config.mtp_input_norm, False,
        block_masks=b.block_masks,
    )  # fmt: skip
    loss, metrics = mtp_loss(
        outputs, b.plan, post_norm.detach(), p.head.lm_head, p.weights, normalizers, config.loss.kind,
        config.loss.chunk_rows, config.loss.kl_weight, with_reference, kernel=config.loss.kernel,
    )  # fmt: skip
    if torch.is_grad_enabled() and not loss.requires_grad:
        # Keep every parameter in the graph so DDP's reducer sees a gradient (zero) from this rank.
        loss = loss + 0.0 * sum(o.float().sum() for o in outputs)
    return loss, metrics


@torch.no_grad()
def validate(p: Parts) -> dict:
    """Metrics of the current head over the validation rows (contiguous tail), summed over ranks."""
    K, info = p.config.num_speculative_steps, p.info
    batches = pack_rows(p.val_ids, p.rows.lengths, p.config.data.total_seq_len, seed=None, epoch=0)
    mine = batches[info.rank :: info.world_size]
    loader = _loader(p, mine)
    metrics = StepMetrics.zeros(K, device=info.device)
    p.head.eval()
    failure = None
    try:
        for _ in mine:
            b = _to_device(p, loader.next())
            if b is None:
                continue
            with _autocast(p):
                _, m = _forward_loss(p, p.head, b, [float(c) for c in b.plan.counts])
            metrics = metrics.merge(m)
    except SOURCE_FAILURES as exc:
        failure = exc
    finally:
        loader.close()
    # Ranks hold different numbers of validation batches: they agree on a failure before the metrics' all-reduce.
    if failed_ranks := _failed_ranks(failure is not None, info):
        raise failure if failure is not None else _elsewhere(failed_ranks, info)
    flat = all_reduce_sum(metrics.to_flat(), info)
    return StepMetrics.from_flat(K, flat).summary(p.weights, p.config.loss.kind, p.config.loss.kl_weight)


class _StepLog:
    """Per-step metrics stay on the device until a flush (a logged step, validation, a checkpoint, the end of an
    epoch): one device sync there instead of one per step, so the host runs ahead and queues the next step while
    the GPU works. Timings are per interval between flushes, which is what an asynchronous step can be timed by.
    The flush is also the NaN guard: every checkpoint and interrupt flushes first, so a step with a non-finite loss
    or gradient norm stops the run (`NonFiniteTraining`, that step logged) before its state is ever saved."""

    def __init__(self, p: Parts, bar: tqdm, result: TrainResult) -> None:
        self.p, self.bar, self.result = p, bar, result
        self.pending: list[tuple[int, torch.Tensor, int, bool]] = []
        self.loader: BatchLoader | None = None
        self.t0 = self.wait0 = 0.0

    def start_interval(self, loader: BatchLoader) -> None:
        self.loader = loader
        self.t0, self.wait0 = time.perf_counter(), loader.wait_seconds

    def record(self, step: int, flat: torch.Tensor, tokens: int, logged: bool) -> None:
        self.pending.append((step, flat, tokens, logged))

    def flush(self) -> None:
        if not self.pending:
            return
        p, K = self.p, self.p.config.num_speculative_steps
        rows = torch.stack([flat for _, flat, _, _ in self.pending]).cpu()  # the one sync
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        waited = (self.loader.wait_seconds - self.wait0) if self.loader is not None else 0.0
        tokens = sum(t for _, _, t, _ in self.pending)
        diverged: tuple[int, float, float] | None = None
        for (step, _, step_tokens, logged), row in zip(self.pending, rows):
            summary = StepMetrics.from_flat(K, row[:-1]).summary(p.weights, p.config.loss.kind, p.config.loss.kl_weight)
            grad_norm = float(row[-1])
            self.result.train_losses.append(summary["loss"])
            finite = math.isfinite(summary["loss"]) and math.isfinite(grad_norm)
            if diverged is None and not finite:
                diverged = (step, summary["loss"], grad_norm)
            if not logged and finite:
                continue
            summary.update(
                grad_norm=grad_norm,
                lr=p.scheduler.get_last_lr()[0],
                tokens=step_tokens,
                step_seconds=elapsed / len(self.pending),
                tokens_per_s=tokens / elapsed,
                wait_fraction=waited / elapsed,
            )
            if p.info.device.type == "cuda":
                summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(p.info.device) / 2**30
            p.logger.log("train", step, summary)
            self.bar.set_postfix(
                loss=f"{summary['loss']:.3f}", tau=f"{summary['tau_sim']:.2f}", wait=f"{summary['wait_fraction']:.0%}"
            )
        self.pending.clear()
        if diverged is not None:
            raise _diverged(p, *diverged)
        if self.loader is not None:
            self.start_interval(self.loader)


def _end_of_epoch(p: Parts, epoch: int, state: ckpt.TrainingState, result: TrainResult, complete: bool):
    config, save_path = p.config, Path(p.config.checkpoint.save_path)
    with _stop_on_source_failure(p, state, result):  # a run shorter than --failed-fraction-window is checked here
        p.stats.guard.check(p.stats, end_of_epoch=True)
    if state.global_step - state.skipped_steps == 0:
        _trained_on_nothing(p, epoch, state)
    with _stop_on_source_failure(p, state, result):
        val = validate(p) if p.val_ids else None
    if val is not None:
        val = {"epoch": epoch, "global_step": state.global_step, **val}
        result.val_history.append(val)
        p.logger.log("val", state.global_step, val)
        _report_val(f"epoch {epoch}", val, p.info)
    freq = config.checkpoint.checkpoint_freq
    last = epoch == config.epochs - 1 or not complete
    if not (last or freq < 1 or (epoch + 1) % max(1, round(freq)) == 0):
        return state
    tau = val["tau_sim"] if val else None
    better = (
        val is None
        or state.best_tau_sim is None
        or (tau, -val["loss"]) > (state.best_tau_sim, -(state.best_loss or 0.0))
    )
    if better:
        state = replace(state, best_epoch=epoch, best_tau_sim=tau, best_loss=val["loss"] if val else None)
    links = [f"epoch{epoch}_end"] if complete else []
    if better and config.checkpoint.save_best:
        links.append(ckpt.BEST_LINK)
    # Written while the next epoch trains; the links move only once the folder is complete.
    _save(p, save_path / str(epoch), state, val, links=links, background=True)
    if complete:
        result.epochs_completed += 1
    return state


@contextlib.contextmanager
def _stop_on_source_failure(p: Parts, state: ckpt.TrainingState, result: TrainResult, step_log: _StepLog | None = None):
    """Around code that reads hidden states outside the step loop (validation, the end-of-epoch checks): a source
    failure on any rank stops every rank here, as `_stop_after_failure` says. Every rank runs the same guarded
    blocks in the same order, so the agreement (one all-reduce under torchrun) always pairs up."""
    failure = None
    try:
        yield
    except SOURCE_FAILURES as exc:
        failure = exc
    if failed_ranks := _failed_ranks(failure is not None, p.info):
        _stop_after_failure(p, state, result, failure, failed_ranks, step_log)


def _stop_after_failure(
    p: Parts,
    state: ckpt.TrainingState,
    result: TrainResult,
    failure: Exception | None,
    failed_ranks: list[int],
    step_log: _StepLog | None = None,
) -> None:
    """Stop after the last finished step: save `interrupted/` there (rank 0 writes it, once) when this run trained
    anything, so that rerunning the command resumes, else write nothing; then raise the failure (on the ranks whose
    source did not fail: `StoppedOnAnotherRank`) with what was saved and how to go on."""
    if step_log is not None:
        step_log.flush()  # a diverged step raises NonFiniteTraining here: nothing is saved from it
    saved = None
    if result.optimizer_steps > 0:
        saved = Path(p.config.checkpoint.save_path) / ckpt.INTERRUPTED
        _save(p, saved, state, None)
    # The run ends here: the source finishes the requests in flight now (deleting their files) instead of retrying
    # them, so that the loaders' threads stop at once and this rank exits as soon as the others (torchrun stops
    # the rest when one rank exits).
    p.source.close()
    exc: Exception = failure if failure is not None else _elsewhere(failed_ranks, p.info)
    if saved is None:
        note = "No checkpoint was written: this run trained no step."
        if isinstance(exc, (ServerUnavailable, ServerStorageFull)):
            note += " Rerun the same command once the server works again."
    else:
        note = f"Saved a resumable checkpoint at global step {state.global_step} to {saved}; "
        if isinstance(exc, ServerUnavailable):
            note += "start the server again and rerun the same command to resume."
        elif isinstance(exc, ServerStorageFull):
            note += "free space in the server's storage folder and rerun the same command to resume."
        else:
            note += "fix the cause and rerun the same command to resume."
    raise _with_note(exc, note)


def _with_note(exc: Exception, note: str) -> Exception:
    """`exc` with `note` appended to its message (the CLI prints the message), type and cause kept."""
    exc.args = (f"{exc}\n{note}",)
    return exc


def _elsewhere(failed_ranks: list[int], info: DistInfo) -> StoppedOnAnotherRank:
    ranks = ", ".join(str(r) for r in failed_ranks)
    return StoppedOnAnotherRank(
        f"rank {info.rank}: stopped because the hidden-state source of rank {ranks} failed (its own message says why; "
        "torchrun prints each rank's output)."
    )


def _trained_on_nothing(p: Parts, epoch: int, state: ckpt.TrainingState) -> None:
    """No optimizer step at all by the end of an epoch: no checkpoint (and no checkpoint_best) of the untrained head."""
    stats = p.stats
    raise DataError(
        f"epoch {epoch} ended and the head has not been trained: none of its {state.global_step} steps had a row with "
        f"usable hidden states and a supervised token (hidden states so far: {stats.loaded} loaded, {stats.missing} "
        f"missing, {stats.invalid} invalid, {stats.failed} failed). Nothing was saved, so no untrained head can reach "
        "stitch. Check --hidden-states-path (or the server) and that the rows' loss_mask marks the tokens to learn."
    )


def _diverged(p: Parts, step: int, loss: float, grad_norm: float) -> NonFiniteTraining:
    save_path = Path(p.config.checkpoint.save_path)
    p.writer.wait()  # a checkpoint of an earlier, finite state still being written is finished first
    last = ckpt.find_resume_checkpoint(save_path)
    best = save_path / ckpt.BEST_LINK
    if last is None:
        kept = "there is no checkpoint yet"
    else:
        link = f" (checkpoint_best -> {best.readlink()})" if best.is_symlink() else ""
        kept = f"the last good checkpoint, {last}{link}, is kept as it was"
    return NonFiniteTraining(
        f"step {step}: the training loss is {loss} and the gradient norm {grad_norm}; the head diverged. Stopped "
        f"without saving this state; {kept}. Rerunning the same command resumes from there and would diverge again "
        "at the same step: lower --lr (or add --warmup-steps) and rerun with --resume-with-changes, or check the "
        "starting head (--from-pretrained) and the data."
    )


def _save(
    p: Parts,
    path: Path,
    state: ckpt.TrainingState,
    val: dict | None,
    links: list[str] | None = None,
    background: bool = False,
) -> None:
    """Rank 0 writes the checkpoint (and then points `links` at it); with `background`, training goes on while the
    host copy is written (`p.writer`), else this returns once the folder is complete. Weights that are not finite
    are never saved (every rank checks its part; the ranks agree)."""
    bad = non_finite_tensors(p.head)
    if _agree(bool(bad), p.info):
        p.writer.wait()
        raise NonFiniteTraining(
            f"global step {state.global_step}: head weights {describe_tensors(bad) or '(on another rank)'} hold NaN or "
            f"Inf; {path} was not written and the checkpoints already there are unchanged. The run diverged: lower "
            "--lr (or add --warmup-steps) and resume with --resume-with-changes."
        )
    if p.info.is_main:
        snap = ckpt.snapshot(p.head, p.optimizer, p.scheduler, state, val, p.run)

        def write() -> None:
            ckpt.write_snapshot(path, p.head_config, snap)
            for name in links or []:
                ckpt.link(path.parent, name, path.name)

        p.writer.submit(write)
        if not background:
            p.writer.wait()
    barrier(p.info)


def _resume(p: Parts) -> ckpt.TrainingState | None:
    path = ckpt.find_resume_checkpoint(Path(p.config.checkpoint.save_path))
    if path is None:
        return None
    # This run's hyperparameters (from its flags), before the checkpoint's overwrite them.
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in p.optimizer.param_groups]
    base_lrs = list(p.scheduler.base_lrs)
    state = ckpt.load_checkpoint(path, p.head, p.optimizer, p.scheduler)
    if p.resume_changes:  # --resume-with-changes: the new flags take effect from the next step on
        _apply_new_hyperparameters(p, fresh, base_lrs)
        changes = [{"flag": flag, "checkpoint": old, "now": new} for _, flag, old, new in p.resume_changes]
        p.logger.log("resume", state.global_step, {"from": str(path), "resumed_with_changes": changes})
    if p.info.is_main:
        log.info(
            "resuming from %s (epoch %d, step %d of the epoch, global step %d)",
            path,
            state.epoch,
            state.local_step,
            state.global_step,
        )
    if state.local_step and state.packing != PACKING and p.info.is_main:
        log.warning(
            "!!! %s was written mid-epoch by a trainer that packed rows %s; this one packs %s, so the rest of epoch %d "
            "is a different plan: some of its rows may repeat and others be left out for this epoch (later epochs "
            "are unaffected). To avoid it, resume from an epoch-end checkpoint.",
            path,
            state.packing,
            PACKING,
            state.epoch,
        )
    return replace(state, packing=PACKING)


def _apply_new_hyperparameters(p: Parts, fresh: list[dict], base_lrs: list[float]) -> None:
    """After loading the checkpoint's optimizer and scheduler: this run's lr, betas, weight decay ... and schedule
    (its base rates; the step count and the lambda, built from this run's flags, are kept), at the resumed step."""
    for group, values in zip(p.optimizer.param_groups, fresh):
        group.update(values)
    p.scheduler.base_lrs = base_lrs
    step = p.scheduler.last_epoch
    for group, base, factor in zip(p.optimizer.param_groups, base_lrs, p.scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    p.scheduler._last_lr = [group["lr"] for group in p.optimizer.param_groups]


def _loader(p: Parts, micro_batches) -> BatchLoader:
    """Micro-batches assembled in a background thread; on GPU padded to --total-seq-len (one shape,
    no recompiles) and pinned for non-blocking copies."""
    cuda = p.info.device.type == "cuda"
    return BatchLoader(
        p.source,
        p.rows,
        micro_batches,
        prefetch_rows=prefetch_depth(p.config.hidden_states),
        prefetch_tokens=p.config.hidden_states.prefetch_tokens,
        stats=p.stats,
        on_missing=p.config.hidden_states.on_missing,
        warn=_warn,
        pad_to=p.config.data.total_seq_len if cuda else None,
        num_steps=p.config.num_speculative_steps,
        pin_memory=cuda,
        block_masks=cuda,  # the head's attention runs flex on CUDA ("auto")
    )


def _to_device(p: Parts, b: PackedBatch | None) -> PackedBatch | None:
    return None if b is None else b.to(p.info.device, p.autocast_dtype or torch.float32)


def _empty_batch(p: Parts) -> PackedBatch:
    dev, H, K = p.info.device, p.head.hidden_size, p.config.num_speculative_steps
    zeros = torch.zeros(1, 3, dtype=torch.int64, device=dev)
    hidden = torch.ones(1, 3, H, dtype=p.autocast_dtype or torch.float32, device=dev)
    positions = torch.arange(3, device=dev)[None]
    return PackedBatch((), zeros, zeros, positions, hidden, plan=LossPlan.build(zeros, zeros, positions, K))


def _epoch_batches(p: Parts, epoch: int) -> list[list[int]]:
    return pack_rows(p.train_ids, p.rows.lengths, p.config.data.total_seq_len, p.config.seed, epoch)


def _max_steps_reached(config: TrainConfig, state: ckpt.TrainingState) -> bool:
    return config.max_steps is not None and state.global_step >= config.max_steps


def _mid_epoch_checkpoint_due(config: TrainConfig, steps_in_epoch: int, done: int) -> bool:
    freq = config.checkpoint.checkpoint_freq
    if freq >= 1 or done >= steps_in_epoch:
        return False
    every = max(1, round(freq * steps_in_epoch))
    return done % every == 0


def _autocast(p: Parts):
    if p.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=p.info.device.type, dtype=p.autocast_dtype)


def _agree(flag: bool, info: DistInfo) -> bool:
    """Any rank asking to stop stops all of them at the same step."""
    if not info.enabled:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=info.device), info).item() > 0)


def _agree_step(stop: bool, failed: bool, info: DistInfo) -> tuple[bool, list[int]]:
    """Once per step, one all-reduce: whether any rank asks to stop (a signal), and which ranks' hidden-state source
    failed. Every rank then stops after the same step."""
    if not info.enabled:
        return stop, [info.rank] if failed else []
    flags = torch.zeros(1 + info.world_size, dtype=torch.float32, device=info.device)
    flags[0] = float(stop)
    flags[1 + info.rank] = float(failed)
    agreed = all_reduce_sum(flags, info).tolist()
    return agreed[0] > 0, [rank for rank in range(info.world_size) if agreed[1 + rank] > 0]


def _failed_ranks(failed: bool, info: DistInfo) -> list[int]:
    return _agree_step(False, failed, info)[1]


_warned: dict[str, int] = {}


def _warn(message: str) -> None:
    count = _warned[message[:40]] = _warned.get(message[:40], 0) + 1
    if count <= 5:
        log.warning(message)


def _report_val(label: str, val: dict, info: DistInfo) -> None:
    if info.is_main:
        log.info(
            "validation (%s): loss %.4f  tau_sim %.3f  drafts %d", label, val["loss"], val["tau_sim"], val["drafts"]
        )


class _StopSignals:
    """SIGINT / SIGTERM ask the loop to stop after the current step and save `interrupted/`; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: finishing the current step, then saving an interrupted checkpoint", signum)

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
