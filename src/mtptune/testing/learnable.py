"""A tiny verifier whose greedy continuation is predictable, so an MTP head can measurably learn it on CPU.

The data are "stride counting" documents: `[marker_s, a, a+s, a+2s, ...]` (mod `modulus`, offset by `base`), with
the stride s in `strides` announced by the marker token. The trunk of a tiny Qwen3.5 is trained on them for a
few hundred CPU steps (~10-20 s) until its greedy next token is right almost everywhere; the native `mtp.*` head
is left random, so the untrained head's tau_sim is ~1 and a trained head's approaches 1 + K.
Used by the trainer's tests and by `mtptune demo`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mtptune.testing.tiny import TinySpec, build_model, text_kwargs, write_tiny_verifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnableSpec:
    tiny: TinySpec = field(default_factory=TinySpec)  # written in its dtype (bf16), trained in fp32
    base: int = 10  # first pattern token id (markers live below it)
    modulus: int = 48
    strides: tuple[int, ...] = (1, 2, 3)
    min_len: int = 24
    max_len: int = 48
    prompt_len: int = 3  # marker + first values are the prompt (loss_mask 0)
    train_steps: int = 150
    batch_size: int = 16
    # All-full-attention trunk: the Gated-DeltaNet torch fallback makes CPU training ~4x slower, and the MTP head
    # (always a full-attention block) does not care what the trunk's layers are.
    full_attention_trunk: bool = True
    lr: float = 3e-3
    seed: int = 0


def marker(spec: LearnableSpec, stride: int) -> int:
    return 1 + spec.strides.index(stride)


def pattern_rows(spec: LearnableSpec, num_rows: int, seed: int) -> list[dict[str, list[int]]]:
    """Prepared-data rows (`input_ids`, `loss_mask`) of stride-counting documents."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_rows):
        stride = spec.strides[int(torch.randint(len(spec.strides), (1,), generator=gen))]
        start = int(torch.randint(spec.modulus, (1,), generator=gen))
        length = int(torch.randint(spec.min_len, spec.max_len + 1, (1,), generator=gen))
        ids = [marker(spec, stride)] + [spec.base + (start + i * stride) % spec.modulus for i in range(length - 1)]
        mask = [0] * spec.prompt_len + [1] * (length - spec.prompt_len)
        rows.append({"input_ids": ids, "loss_mask": mask})
    return rows


def train_verifier(spec: LearnableSpec = LearnableSpec()) -> tuple[torch.nn.Module, float]:
    """Train the tiny verifier's trunk on the pattern; returns (model in spec.tiny.dtype, greedy accuracy)."""
    torch.manual_seed(spec.seed)
    model = _build_trunk(spec).train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend (and crawl on a busy 2-core box)
    try:
        _fit(model, spec)
    finally:
        torch.set_num_threads(threads)
    model = model.eval().to(getattr(torch, spec.tiny.dtype))
    return model, greedy_accuracy(model, spec)


def _build_trunk(spec: LearnableSpec) -> torch.nn.Module:
    if not spec.full_attention_trunk:
        return build_model(replace(spec.tiny, dtype="float32"))
    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig

    if spec.tiny.family != "qwen3_5":
        raise ValueError("the learnable verifier is a Qwen3.5 dense model")
    torch.manual_seed(spec.tiny.seed)
    text = {**text_kwargs(spec.tiny), "layer_types": ["full_attention"] * spec.tiny.num_hidden_layers}
    if spec.tiny.layout == "text":
        return Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text))
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=spec.tiny.hidden_size)
    config = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=spec.tiny.tied)
    return Qwen3_5ForConditionalGeneration(config)


def _fit(model: torch.nn.Module, spec: LearnableSpec) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    for step in range(spec.train_steps):
        batch = pattern_rows(replace(spec, min_len=spec.max_len), spec.batch_size, seed=spec.seed * 7919 + step)
        ids = torch.tensor([r["input_ids"] for r in batch])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0:
            log.info("learnable verifier: step %d loss %.3f", step, loss.item())


@torch.no_grad()
def greedy_accuracy(model: torch.nn.Module, spec: LearnableSpec, num_rows: int = 64) -> float:
    """Fraction of supervised positions where the verifier's argmax is the pattern's next token."""
    rows = pattern_rows(replace(spec, min_len=spec.max_len), num_rows, seed=10_000 + spec.seed)
    ids = torch.tensor([r["input_ids"] for r in rows])
    pred = model(input_ids=ids).logits.argmax(-1)[:, :-1]
    target = ids[:, 1:]
    sel = slice(spec.prompt_len - 1, None)
    return float((pred[:, sel] == target[:, sel]).float().mean())


def write_learnable_verifier(out_dir: str | Path, spec: LearnableSpec = LearnableSpec()) -> Path:
    """Train (CPU, seconds) and write the verifier with a random native `mtp.*` head in the real layout."""
    model, accuracy = train_verifier(spec)
    log.info("learnable verifier: greedy accuracy %.3f on held-out pattern rows", accuracy)
    return write_tiny_verifier(out_dir, spec.tiny, model=model)


def write_prepared_rows(rows: list[dict[str, list[int]]], out_dir: str | Path) -> Path:
    """Write rows as a prepared dataset folder (columns input_ids, loss_mask, seq_len)."""
    import datasets

    out_dir = Path(out_dir)
    table = {
        "input_ids": [r["input_ids"] for r in rows],
        "loss_mask": [r["loss_mask"] for r in rows],
        "seq_len": [len(r["input_ids"]) for r in rows],
    }
    datasets.Dataset.from_dict(table).save_to_disk(str(out_dir))
    return out_dir


def write_hidden_state_files(verifier_dir: str | Path, rows: list[dict[str, list[int]]], out_dir: str | Path) -> Path:
    """Offline hidden states `hs_{i}.safetensors` (layer N, pre-final-norm) as the server would write them."""
    from mtptune.serving.hidden_state_files import write_hidden_states_file
    from mtptune.serving.verifier_runtime import VerifierRuntime

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from mtptune.checkpoint.verifier import Verifier

    num_layers = Verifier.open(str(verifier_dir)).text_config.num_hidden_layers  # vLLM layer id N
    runtime = VerifierRuntime.load(str(verifier_dir), layer_ids=[num_layers], device="cpu")
    for i, row in enumerate(rows):
        capture = runtime.capture([row["input_ids"]])[0]
        write_hidden_states_file(out_dir / f"hs_{i}.safetensors", capture.hidden_states, torch.tensor(row["input_ids"]))
    return out_dir
