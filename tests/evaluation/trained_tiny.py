"""A tiny verifier and a head trained to be right about it (plain CE on the verifier's own greedy tokens).

The rows are the verifier's greedy continuations of random prompts: the text serving would produce at
temperature 0, on which the offline simulation is exact and real speculative decoding must agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mtptune.data.rows import Row
from mtptune.evaluation.speculative import greedy_decode
from mtptune.evaluation.verifier_forward import VerifierForward
from mtptune.modeling.load import load_head
from mtptune.serving.colocated import ColocatedSource
from mtptune.serving.verifier_runtime import VerifierRuntime

NUM_STEPS = 3
PROMPT_LEN = 12
NEW_TOKENS = 40
NUM_PROMPTS = 8


@dataclass(frozen=True, eq=False)
class TinySetup:
    verifier_dir: Path
    trained_head: Path
    random_head: Path  # the verifier's own (random) native head, as a head checkpoint
    forward: VerifierForward
    eval_prompts: list[list[int]]
    eval_rows: list[Row]  # prompt (unsupervised) + greedy continuation (supervised)


def greedy_rows(forward: VerifierForward, prompts: list[list[int]], new_tokens: int) -> list[Row]:
    """The verifier's greedy continuations, computed exactly as the lossless baseline computes them."""
    rows = []
    for i, prompt in enumerate(prompts):
        decoded, _ = greedy_decode(forward, prompt, new_tokens, stop_tokens=set())
        rows.append(Row(i, prompt + decoded.tokens, [0] * len(prompt) + [1] * len(decoded.tokens)))
    return rows


def train_head(verifier_dir: Path, forward: VerifierForward, rows: list[Row], steps: int = 20) -> torch.nn.Module:
    head, _, _ = load_head(verifier_dir, dtype=torch.float32)
    ids = torch.stack([r.input_ids for r in rows])
    with torch.no_grad():
        hidden = forward.hidden_states(ids).float()
        reference = forward.greedy(hidden.to(forward.model.dtype))  # [B, T]: the verifier's greedy token at t+1
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    T = ids.shape[1]
    torch.manual_seed(0)
    for _ in range(steps):
        outputs = head(ids, hidden, num_steps=NUM_STEPS, hidden_is_pre_norm=False)
        loss = torch.zeros(())
        for k, o in enumerate(outputs):
            n = T - k - 1  # row t predicts reference[t + k + 1]
            logits = head.logits(o[:, :n])
            loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1), reference[:, k + 1 :].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


_RUNTIMES: dict[int, VerifierRuntime] = {}


def direct_source(tiny: TinySetup) -> ColocatedSource:
    """The verifier's own forward in this process (the colocated source), one runtime per tiny verifier."""
    model = tiny.forward.model
    if id(model) not in _RUNTIMES:
        layers = model.config.get_text_config().num_hidden_layers
        _RUNTIMES[id(model)] = VerifierRuntime(model, None, [layers], tiny.forward.device)
    return ColocatedSource(_RUNTIMES[id(model)])
