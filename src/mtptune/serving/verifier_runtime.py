"""The verifier as the built-in server runs it: load once, capture layer states for a padded batch, generate.

All model calls happen on one thread (the server's model executor); nothing here is thread-safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, StoppingCriteriaList

from mtptune.checkpoint.safetensors_io import resolve_model_dir
from mtptune.checkpoint.verifier import build_random_causal_lm, load_causal_lm
from mtptune.data.tokenizers import load_tokenizer
from mtptune.devices import resolve_device, warn_if_slow_cpu_dtype
from mtptune.errors import CheckpointError, ConfigError
from mtptune.serving.contract import CaptureSpec
from mtptune.serving.server_config import LOAD_FORMATS

log = logging.getLogger(__name__)


# flash-linear-attention 0.6's gated RMS norm re-tunes its kernel per this many tokens of a forward (see
# VerifierRuntime.warm_up_batch_sizes).
NORM_TUNING_TOKENS = 2048
# The warm-up's widths: two 64-token chunks (a multiple of 16) and three (not one), the kinds of lengths real prompts
# have (see VerifierRuntime.warm_up_batch_sizes).
WARMUP_WIDTHS = (128, 129)


@dataclass(frozen=True)
class Capture:
    """One request's result of a capture forward."""

    hidden_states: torch.Tensor  # [T, n_ids, H], model dtype, CPU (a view of the batch's buffer)
    next_token_logits: torch.Tensor  # [V] fp32: the verifier's prediction after the last prompt token


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # generated tokens (EOS included when it stopped there)
    finish_reason: str  # "stop" | "length"


def resolve_dtype(dtype: str | None) -> torch.dtype | str:
    if dtype in (None, "auto"):
        return "auto"
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
        dtype, dtype
    )
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"--dtype {dtype!r}: expected auto, bfloat16, float16 or float32.")
    return value


class VerifierRuntime:
    """Holds the HF model (text tower only) and captures vLLM-style layer states from one forward."""

    def __init__(self, model: PreTrainedModel, tokenizer, layer_ids: Sequence[int], device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.decoder = model.get_decoder()
        self.final_norm = getattr(self.decoder, "norm", None)
        layers = getattr(self.decoder, "layers", None)
        if self.final_norm is None or layers is None:
            raise CheckpointError(
                f"{type(self.decoder).__name__} has no `.norm`/`.layers`; cannot locate the pre-final-norm residual."
            )
        self.num_layers = len(layers)
        bad = [i for i in layer_ids if not 0 <= i <= self.num_layers]
        if bad:
            raise ConfigError(f"layer ids {bad} out of range 0..{self.num_layers} for this verifier.")
        self.layer_ids = list(layer_ids)
        self.spec = CaptureSpec(tuple(self.layer_ids), self.num_layers)
        text_config = model.config.get_text_config()
        self.hidden_size = int(text_config.hidden_size)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.dtype = next(model.parameters()).dtype
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = getattr(text_config, "eos_token_id", None)
        self.eos_token_ids: list[int] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self._pre_norm: torch.Tensor | None = None
        # vLLM's id N is the last layer's residual *before* the final norm; HF's hidden_states[N] is after it,
        # so take the norm's input instead.
        self.final_norm.register_forward_pre_hook(self._grab_pre_norm)

    def _grab_pre_norm(self, module: torch.nn.Module, args: tuple) -> None:
        self._pre_norm = args[0]

    @classmethod
    def load(
        cls,
        model: str,
        layer_ids: Sequence[int],
        device: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        tokenizer: str | None = None,
        load_format: str = "auto",
        with_tokenizer: bool = True,
    ) -> VerifierRuntime:
        """`load_format` "auto" reads the checkpoint; "dummy" builds random weights from config.json (vLLM's
        `--load-format dummy`, for benchmarks: the hidden states are then meaningless)."""
        if load_format not in LOAD_FORMATS:
            raise ConfigError(f"--load-format {load_format!r}: expected one of {', '.join(LOAD_FORMATS)}.")
        root = resolve_model_dir(model)
        torch_device = resolve_device(device)
        start = time.perf_counter()
        # For a *ForConditionalGeneration checkpoint (Qwen3.5) both build the text-only *ForCausalLM and skip the
        # vision tower, which hidden-state capture never needs.
        if load_format == "dummy":
            hf_model = build_random_causal_lm(
                root, dtype=resolve_dtype(dtype), device=torch_device, trust_remote_code=trust_remote_code
            )
        else:
            hf_model = load_causal_lm(root, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
            hf_model = hf_model.to(torch_device).eval()
        hf_tokenizer = None
        if with_tokenizer:
            hf_tokenizer = load_tokenizer(
                resolve_model_dir(tokenizer) if tokenizer else root, trust_remote_code, on_error="warn"
            )
        log.info(
            "%s verifier %s (%s, %s, %s parameters) on %s in %.1f s%s",
            "built RANDOM-WEIGHT" if load_format == "dummy" else "loaded",
            model,
            type(hf_model).__name__,
            next(hf_model.parameters()).dtype,
            f"{sum(p.numel() for p in hf_model.parameters()):,}",
            torch_device,
            time.perf_counter() - start,
            ""
            if hf_tokenizer is not None or not with_tokenizer
            else "; no tokenizer: only token-id prompts are accepted",
        )
        if load_format == "dummy":
            log.warning(
                "--load-format dummy: the verifier's weights are RANDOM (built from %s only, no safetensors read); "
                "its hidden states and tokens are meaningless: use it for benchmarks, never for training data.",
                root / "config.json",
            )
        warn_if_slow_cpu_dtype(torch_device, next(hf_model.parameters()).dtype, "the verifier")
        return cls(hf_model, hf_tokenizer, layer_ids, torch_device)

    def _forward(self, sequences: Sequence[Sequence[int]], layer_ids: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """One right-padded forward over the batch (padding is exact for Gated DeltaNet; packing is not:
        docs/contracts.md, "Verifier forwards").

        No attention mask is passed: with right padding every real token precedes every pad, so causal attention,
        the causal conv and the delta-rule recurrence never let a pad reach a real row (exact, and SDPA keeps its
        mask-free causal kernels). Returns, on the device, the real tokens' states of `layer_ids` packed
        `[sum T, n, H]`, each sequence's last post-norm state `[B, H]`, and the flat index of every real token.
        """
        lengths = [len(s) for s in sequences]
        batch, width = len(sequences), max(lengths)
        input_ids = torch.zeros(batch, width, dtype=torch.long)
        rows = torch.empty(sum(lengths), dtype=torch.long)  # flat [B * W] index of every real token
        offset = 0
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            rows[offset : offset + len(seq)] = torch.arange(row * width, row * width + len(seq))
            offset += len(seq)
        last_rows = torch.as_tensor(lengths, dtype=torch.long).cumsum(0) - 1  # each sequence's last token, packed
        if self.device.type == "cuda":
            input_ids, rows, last_rows = (t.pin_memory() for t in (input_ids, rows, last_rows))
        input_ids, rows, last_rows = (t.to(self.device, non_blocking=True) for t in (input_ids, rows, last_rows))
        need_all = any(i < self.num_layers for i in layer_ids)
        self._pre_norm = None
        out = self.decoder(input_ids=input_ids, output_hidden_states=need_all, use_cache=False)
        pre_norm, self._pre_norm = self._pre_norm, None
        if pre_norm is None:
            raise RuntimeError("the final-norm hook did not fire; unsupported decoder structure")
        per_id = [pre_norm if i == self.num_layers else out.hidden_states[i] for i in layer_ids]
        packed = torch.stack([t.reshape(batch * width, -1).index_select(0, rows) for t in per_id], dim=1)
        last_hidden = out.last_hidden_state.reshape(batch * width, -1).index_select(0, rows.index_select(0, last_rows))
        return packed, last_hidden

    @torch.inference_mode()
    def capture(self, sequences: Sequence[Sequence[int]]) -> list[Capture]:
        """The server's capture: the `layer_ids` states of every request and its next-token logits, on the host.

        Only the real rows are copied back, in one pinned, non-blocking copy per tensor and a single sync; the
        returned states are views of that one CPU buffer.
        """
        start, start_cpu = time.perf_counter(), time.thread_time()
        lengths = [len(s) for s in sequences]
        packed, last_hidden = self._forward(sequences, self.layer_ids)
        logits = self.model.lm_head(last_hidden).float()
        issued, issued_cpu = time.perf_counter(), time.thread_time()
        if self.device.type == "cuda":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (packed, logits)]
            for dst, src in zip(host, (packed, logits)):
                dst.copy_(src, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            packed, logits = host
        # Host time to issue the forward vs time then waiting for the device: which side bounds a forward. The
        # launching thread's own CPU time says whether issuing was work (Python, dispatch) or waiting to run (the
        # GIL held by another thread, the core taken by another process).
        log.debug(
            "capture %d x %d (%d tokens): issued in %.1f ms (%.1f ms on CPU), device done %.1f ms later",
            len(lengths),
            max(lengths),
            sum(lengths),
            (issued - start) * 1e3,
            (issued_cpu - start_cpu) * 1e3,
            (time.perf_counter() - issued) * 1e3,
        )
        captures, offset = [], 0
        for row, n in enumerate(lengths):
            captures.append(Capture(hidden_states=packed[offset : offset + n], next_token_logits=logits[row]))
            offset += n
        return captures

    @torch.inference_mode()
    def residuals(self, sequences: Sequence[Sequence[int]], keep: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The colocated capture: each sequence's layer-N residual r_t `[T, H]` (its first `keep[i]` tokens when
        given: padding the caller added), left on the device: no copy to the host, no file. Each is its own
        tensor, so a cache can free one without keeping the batch alive."""
        packed, _ = self._forward(sequences, [self.num_layers])
        lengths = [len(s) for s in sequences]
        keep = lengths if keep is None else keep
        parts, offset = [], 0
        for n, k in zip(lengths, keep):
            parts.append(packed[offset : offset + k, 0].clone())
            offset += n
        return parts

    def warm_up_batch_sizes(
        self,
        max_rows: int,
        widths: Sequence[int] = WARMUP_WIDTHS,
        max_tokens: int = 0,
        token_block: int = NORM_TUNING_TOKENS,
    ) -> float:
        """Run one short capture forward per row count 1..max_rows and width, then one forward per multiple of
        `token_block` tokens up to `max_tokens`; returns the seconds spent.

        flash-linear-attention's Triton kernels autotune per batch size (its cumsum kernels key on B) and per
        2,048-token block count (its gated RMS norm keys on cdiv(tokens x heads, 65,536)), and Triton compiles each
        kernel again for integer arguments that are 1 or not a multiple of 16 (a sequence length, its number of 64-token
        chunks), each paid inside a live request's forward otherwise (docs/benchmarks.md, "Why the defaults are what
        they are"). The default widths are two chunks (a multiple of 16) and three (not one), the kinds real prompts
        have. Triton keeps compiled kernels on disk (TRITON_CACHE_DIR), so later starts pay only the forwards and the
        tuning runs.
        """
        start = time.perf_counter()
        token = self.eos_token_ids[0] if self.eos_token_ids else 0
        for rows in range(1, max_rows + 1):
            for width in widths:
                self.capture([[token] * width] * rows)
        for blocks in range(2, max_tokens // token_block + 1):
            self.capture([[token] * (blocks * token_block // max_rows)] * max_rows)
        return time.perf_counter() - start

    @torch.inference_mode()
    def generate(
        self, prompt: Sequence[int], max_tokens: int, temperature: float, top_p: float, seed: int | None
    ) -> Generation:
        return self.generate_batch([prompt], [max_tokens], temperature, top_p, seed)[0]

    @torch.inference_mode()
    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: Sequence[int],
        temperature: float,
        top_p: float,
        seed: int | None,
        stopping_criteria: StoppingCriteriaList | None = None,
    ) -> list[Generation]:
        """One left-padded `model.generate` over several prompts that share sampling parameters.

        Row i stops at its first EOS or after `max_tokens[i]` tokens; greedy rows equal unbatched greedy decoding up
        to numerical near-ties (padding changes the matmul shapes, not the math). `stopping_criteria` (transformers'
        StoppingCriteriaList) may end rows early: the server's stops the rows whose client has disconnected.
        """
        if len(prompts) != len(max_tokens) or not prompts:
            raise ValueError("generate_batch needs one max_tokens per prompt and at least one prompt")
        pad_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        sample = temperature > 0
        kwargs: dict = dict(do_sample=sample, max_new_tokens=max(max_tokens), min_new_tokens=0)
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.eos_token_ids:
            kwargs.update(eos_token_id=self.eos_token_ids, pad_token_id=pad_id)
        else:
            kwargs.update(pad_token_id=pad_id)
        if stopping_criteria is not None:
            kwargs["stopping_criteria"] = stopping_criteria
        out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        results = []
        for row, limit in enumerate(max_tokens):
            tokens = out[row, width:].tolist()[:limit]
            for i, tok in enumerate(tokens):  # generate pads finished rows; keep up to the first EOS
                if tok in self.eos_token_ids:
                    results.append(Generation(tokens[: i + 1], "stop"))
                    break
            else:
                results.append(Generation(tokens, "length"))
        return results


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, seed: int | None) -> int:
    """Sample one token from fp32 logits [V] (greedy when temperature == 0)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = sorted_probs[keep]
        probs = filtered / filtered.sum()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return int(torch.multinomial(probs, 1, generator=generator))
