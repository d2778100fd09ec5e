"""The trainer's configuration: one typed, frozen dataclass tree (torchtitan style), built by `mtptune train`.

Every field's default here is the one `mtptune train` uses (cli/train.py takes its defaults and allowed values from
these classes; tests/training/test_cli_train.py checks that a bare command builds exactly the default tree); `TrainConfig.validate()` rejects conflicting settings with a
`ConfigError` naming the flag. Library users build the tree directly and call `run_training(config)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

from mtptune.errors import ConfigError
from mtptune.serving.client import DEFAULT_CONCURRENCY, DEFAULT_MAX_RETRIES, DEFAULT_REQUEST_TIMEOUT
from mtptune.training.loss_kernels import DEFAULT_LOSS_KERNEL, check_loss_kernel

OnMissing = Literal["generate", "skip", "warn", "raise"]
OnGenerate = Literal["delete", "cache"]
LossKind = Literal["ce", "kl", "tv", "ce+kl"]
SchedulerKind = Literal["cosine", "linear", "constant"]
DtypeName = Literal["auto", "float32", "bfloat16"]
LOSS_KINDS: tuple[str, ...] = get_args(LossKind)
LoadFormat = Literal["auto", "dummy"]
CacheDevice = Literal["auto", "cpu", "cuda"]
CompileScope = Literal["step", "norms", "none"]
COMPILE_SCOPES: tuple[str, ...] = get_args(CompileScope)
InputNormName = Literal["post_norm", "none"]
OptimizerName = Literal["adamw", "muon"]


# Tokens of rows whose hidden states are held ahead of the step, per stage (the fetch window and the prefetch queue),
# whichever of this and --prefetch rows binds first: 64 steps of 8,192 tokens, ~4 GiB of a 4,096-wide verifier's
# bf16 states (8 KiB per token). Rows of reasoning traces run to thousands of tokens, where a bound in rows alone would
# hold tens of GiB (128 rows of 8k tokens: 8 GiB per stage), and a colocated source on a GPU would hold them in GPU
# memory. Two colocated windows of GSM8K-length rows (2 x 16 forwards of 16,384 tokens) fit, so the verifier can run
# one window ahead of the trainer.
DEFAULT_PREFETCH_TOKENS = 524_288


@dataclass(frozen=True)
class DataConfig:
    data_path: str
    total_seq_len: int = 8192  # packing budget per micro-batch (tokens) per rank
    train_data_ratio: float = 0.9  # the validation set is the contiguous tail
    max_rows: int | None = None  # use only the first N prepared rows (debugging / demos)


@dataclass(frozen=True)
class HiddenStatesConfig:
    endpoints: tuple[str, ...] = ()
    hidden_states_path: str | None = None  # cache / offline folder; default <data-path>/hidden_states
    on_missing: OnMissing = "generate"
    on_generate: OnGenerate = "delete"
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    concurrency: int = DEFAULT_CONCURRENCY  # requests in flight: the server batches what is in flight
    prefetch: int = 2 * DEFAULT_CONCURRENCY  # rows fetched ahead of the step
    prefetch_tokens: int = DEFAULT_PREFETCH_TOKENS  # and at most this many of their tokens (memory held ahead)
    dtype: str = "bfloat16"  # dtype the states are held in between fetch and step
    target_layer_ids: tuple[int, ...] | None = None  # what the server captures (N appended); the MTP input is N
    api_key: str | None = None
    server_wait_timeout: float = 600.0
    # Colocated: the verifier's forward runs in the trainer's process on its device (no server, no files).
    colocated: bool = False
    verifier_dtype: str = "auto"  # colocated verifier weights: auto = bf16 on GPU, the checkpoint's dtype on CPU
    verifier_load_format: LoadFormat = "auto"  # "dummy": random weights from config.json (benchmarks only)
    forward_tokens: int | None = None  # colocated tokens per verifier forward (default 16384 on GPU, 2048 on CPU)
    # Hidden states kept in memory between epochs (LRU beyond the budget); 0 disables.
    memory_cache_gib: float = 16.0
    memory_cache_device: CacheDevice = "auto"  # auto: the training GPU when colocated, else host RAM
    # Stop when more than this fraction of the last `failed_fraction_window` rows had no usable hidden states.
    max_failed_fraction: float = 0.1
    failed_fraction_window: int = 200

    def cache_dir(self, data_path: str) -> Path:
        return Path(self.hidden_states_path) if self.hidden_states_path else Path(data_path) / "hidden_states"


@dataclass(frozen=True)
class OptimConfig:
    name: OptimizerName = "adamw"
    lr: float = 1e-4
    muon_lr: float | None = None  # Muon's lr for 2-D weights; default lr (as speculators 0.9.0: RMS matched to AdamW)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum: int = 1
    scheduler: SchedulerKind = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class LossConfig:
    kind: LossKind = "ce"
    step_weight_beta: float = 0.6
    step_weights: tuple[float, ...] | None = None  # explicit alpha_k; overrides beta
    chunk_rows: int = 2048  # rows per lm_head chunk; never more than chunk_rows x V logits alive
    kl_weight: float = 1.0  # weight of the distillation term in "ce+kl"
    kernel: str = DEFAULT_LOSS_KERNEL  # LM head + CE of the training steps: auto, ours, liger (loss_kernels.py)


@dataclass(frozen=True)
class CheckpointConfig:
    save_path: str
    checkpoint_freq: float = 1.0  # in epochs; < 1 adds mid-epoch checkpoints `step{N}/`
    save_best: bool = True
    resume: bool = True  # continue from the newest checkpoint under save_path
    # Resume even though flags that change the maths differ from the checkpoint's run (warned and recorded).
    resume_with_changes: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    loggers: tuple[str, ...] = ()  # tensorboard, trackio, wandb (metrics.jsonl is always written)
    log_dir: str | None = None  # default <save-path>/logs
    run_name: str | None = None
    log_every: int = 10  # metrics stay on the device between logged steps (one sync per logged step)
    progress_bar: bool = True


@dataclass(frozen=True)
class TrainConfig:
    verifier: str
    data: DataConfig
    checkpoint: CheckpointConfig
    hidden_states: HiddenStatesConfig = field(default_factory=HiddenStatesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    from_pretrained: str | None = None
    num_speculative_steps: int = 3
    mtp_input_norm: InputNormName = "post_norm"
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps in total; stops early
    seed: int = 0
    device: str = "auto"
    dtype: DtypeName = "auto"  # compute dtype: bf16 autocast on GPU; master weights are always fp32
    val_every: int | None = None  # extra validations every N optimizer steps (always at each epoch end)
    validate_at_start: bool = True  # the untrained head's val metrics, the "before" of before/after
    # CUDA only (the CPU stays eager): "step" compiles each MTP step of the head (embedding, norms, fc, decoder layer
    # with its flex attention) into fused kernels; "norms" only its RMSNorms; "none" keeps it eager.
    compile: CompileScope = "step"
    command: tuple[str, ...] = ()  # the command line, for train_command.txt

    def validate(self) -> TrainConfig:
        if self.num_speculative_steps < 1:
            raise ConfigError(f"--num-speculative-steps must be >= 1, got {self.num_speculative_steps}.")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1, got {self.max_steps}.")
        if not 0.0 < self.data.train_data_ratio <= 1.0:
            raise ConfigError(f"--train-data-ratio must be in (0, 1], got {self.data.train_data_ratio}.")
        if self.data.total_seq_len < 3:
            raise ConfigError(f"--total-seq-len must be >= 3, got {self.data.total_seq_len}.")
        if self.loss.kind not in LOSS_KINDS:
            raise ConfigError(f"--loss must be one of {', '.join(LOSS_KINDS)}, got {self.loss.kind!r}.")
        if self.loss.chunk_rows < 1:
            raise ConfigError("--loss-chunk-rows must be >= 1.")
        check_loss_kernel(self.loss.kernel, self.loss.kind)
        if self.loss.step_weights is not None:
            if len(self.loss.step_weights) != self.num_speculative_steps:
                raise ConfigError(
                    f"--step-weights has {len(self.loss.step_weights)} values but --num-speculative-steps is "
                    f"{self.num_speculative_steps}."
                )
            if any(w < 0 for w in self.loss.step_weights) or sum(self.loss.step_weights) <= 0:
                raise ConfigError("--step-weights must be non-negative with a positive sum.")
        elif self.loss.step_weight_beta < 0:
            raise ConfigError(f"--step-weight-beta must be >= 0, got {self.loss.step_weight_beta}.")
        if self.compile not in COMPILE_SCOPES:
            raise ConfigError(f"--compile must be one of {', '.join(COMPILE_SCOPES)}, got {self.compile!r}.")
        if self.optim.grad_accum < 1:
            raise ConfigError(f"--grad-accum must be >= 1, got {self.optim.grad_accum}.")
        if self.optim.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.optim.lr}.")
        hs = self.hidden_states
        if hs.colocated:
            if hs.on_missing != "generate" or hs.on_generate != "delete":
                raise ConfigError(
                    "--colocated computes every row's hidden states in this process: it takes no --on-missing "
                    f"{hs.on_missing} / --on-generate {hs.on_generate} (nothing is read from or written to disk)."
                )
            if hs.endpoints:
                raise ConfigError("--colocated runs the verifier in this process: drop --vllm-endpoint.")
            if hs.forward_tokens is not None and hs.forward_tokens < 1:
                raise ConfigError(f"--verifier-forward-tokens must be >= 1, got {hs.forward_tokens}.")
        elif hs.on_missing == "generate" and not hs.endpoints:
            raise ConfigError(
                "--on-missing generate needs a hidden-state server: pass --vllm-endpoint URL, or --colocated to run "
                "the verifier in this process (or use --on-missing raise/skip/warn with pre-written files)."
            )
        if not 0.0 <= hs.max_failed_fraction <= 1.0:
            raise ConfigError(f"--max-failed-fraction must be in [0, 1], got {hs.max_failed_fraction}.")
        if hs.failed_fraction_window < 1:
            raise ConfigError(f"--failed-fraction-window must be >= 1, got {hs.failed_fraction_window}.")
        if hs.memory_cache_gib < 0:
            raise ConfigError(f"--hidden-states-memory-cache must be >= 0 GiB, got {hs.memory_cache_gib}.")
        if hs.on_generate == "cache" and hs.on_missing != "generate":
            raise ConfigError("--on-generate cache only applies with --on-missing generate.")
        if self.checkpoint.checkpoint_freq <= 0:
            raise ConfigError(f"--checkpoint-freq must be > 0, got {self.checkpoint.checkpoint_freq}.")
        if self.val_every is not None and self.val_every < 1:
            raise ConfigError(f"--val-every must be >= 1, got {self.val_every}.")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
