"""`evaluate generate` for one head: load the head, the verifier and its tokenizer, turn the prompts into dialogues
(multi-turn prompts answered by the verifier itself) and decode them, in this process or split over worker
processes (`workers > 1`: each loads its own copy and decodes every `workers`-th prompt; the runs are merged).

Workers help wherever one decode is bound by per-step overhead rather than by the device: a small verifier on a GPU
(kernel launches) or several CPU cores. On CUDA they are spawned (a forked CUDA context is unusable), on the CPU
forked (no second import). Sampling is seeded per prompt, so the tokens do not depend on the number of workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass
from typing import Any

import torch

from mtptune.errors import ConfigError
from mtptune.evaluation.generation_run import Dialogue, GenerationRun, run_generation
from mtptune.evaluation.prompts import Prompt, encode_turn, load_tokenizer

log = logging.getLogger("mtptune.evaluate")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class GenerationJob:
    """Everything a worker needs (picklable): which head, how to decode."""

    head: str
    verifier: str | None
    num_steps: int
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    tie_tolerance: float = 0.0
    dtype: str = "bfloat16"
    device: str = "cpu"
    tokenizer: str | None = None
    greedy_baseline: bool = True
    max_seconds: float | None = None
    threads: int | None = None  # torch intra-op threads in a worker (default: CPU cores / workers)
    batch_size: int = 1  # prompts decoded together (full-attention verifiers; generation_run.run_generation)


def dialogues(prompts: list[tuple[int, Prompt]], tokenizer: Any | None) -> list[Dialogue]:
    """Prompts (with their index in the whole set, which seeds their sampling) as dialogues: turn k is rendered with
    the verifier's own answers to turns 0..k-1, decoded to text as a chat client would send them back."""

    def make(index: int, prompt: Prompt) -> Dialogue:
        def render(answers: list[list[int]]) -> list[int]:
            texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers] if answers else []
            return encode_turn(prompt, texts, tokenizer)

        return Dialogue(prompt.prompt_id, prompt.num_turns, render, index)

    return [make(index, prompt) for index, prompt in prompts]


def decode_prompts(job: GenerationJob, prompts: list[tuple[int, Prompt]], forward=None, head=None) -> GenerationRun:
    """Decode `prompts` with the job's head; loads the head / verifier unless given."""
    from mtptune.evaluation.verifier_forward import VerifierForward
    from mtptune.modeling.load import load_head

    if (forward is None) != (head is None):
        raise ValueError("decode_prompts: pass both the verifier forward and the head, or neither")
    if head is None:
        head, _, verifier = load_head(job.head, job.verifier, device=job.device, dtype=DTYPES[job.dtype])
        head.eval().requires_grad_(False)
        forward = VerifierForward.load(verifier, DTYPES[job.dtype], job.device)
    verifier = forward.verifier
    needs_text = any(p.token_ids is None for _, p in prompts)
    tokenizer = load_tokenizer(job.tokenizer or verifier.root) if needs_text else None
    return run_generation(
        forward,
        head,
        dialogues(prompts, tokenizer),
        job.max_new_tokens,
        job.num_steps,
        job.temperature,
        job.seed,
        job.tie_tolerance,
        log=log.info,
        max_seconds=job.max_seconds,
        greedy_baseline=job.greedy_baseline,
        batch_size=job.batch_size,
    )


def _worker(job: GenerationJob, prompts: list[tuple[int, Prompt]], threads: int) -> GenerationRun:
    torch.set_num_threads(threads)
    if not logging.getLogger().handlers:  # spawned: the parent's logging setup is not inherited
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker {os.getpid()}: %(message)s")
    return decode_prompts(job, prompts)


def run_workers(job: GenerationJob, prompts: list[Prompt], workers: int) -> GenerationRun:
    """Split the prompts round-robin over `workers` processes and merge their runs."""
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, not {workers}.")
    indexed = list(enumerate(prompts))
    workers = min(workers, len(indexed))
    shards = [indexed[w::workers] for w in range(workers)]
    threads = job.threads or max(1, (os.cpu_count() or 1) // workers)
    method = "spawn" if job.device.startswith("cuda") else "fork"
    log.info("generate: %d prompts over %d %sed worker processes (%d thread(s) each)", len(indexed), workers, method, threads)  # fmt: skip
    with multiprocessing.get_context(method).Pool(workers) as pool:
        runs = pool.starmap(_worker, [(job, shard, threads) for shard in shards])
    return GenerationRun.merge(runs)
