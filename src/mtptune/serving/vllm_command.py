"""The exact `vllm serve` command line of a hidden-state extraction server (contracts b1, b2)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from mtptune.errors import ConfigError

HIDDEN_STATES_BACKENDS = ("file", "mooncake")


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
    engine_args: list[str] = field(default_factory=list)


def speculative_config(layer_ids: Sequence[int]) -> dict:
    # The extraction "proposer" asserts num_speculative_tokens == 1 (b2).
    return {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(layer_ids)}},
    }


def kv_transfer_config(hidden_states_path: str, backend: str = "file") -> dict:
    if backend == "file":
        return {
            "kv_connector": "ExampleHiddenStatesConnector",
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {"shared_storage_path": hidden_states_path},
        }
    if backend == "mooncake":
        return {
            "kv_connector": "MooncakeHiddenStatesConnector",
            "kv_connector_module_path": "hs_connectors.mooncake_hidden_states_connector",
            "kv_role": "kv_producer",
        }
    raise ConfigError(f"--hidden-states-backend {backend!r}: expected one of {', '.join(HIDDEN_STATES_BACKENDS)}.")


def _has_flag(args: Sequence[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in args for n in names)


def build_vllm_command(spec: VllmServeSpec) -> list[str]:
    """argv for `python -m vllm.entrypoints.cli.main serve ...`; engine args after `--` are appended unchanged.

    Our own flags are only emitted when given (or, for --host, to keep the loopback default) and never when the
    engine args already set them, so a user's `-- --port 9000` wins.
    """
    extra = list(spec.engine_args)
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", spec.model]
    argv += ["--speculative-config", json.dumps(speculative_config(spec.layer_ids))]
    argv += ["--kv-transfer-config", json.dumps(kv_transfer_config(spec.hidden_states_path, spec.backend))]
    # Chunked prefill breaks one-request-one-prefill capture; prefix-cache hits are undocumented for the
    # hidden-state KV group (b2). speculators' launcher leaves both to the user; we do not.
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
    ]
    for flag, value in optional:
        if value is not None and not _has_flag(extra, flag, flag.replace("-", "_")):
            argv += [flag, str(value)]
    if spec.trust_remote_code and not _has_flag(extra, "--trust-remote-code"):
        argv.append("--trust-remote-code")
    return argv + extra


def format_command(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def exec_command(argv: Sequence[str]) -> None:
    """Replace this process with vLLM (signals and exit codes then belong to vLLM)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], list(argv))
